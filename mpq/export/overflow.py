"""A static proof that the int8 kernels of every CPU compute the same integers for a model.

Int8 runtimes multiply uint8 activations by int8 weights. VNNI, AMX and ARM's dot-product
instructions accumulate in int32, but x86 kernels without VNNI (ONNX Runtime's and fbgemm's
AVX2 and AVX-512BW paths) first add two adjacent products in int16 with saturation
(VPMADDUBSW); which two are adjacent depends on the kernel's packing. So for every layer that
runs as an int8 kernel and every output channel, this checks over the input's whole integer
range that the largest and smallest sum of *any* two products stay in int16, and that the whole
dot product stays in int32. Where that holds, no kernel path can saturate.

A model whose 8-bit weights use the full [-127, 127] grid (model.mpq versions 1-2, older QAT
checkpoints) fails the proof; `reencode_int8_` moves those layers onto +-INT8_WEIGHT_MAX.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import INT8_WEIGHT_MAX, mse_optimal_scale, weight_range
from ..quant.modules import _QuantLayer
from .graph import act_params
from .mpqfile import int_weight

__all__ = ["INT16", "INT32", "Int8OverflowRisk", "check_int8_overflow", "int8_layer_bounds",
           "layer_bounds", "reencode_int8_"]

INT16 = (-2 ** 15, 2 ** 15 - 1)
INT32 = (-2 ** 31, 2 ** 31 - 1)


class Int8OverflowRisk(RuntimeError):
    """An int8 kernel could saturate on some CPU: its integer results would depend on the CPU."""


def layer_bounds(k: torch.Tensor, lo: int, hi: int) -> dict:
    """Extremes over inputs in [lo, hi] (uint8 values) of any two products and of the whole dot
    product, for integer weights `k` (out_channels, ...), worst output channel."""
    k = k.flatten(1).long()
    big = torch.where(k > 0, k * hi, k * lo)     # the largest each product can be
    small = torch.where(k > 0, k * lo, k * hi)   # and the smallest
    n = min(2, k.shape[1])
    return {"pair_max": int(big.topk(n, dim=1).values.sum(1).max()),
            "pair_min": int(small.topk(n, dim=1, largest=False).values.sum(1).min()),
            "dot_max": int(big.sum(1).max()), "dot_min": int(small.sum(1).min())}


def int8_layer_bounds(qmodel: nn.Module):
    """(name, input range (lo, hi), integer weights, `layer_bounds`) of every call of a layer
    with a quantized weight and a quantized input: what the exporters turn into int8 kernels."""
    for name, layer in qmodel.named_modules():
        if not isinstance(layer, _QuantLayer) or layer.w_bits is None:
            continue
        k = None
        for call, quant in enumerate(layer.input_quants):
            if quant is None:
                continue
            _, _, lo, hi = act_params(quant)
            k = int_weight(layer)[0] if k is None else k
            yield (f"{name} (call {call + 1})" if call else name), (lo, hi), k, \
                layer_bounds(k, lo, hi)


def check_int8_overflow(qmodel: nn.Module) -> dict:
    """Proves every int8 layer (`int8_layer_bounds`) safe from int16 and int32 saturation;
    returns the record for `export.json`. Raises `Int8OverflowRisk` naming the first layer
    where the proof fails."""
    worst = {"pair_max": 0, "pair_min": 0, "dot_max": 0, "dot_min": 0}
    checked = 0
    for name, (lo, hi), k, b in int8_layer_bounds(qmodel):
        if not (INT16[0] <= b["pair_min"] and b["pair_max"] <= INT16[1]
                and INT32[0] <= b["dot_min"] and b["dot_max"] <= INT32[1]):
            raise Int8OverflowRisk(
                f"layer {name!r} could saturate an int8 kernel: with inputs in [{lo}, {hi}] two "
                f"of its products can sum to {b['pair_max']} or {b['pair_min']}, outside int16 "
                f"[{INT16[0]}, {INT16[1]}], so x86 CPUs without VNNI would compute other "
                f"values than the rest; its weights reach |k| = {int(k.abs().max())}. Retrain it "
                f"with this mpq (8-bit weights keep within +-{INT8_WEIGHT_MAX}), or export it "
                f"with --reencode-int8 to move its 8-bit layers onto that grid")
        checked += 1
        worst = {key: (max if key.endswith("max") else min)(worst[key], b[key]) for key in worst}
    return {"holds": True, "int8_layers": checked, "int16": list(INT16), **worst}


@torch.no_grad()
def reencode_int8_(qmodel: nn.Module) -> list[str]:
    """Moves every 8-bit layer whose weights may leave +-INT8_WEIGHT_MAX onto that grid, with
    a new MSE-optimal scale per channel for the weight it computes with; returns their names.
    The model then computes slightly other values: measure it again."""
    lo, hi = weight_range(8)
    moved = []
    for name, layer in qmodel.named_modules():
        if not isinstance(layer, _QuantLayer) or layer.w_bits != 8:
            continue
        q = layer.weight_quant
        if (q.qmin, q.qmax) == (lo, hi):
            continue
        w = layer.effective_weight().detach()
        q.qmin, q.qmax = lo, hi
        q.scale.copy_(mse_optimal_scale(w, lo, hi, dim=0).flatten())
        q.mode = "fixed"  # the scale just chosen, as a model rebuilt from its file uses
        moved.append(name)
    return moved
