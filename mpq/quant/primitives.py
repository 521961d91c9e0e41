"""Pure quantization functions: rounding with a straight-through estimator, fake quantization,
and scale selection. No modules and no state here; `mpq.quant.modules` builds on these.

Conventions: a `b`-bit symmetric grid is narrow-range, k in [-(2^(b-1) - 1), 2^(b-1) - 1], so
zero is exact and the grid is symmetric (what int8 kernels and packed sub-8-bit weights expect).
An unsigned grid is k in [0, 2^b - 1] with zero point 0 (activations after a ReLU). Weights use
`weight_range`: the same grids, except 8 bits, whose weights stay in [-64, 64] so that no int8
kernel can saturate (see `INT8_WEIGHT_MAX`).
"""

from __future__ import annotations

import torch

__all__ = [
    "INT8_WEIGHT_MAX",
    "fake_quantize",
    "grad_scale",
    "mse_optimal_scale",
    "quant_range",
    "round_ste",
    "weight_range",
]

# x86 u8 x s8 kernels without VNNI (ONNX Runtime's and fbgemm's AVX2 and AVX-512BW paths) add
# two adjacent products in int16 (VPMADDUBSW), which saturates above 32,767: 255 * (127 + 127)
# does. With |k| <= 64 no pair can (255 * 128 = 32,640), so every CPU computes the same integers.
INT8_WEIGHT_MAX = 64


def quant_range(bits: int, *, signed: bool) -> tuple[int, int]:
    """Integer range (qmin, qmax) of a `bits`-bit grid: narrow-range when signed."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def weight_range(bits: int) -> tuple[int, int]:
    """Integer range of a `bits`-bit weight: `quant_range(bits, signed=True)`, except that
    8-bit weights keep within +-INT8_WEIGHT_MAX (129 levels, stored in 8 bits)."""
    if bits == 8:
        return -INT8_WEIGHT_MAX, INT8_WEIGHT_MAX
    return quant_range(bits, signed=True)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _FakeQuantize(torch.autograd.Function):
    """Fake quantization with a fixed scale in 5 passes; the backward is one multiply (faster
    on the CPU than autograd ops or torch's fused kernel: docs/design_notes.md)."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax):
        q = torch.div(x, scale)
        out = q.clamp(qmin, qmax)
        # Inside the range exactly where clamping changed nothing: one comparison pass.
        ctx.save_for_backward(out == q)
        return out.round_().mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        # `where` reads the mask as it is; `grad * inside` first copied it to float.
        return torch.where(inside, grad, 0.0), None, None, None


class _FakeQuantizePassAll(torch.autograd.Function):
    """`_FakeQuantize` whose gradient reaches every input, clipped or not (TWN's and TTQ's
    straight-through estimator for weights)."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax):
        return torch.div(x, scale).clamp_(qmin, qmax).round_().mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounds to the nearest integer; the gradient passes straight through (identity).

    An autograd function rather than `(x.round() - x).detach() + x`, whose forward value can be
    off the integer by one ulp and would put fake-quantized values off their grid.
    """
    return _RoundSTE.apply(x)


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Returns x exactly, but scales its gradient by `factor` (LSQ's step-size gradient scale)."""
    return _GradScale.apply(x, factor)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, *,
                  clip_grad: bool = True) -> torch.Tensor:
    """Quantize-dequantize: `round(clamp(x / scale, qmin, qmax)) * scale`.

    `scale` broadcasts against `x` (per-tensor: a scalar; per-channel: shape (C, 1, 1, 1) for a
    conv weight). Gradients: straight through inside the clipping range, zero outside it (the
    clamp blocks them), or, with `clip_grad=False` (a fixed scale only), straight through
    everywhere; `scale` receives the LSQ gradient when it requires one.
    """
    if not clip_grad:
        if scale.requires_grad:
            raise ValueError("clip_grad=False needs a fixed scale (a learned one takes LSQ's "
                             "gradient, which clips)")
        return _FakeQuantizePassAll.apply(x, scale, qmin, qmax)
    # Clamping before rounding gives the same values and makes the gradient mask exactly
    # qmin <= x / scale <= qmax.
    if not scale.requires_grad:
        return _FakeQuantize.apply(x, scale, qmin, qmax)
    return round_ste(torch.clamp(x / scale, qmin, qmax)) * scale


@torch.no_grad()
def mse_optimal_scale(x: torch.Tensor, qmin: int, qmax: int, *, dim: int | None = None,
                      grid: int = 40, min_ratio: float = 0.3) -> torch.Tensor:
    """Scale minimising ||Q(x) - x||^2 over clipping thresholds `ratio * max|x|`.

    Args:
        x: values to quantize.
        qmin, qmax: the integer grid.
        dim: channel dimension for one scale per channel; None for one scale in all.
        grid: number of candidate ratios between `min_ratio` and 1.
        min_ratio: smallest clipping ratio tried.

    Returns a scale shaped to broadcast against `x` (per-channel) or a 0-d tensor.
    """
    if dim is None:
        flat = x.reshape(1, -1)
    else:
        flat = x.transpose(0, dim).reshape(x.shape[dim], -1)
    # For an unsigned grid the threshold is the max; for a signed one the max magnitude.
    top = flat.amax(1) if qmin == 0 else flat.abs().amax(1)
    top = top.clamp_min(1e-8)
    best_err = torch.full_like(top, float("inf"))
    best = top / qmax
    for ratio in torch.linspace(min_ratio, 1.0, grid).tolist():
        scale = top * ratio / qmax
        q = torch.clamp(torch.round(flat / scale[:, None]), qmin, qmax) * scale[:, None]
        err = (q - flat).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    if dim is None:
        return best.reshape(())
    shape = [1] * x.dim()
    shape[dim] = -1
    return best.reshape(shape)
