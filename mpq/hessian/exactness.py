"""The graph's `exact` labels, checked on data: per layer, H_ii v = G_ii v for random v.

`linearity`'s allow-list can be fooled (`1 / (1 + relu(h))`, a weight read again as an
attribute, a BN that uses batch statistics, an in-place update the graph does not follow), so
every layer it calls exact is checked on the first images of the first batch. For the mean
cross-entropy, with r = dL/dz,

    H v = G v + C v,    G v = J^T H_out J v,    C v = d/dW (J^T r) . v  (r held fixed).

C v is taken directly from a double backward rather than as H v - G v, so no cancellation
hides in it: on a piecewise-linear path it is exactly 0.

All layers share one product: each checked layer's conv or matmul loses its mixed second
derivative in (input, weight) (`_local_forward`), which is where a ReLU network's cross-layer
curvature comes from, and which leaves every diagonal block H_ii as it was. A layer whose row
of that joint product is not zero is then checked alone.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CHECK_DIRECTIONS", "CHECK_IMAGES", "EXACT_REL_TOL", "confirm_exact",
           "curvature_gaps"]

# Relative gap above which a layer is curved. The gap has no cancellation in it (C v is
# computed directly) and is exactly 0 on ResNet20 and resnet18. The tolerance is set above the
# float32 floor of H v and G v computed as two separate products, which is where they could
# be told apart at all: up to 2.4e-4 on ResNet20's first 4 training images, predicted with
# p ~ 0.97 so that diag p - p p^T cancels, 1e-6 to 1e-5 elsewhere
# (`benchmarks/sensitivity.py --check-cost` prints it). The curved cases of
# tests/test_exactness.py sit at 0.1 and above.
EXACT_REL_TOL = 1e-3
# The check runs on the first images of the first batch: a curvature term is a property of
# the graph, non-zero on almost every input, so a few images show it. Its cost is then fixed,
# while the estimators' grows with images and classes: 3% of the exact path's CPU time on
# ResNet20 (one batch of 128) and on resnet18 (16 images of 224px; see the benchmark).
CHECK_IMAGES = 4
CHECK_DIRECTIONS = 2


def _local_forward(module: nn.Module):
    """`module.forward` with the same value and first derivatives, and no mixed second
    derivative in (input, weight): the weight acts on the input detached, the input's gradient
    flows through the weight detached (`delta` is zero but carries the input's gradient)."""
    def forward(x):
        delta = x - x.detach()
        if isinstance(module, nn.Linear):
            return (F.linear(x.detach(), module.weight, module.bias)
                    + F.linear(delta, module.weight.detach()))
        return (module._conv_forward(x.detach(), module.weight, module.bias)
                + module._conv_forward(delta, module.weight.detach(), None))
    return forward


def _prepared(model: nn.Module, layers: list[str]) -> nn.Module:
    """An eval-mode copy whose only trainable tensors are the layers' weights, each layer's
    forward local (see `_local_forward`)."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for name in layers:
        module = model.get_submodule(name)
        module.weight.requires_grad_(True)
        module.forward = _local_forward(module)
    return model


def _gap(gv: torch.Tensor, cv: torch.Tensor | None) -> float:
    """||H v - G v|| / max(||H v||, ||G v||), with H v = G v + C v (0 where both vanish)."""
    if cv is None:  # the layer's gradient does not depend on its weight at all
        return 0.0
    scale = max((gv + cv).norm().item(), gv.norm().item())
    return cv.norm().item() / scale if scale > 0 else 0.0


def curvature_gaps(model: nn.Module, layers: list[str], x: torch.Tensor, y: torch.Tensor, *,
                   directions: int = 2, rel_tol: float = EXACT_REL_TOL,
                   seed: int = 0) -> dict[str, float]:
    """Per layer, the largest relative gap ||H_ii v - G_ii v|| / ||H_ii v|| over `directions`
    Gaussian directions v in its weight, for the mean cross-entropy of the model on (x, y).
    A layer whose gap in the joint product (every layer's direction at once) is at most
    `rel_tol` reports that gap: its whole block row of C, diagonal block included, is then
    nil to that tolerance. The others are checked alone.

    Args:
        model: the model (not changed; a copy is used, in eval mode).
        layers: Conv or Linear layers, each called once, whose Hessian block the graph says
            is the Gauss-Newton block.
        x, y: inputs (N, ...) and labels (N,), on the model's device.
    """
    if not layers:
        return {}
    model = _prepared(model, layers)
    weights = [model.get_submodule(name).weight for name in layers]
    z = model(x)                                                          # (N, C)
    p = F.softmax(z.detach(), dim=1)
    u = ((p - F.one_hot(y, z.shape[1]).to(p)) / len(x)).requires_grad_(True)  # r = dL/dz
    jt_u = torch.autograd.grad(z, weights, u, create_graph=True)          # J^T u, linear in u
    gen = torch.Generator().manual_seed(seed)

    def gaps_of(idx: list[int], v: list[torch.Tensor]) -> list[float]:
        """Gap per layer of `idx`, for a direction v that lives on those layers. The double
        backward of J^T u . v gives J v (in u) and C v (in W) at once; G v = J^T H_out J v
        takes one more backward, not needed where every C v is exactly zero."""
        jv, *cv = torch.autograd.grad([jt_u[i] for i in idx], [u, *[weights[i] for i in idx]],
                                      v, retain_graph=True, allow_unused=True)
        if all(c is None or not c.any() for c in cv):
            return [0.0] * len(idx)
        hout_jv = (p * jv - p * (p * jv).sum(1, keepdim=True)) / len(x)   # H_out J v
        gv = torch.autograd.grad(z, [weights[i] for i in idx], hout_jv, retain_graph=True)
        return [_gap(g, c) for g, c in zip(gv, cv)]

    gaps = {name: 0.0 for name in layers}
    every = list(range(len(layers)))
    for _ in range(directions):
        v = [torch.randn(w.shape, generator=gen).to(w) for w in weights]
        for i, gap in zip(every, gaps_of(every, v)):
            if gap > rel_tol:  # a block row that is not zero: is the diagonal block?
                gap = gaps_of([i], [v[i]])[0]
            gaps[layers[i]] = max(gaps[layers[i]], gap)
    return gaps


def confirm_exact(model: nn.Module, curved: dict[str, str | None], x: torch.Tensor,
                  y: torch.Tensor) -> dict[str, str | None]:
    """`curved` (layer -> why its Hessian block is not its Gauss-Newton block, None where the
    graph says it is) with each None checked on the first `CHECK_IMAGES` of (x, y): a layer
    whose H v and G v differ by more than `EXACT_REL_TOL` becomes "numerical check", and a
    warning names it. Where the check cannot run (an op without a double backward), nothing is
    proven and the layers are so labelled."""
    exact = [name for name, why in curved.items() if why is None]
    if not exact:
        return dict(curved)
    device = next(model.parameters()).device
    x, y = x[:CHECK_IMAGES].to(device), y[:CHECK_IMAGES].to(device)
    try:
        gaps = curvature_gaps(model, exact, x, y, directions=CHECK_DIRECTIONS)
    except (RuntimeError, NotImplementedError) as exc:
        why = f"numerical check could not run ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        warnings.warn(f"{why}; {len(exact)} layers the graph calls exact are reported as "
                      f"their Gauss-Newton block", stacklevel=3)
        return {name: curved[name] or why for name in curved}
    wrong = {name: gap for name, gap in gaps.items() if gap > EXACT_REL_TOL}
    if wrong:
        listed = ", ".join(f"{name} ({gap:.1e})" for name, gap in wrong.items())
        warnings.warn(
            f"the graph calls {len(wrong)} layer(s) piecewise linear, but their Hessian-vector "
            f"products differ from their Gauss-Newton ones by more than {EXACT_REL_TOL:g} "
            f"(relative): {listed}; their sensitivity is the Gauss-Newton block, recorded as "
            f"quantity 'ggn', curved_by 'numerical check'", stacklevel=3)
    return {name: "numerical check" if name in wrong else why for name, why in curved.items()}
