"""Error-compensating rounding of the weights before QAT (`qat.weight_init: gptq`).

Round-to-nearest puts each weight on its grid alone. GPTQ (Frantar et al. 2023, after Optimal
Brain Quantization) rounds one input column at a time and moves the columns not yet rounded to
cancel the error the rounded one caused in the layer's output, using H = X X^T of the layer's
inputs X on calibration images: the post-training solution QAT then starts from. Layers are
rounded in order, each seeing the inputs the layers before it now produce.

The rounding is of the weight the layer quantizes (folded with its BN), at the scale its
quantizer gives, and the layer's own weight is set so that the folded weight lies exactly on
those integers: the student computes, from its first step, the rounded model measured here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantConv, QuantLinear, _QuantLayer

__all__ = ["gptq_round", "gptq_init_", "input_hessian"]


@torch.no_grad()
def gptq_round(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, qmin: int,
               qmax: int, *, damp: float = 0.01) -> torch.Tensor:
    """Integers for `w` (C, D) on the grid `scale` (C,) x [qmin, qmax] that keep `w @ X` close
    to the float layer's for inputs whose `X X^T` is `hessian` (D, D). Columns are rounded in
    decreasing order of their input energy (GPTQ's act-order); `damp` x the mean diagonal is
    added to the diagonal (inputs that are never non-zero get weight 0: they change nothing)."""
    w = w.detach().double().clone()
    h = hessian.double().clone()
    d = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(d, dtype=h.dtype)
    order = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    # Upper Cholesky factor of H^-1: row i holds how the error of column i spreads to the
    # columns after it once the columns before it are fixed.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = scale.detach().double().reshape(-1)
    k = torch.empty_like(w)
    for i in range(d):
        col = w[:, i]
        k[:, i] = torch.clamp(torch.round(col / s), qmin, qmax)
        err = (col - k[:, i] * s) / u[i, i]
        w[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
    out = torch.empty_like(k)
    out[:, order] = k
    return out.to(hessian.dtype)


_CHUNK = 1 << 24  # unfolded input values handled at once (64 MB of float32)


def _kernel_area(layer: _QuantLayer) -> int:
    return 1 if isinstance(layer, QuantLinear) else math.prod(layer.layer.kernel_size)


def _columns(layer: _QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the (D, N) matrix its weight (C, D) multiplies."""
    if isinstance(layer, QuantLinear):
        return x.reshape(-1, x.shape[-1]).T
    conv = layer.layer  # a Conv2d (`_roundable`)
    x = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                 stride=conv.stride)  # (N, D, L), D in the weight's (in, kh, kw) order
    return x.transpose(0, 1).reshape(x.shape[1], -1)


@torch.no_grad()
def input_hessian(model: nn.Module, layer: _QuantLayer, inputs: list[torch.Tensor]) -> torch.Tensor:
    """X X^T / N of `layer`'s inputs (every call of it) as `model` in eval mode computes them
    on `inputs`."""
    acc = {"h": None, "n": 0}

    def hook(_module, args):
        x = args[0].float().contiguous()
        # A few images at a time: unfolded, a 224-pixel batch would take gigabytes.
        per_image = max(1, x[:1].numel() * _kernel_area(layer))
        for part in x.split(max(1, _CHUNK // per_image)):
            cols = _columns(layer, part)
            h = cols @ cols.T
            acc["h"] = h if acc["h"] is None else acc["h"] + h
            acc["n"] += cols.shape[1]

    handle = layer.register_forward_pre_hook(hook)
    try:
        for x in inputs:
            model(x)
    finally:
        handle.remove()
    if acc["h"] is None:
        raise ValueError("the layer was not called on the calibration inputs")
    return acc["h"] / acc["n"]


def _roundable(layer: _QuantLayer) -> bool:
    if layer.weight_quant is None or layer.weight_quant.freeze_threshold:
        return False
    if isinstance(layer, QuantConv):
        conv = layer.layer
        return conv.weight.dim() == 4 and conv.groups == 1 and conv.padding_mode == "zeros"
    return isinstance(layer, QuantLinear)


@torch.no_grad()
def gptq_init_(model: nn.Module, inputs, *, damp: float = 0.01, progress: bool = False) -> dict:
    """Rounds every quantized Linear and Conv2d weight of a calibrated, prepared `model` by
    `gptq_round` on `inputs` (a few batches of images), in the model's layer order; grouped
    (depthwise) convs keep round-to-nearest. Returns {layer name: (output error of nearest,
    of gptq)}, each the mean squared error of the layer's output against the float weight's on
    the calibration inputs, relative to the output's mean square."""
    from tqdm import tqdm

    from .prepare import quant_layers

    inputs = [x[0] if isinstance(x, (tuple, list)) else x for x in inputs]
    was_training = model.training
    model.eval()
    errors = {}
    try:
        layers = [(n, m) for n, m in quant_layers(model).items() if _roundable(m)]
        for name, layer in tqdm(layers, desc="gptq rounding", disable=not progress):
            h = input_hessian(model, layer, inputs)
            wf = layer.effective_weight().clone()
            q = layer.weight_quant
            scale = q.compute_scale(wf, layer.scale_unit()).reshape(-1)
            flat = wf.reshape(wf.shape[0], -1)
            k = gptq_round(flat, h, scale, q.qmin, q.qmax, damp=damp)
            nearest = layer.quant_weight(wf).reshape(flat.shape)
            new = k * scale[:, None]
            unit = layer.scale_unit()  # the live BN's fold, which effective_weight applies
            if unit is not None:
                new = new / unit[:, None]
            layer.layer.weight.copy_(new.reshape(wf.shape))
            if q.mode == "mse":
                # The clipping ratio for the rounded weight: 1 wherever a channel reaches the
                # grid's end, so the scale is the one rounded to (else as training would set it).
                q.refresh_ratio(layer.effective_weight())
            now = layer.quant_weight(layer.effective_weight()).reshape(flat.shape)
            errors[name] = (_output_error(flat, nearest, h), _output_error(flat, now, h))
    finally:
        model.train(was_training)
    return errors


def _output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    # E||(W - Wq) x||^2 / E||W x||^2 over the inputs whose second moment is h.
    d = (w - wq).double()
    hd = h.double()
    return float(torch.einsum("cd,de,ce->", d, hd, d) /
                 torch.einsum("cd,de,ce->", w.double(), hd, w.double()).clamp_min(1e-30))
