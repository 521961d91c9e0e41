"""What a quantized model weighs when stored: one function, used by the solver and by export.

Stored per quantized layer: the weight packed at `w_bits` bits (rounded up to whole bytes per
layer), one float32 scale per output channel, the float32 bias (a folded BN always makes one),
and one float32 scale plus a byte of signedness per activation quantizer. Everything else the
model keeps (layers left in float, BN that was not folded) is stored as float32.
"""

from __future__ import annotations

from torch import nn

from .quant.modules import ActQuantizer, QuantConv, _QuantLayer

__all__ = ["fp32_parameter_bytes", "weight_bytes"]

FLOAT_BYTES = 4
ACT_QUANT_BYTES = FLOAT_BYTES + 1


def fp32_parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters in float32: the reference for compression ratios."""
    return sum(p.numel() for p in model.parameters()) * FLOAT_BYTES


def weight_bytes(qmodel: nn.Module) -> int:
    """Stored size in bytes of a prepared (fake-quantized) model."""
    total = 0
    counted: set[int] = set()
    for module in qmodel.modules():
        if isinstance(module, _QuantLayer):
            w = module.layer.weight
            out_channels = w.shape[0]
            if module.w_bits is not None:
                total += -(-w.numel() * module.w_bits // 8) + out_channels * FLOAT_BYTES
            else:
                total += w.numel() * FLOAT_BYTES
            has_bias = module.layer.bias is not None or (
                isinstance(module, QuantConv) and module.bn is not None)
            total += out_channels * FLOAT_BYTES if has_bias else 0
            counted.update(id(p) for p in module.parameters())
            if module.input_quant is not None:
                total += ACT_QUANT_BYTES
        elif isinstance(module, ActQuantizer) and id(module.scale) not in counted:
            total += ACT_QUANT_BYTES  # a standalone quantizer (at an addition or concatenation)
            counted.add(id(module.scale))
    for p in qmodel.parameters():
        if id(p) not in counted:
            total += p.numel() * FLOAT_BYTES
            counted.add(id(p))
    return total
