"""What a quantized model weighs when stored: one set of functions, used by the solver, QAT
metrics and export.

Stored per quantized layer: the weight packed at `w_bits` bits (rounded up to whole bytes per
layer), one float32 scale per output channel, the float32 bias (a folded BN always makes one),
and one float32 scale plus a byte of signedness per activation quantizer. Everything else the
model keeps (layers left in float, BN that was not folded, standalone activation quantizers)
is stored as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .quant.modules import ActQuantizer, QuantConv, _QuantLayer

__all__ = ["LayerShape", "fp32_parameter_bytes", "layer_bytes", "layer_shapes", "weight_bytes"]

FLOAT_BYTES = 4
ACT_QUANT_BYTES = FLOAT_BYTES + 1


@dataclass(frozen=True)
class LayerShape:
    """What the size of one quantizable layer depends on."""

    numel: int
    out_channels: int
    has_bias: bool


def layer_bytes(shape: LayerShape, w_bits: int | None, a_bits: int | None) -> int:
    """Stored bytes of one layer at the given bits (None: float)."""
    if w_bits is None:
        total = shape.numel * FLOAT_BYTES
    else:
        total = -(-shape.numel * w_bits // 8) + shape.out_channels * FLOAT_BYTES
    total += shape.out_channels * FLOAT_BYTES if shape.has_bias else 0
    return total + (ACT_QUANT_BYTES if a_bits is not None else 0)


def fp32_parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters in float32: the reference for compression ratios."""
    return sum(p.numel() for p in model.parameters()) * FLOAT_BYTES


def _shape_of(layer: _QuantLayer) -> LayerShape:
    w = layer.layer.weight
    has_bias = layer.layer.bias is not None or (isinstance(layer, QuantConv)
                                                and layer.bn is not None)
    return LayerShape(w.numel(), w.shape[0], has_bias)


def layer_shapes(qmodel: nn.Module) -> tuple[dict[str, LayerShape], int]:
    """Shapes of a prepared model's quantized layers, and the bytes of everything else."""
    shapes, counted, fixed = {}, set(), 0
    for name, module in qmodel.named_modules():
        if isinstance(module, _QuantLayer):
            shapes[name] = _shape_of(module)
            counted.update(id(p) for p in module.parameters())
        elif isinstance(module, ActQuantizer) and id(module.scale) not in counted:
            fixed += ACT_QUANT_BYTES  # a standalone quantizer (at an addition or concatenation)
            counted.add(id(module.scale))
    for p in qmodel.parameters():
        if id(p) not in counted:
            fixed += p.numel() * FLOAT_BYTES
            counted.add(id(p))
    return shapes, fixed


def weight_bytes(qmodel: nn.Module) -> int:
    """Stored size in bytes of a prepared (fake-quantized) model."""
    shapes, fixed = layer_shapes(qmodel)
    layers = dict(qmodel.named_modules())
    return fixed + sum(layer_bytes(shape, layers[name].w_bits, layers[name].a_bits)
                       for name, shape in shapes.items())
