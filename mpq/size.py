"""What a quantized model weighs when stored: the one place sizes are computed. The solver,
the search, QAT metrics and the export all ask a `Footprint`, built once per model; with the
file's `meta`, its sizes are those of the `model.mpq` file exactly (`mpq.mpqformat` lays it
out), header included, so a budget holds on disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .mpqformat import (ACT_QUANT_BYTES, FLOAT_BYTES, LayerShape, header_bytes, layer_bytes,
                        shape_of, stored_parts)

__all__ = ["Footprint", "LayerShape", "fp32_parameter_bytes", "layer_bytes", "weight_bytes"]


def fp32_parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters in float32: the reference for compression ratios."""
    return sum(p.numel() for p in model.parameters()) * FLOAT_BYTES


@dataclass(frozen=True)
class Footprint:
    """Stored bytes of a model for any weight bits: `shapes` of its quantizable layers and the
    `fixed` bytes that do not depend on their bits (activation quantizers, float tensors, and
    with `meta` the file's prefix, header and checksum)."""

    shapes: Mapping[str, LayerShape]
    fixed: int = 0

    @classmethod
    def of(cls, qmodel: nn.Module, meta: dict | None = None) -> Footprint:
        """The footprint of a prepared model (any plan: only its structure counts)."""
        layers, acts, rest = stored_parts(qmodel)
        fixed = len(acts) * ACT_QUANT_BYTES + sum(t.numel() for t in rest.values()) * FLOAT_BYTES
        if meta is not None:
            fixed += header_bytes(meta, qmodel)
        return cls({name: shape_of(m) for name, m in layers.items()}, fixed)

    def layer(self, name: str, w_bits: int | None) -> int:
        """Bytes of one layer at `w_bits` (None: float)."""
        return layer_bytes(self.shapes[name], w_bits)

    def bytes(self, bits: Mapping[str, int | None]) -> int:
        """Stored bytes with each layer at `bits[name]`."""
        return self.fixed + sum(self.layer(name, b) for name, b in bits.items())

    def smallest(self, choices: Mapping[str, Iterable[int]] | Iterable[int]) -> int:
        """The fewest bytes any plan reaches with per-layer (or shared) bit `choices`."""
        return self.fixed + sum(min(self.layer(n, b) for b in self._choices(choices, n))
                                for n in self.shapes)

    def largest(self, choices: Mapping[str, Iterable[int]] | Iterable[int]) -> int:
        """The most bytes any plan reaches with these `choices`."""
        return self.fixed + sum(max(self.layer(n, b) for b in self._choices(choices, n))
                                for n in self.shapes)

    @staticmethod
    def _choices(choices, name: str) -> Iterable[int]:
        return choices[name] if isinstance(choices, Mapping) else choices


def weight_bytes(qmodel: nn.Module, meta: dict | None = None) -> int:
    """Stored size in bytes of a prepared model at its own bits; with `meta`, the exact size of
    its `model.mpq` file."""
    modules = dict(qmodel.named_modules())
    footprint = Footprint.of(qmodel, meta)
    return footprint.bytes({name: modules[name].w_bits for name in footprint.shapes})
