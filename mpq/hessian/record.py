"""What a sensitivity estimate reports for one layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["LayerSensitivity"]


@dataclass
class LayerSensitivity:
    """Sensitivity of one layer. `quantity` is what was estimated: `hessian` (the block of the
    loss's Hessian; also where it provably equals the Gauss-Newton block) or `ggn` (the
    Gauss-Newton block, where the Hessian differs: `curved_by` says why). `*_se` are standard
    errors (0 for exact values); `probes` counts Hessian-vector products or label draws."""

    trace: float
    trace_se: float
    top_eigenvalue: float
    top_eigenvalue_se: float
    estimator: str
    probes: int
    numel: int
    quantity: str = "hessian"
    curved_by: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
