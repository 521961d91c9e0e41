"""What a quantized model weighs when stored: one set of functions, used by the solver, the
search, QAT metrics and export (`model.mpq` is laid out by `stored_parts`, and its size on disk
is `weight_bytes(qmodel, meta)` exactly).

Stored per quantized layer: the weight packed at `w_bits` bits (rounded up to whole bytes per
layer; 8-bit weights take 8 bits for their 129 levels, see `mpq.quant.weight_range`), one float32 scale per output channel, and the float32 bias (a folded BN always makes
one); a layer whose weight stays in float stores it as float32. Per activation quantizer: a
float32 scale and a byte of signedness. Every other floating tensor the model needs at inference
(layers left in float, BN that was not folded) is stored as float32. With `meta`, the header of
the `model.mpq` file counts too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .pack import packed_size
from .quant.modules import ActQuantizer, QuantConv, _QuantLayer

__all__ = ["LayerShape", "fp32_parameter_bytes", "layer_bytes", "layer_shapes", "stored_parts",
           "weight_bytes"]

FLOAT_BYTES = 4
ACT_QUANT_BYTES = FLOAT_BYTES + 1


@dataclass(frozen=True)
class LayerShape:
    """What the size of one quantizable layer depends on."""

    numel: int
    out_channels: int
    has_bias: bool


def layer_bytes(shape: LayerShape, w_bits: int | None) -> int:
    """Stored bytes of one layer with its weight at `w_bits` bits (None: float)."""
    if w_bits is None:
        total = shape.numel * FLOAT_BYTES
    else:
        total = packed_size(shape.numel, w_bits) + shape.out_channels * FLOAT_BYTES
    return total + (shape.out_channels * FLOAT_BYTES if shape.has_bias else 0)


def fp32_parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters in float32: the reference for compression ratios."""
    return sum(p.numel() for p in model.parameters()) * FLOAT_BYTES


def shape_of(layer: _QuantLayer) -> LayerShape:
    w = layer.layer.weight
    has_bias = layer.layer.bias is not None or (isinstance(layer, QuantConv)
                                                and layer.bn is not None)
    return LayerShape(w.numel(), w.shape[0], has_bias)


def stored_parts(qmodel: nn.Module) -> tuple[dict[str, _QuantLayer], dict[str, ActQuantizer],
                                             dict[str, torch.Tensor]]:
    """What a prepared model stores, in a fixed order: its quantized layers, its activation
    quantizers (both by module name) and every other floating tensor it needs (by state-dict
    key)."""
    layers, acts, owned = {}, {}, set()
    for name, module in qmodel.named_modules():
        if isinstance(module, (_QuantLayer, ActQuantizer)):
            (layers if isinstance(module, _QuantLayer) else acts)[name] = module
            owned.update(t.data_ptr() for t in module.state_dict().values())
    # By storage, not by name: a BN folded into a conv may still be reachable at its old path.
    rest = {}
    for key, t in qmodel.state_dict().items():
        if t.is_floating_point() and t.data_ptr() not in owned:
            owned.add(t.data_ptr())
            rest[key] = t
    return layers, acts, rest


def layer_shapes(qmodel: nn.Module, meta: dict | None = None) -> tuple[dict[str, LayerShape], int]:
    """Shapes of a prepared model's quantized layers, and the bytes of everything else
    (activation quantizers, float tensors, and with `meta` the `model.mpq` header)."""
    layers, acts, rest = stored_parts(qmodel)
    fixed = len(acts) * ACT_QUANT_BYTES + sum(t.numel() for t in rest.values()) * FLOAT_BYTES
    if meta is not None:
        from .export.mpqfile import header_bytes

        fixed += header_bytes(meta, qmodel)
    return {name: shape_of(m) for name, m in layers.items()}, fixed


def weight_bytes(qmodel: nn.Module, meta: dict | None = None) -> int:
    """Stored size in bytes of a prepared model; with `meta`, the exact size of its
    `model.mpq` file."""
    shapes, fixed = layer_shapes(qmodel, meta)
    layers = dict(qmodel.named_modules())
    return fixed + sum(layer_bytes(shape, layers[name].w_bits) for name, shape in shapes.items())
