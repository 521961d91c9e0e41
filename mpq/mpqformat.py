"""The `model.mpq` format: what a prepared model stores, in which order, and what each part
weighs. The floor under sizing (`mpq.size`) and the file's reader and writer
(`mpq.export.mpqfile`), so both agree by construction.

Layout (little-endian):

    magic      4 bytes  b"MPQ\\x01"
    version    uint16   3 (versions 1 and 2 still load: see `READS`)
    header     uint32   length of the JSON header that follows
    payload    uint64   length of the payload that follows the header
    JSON header         {"format", "model", "input_size", "normalization", "w_bits", "a_bits",
                         "quantize_joins"}: enough to rebuild the model's graph
    payload             the parts of `stored_parts`, in order:
                        per quantized layer: its weight as `w_bits`-bit integers packed by
                        `mpq.pack` (1.6 bits each at 2 bits, 2.82 at 3; float32 if the weight
                        stays float), float32 scales (one per output channel), float32 bias
                        (a folded BN always makes one);
                        per activation quantizer: float32 scale, one byte of signedness;
                        every other floating tensor (layers left in float, BN that was not
                        folded) as float32
    crc32      uint32   of everything before it

`w_bits` / `a_bits` are one character per quantizable layer (in `quantizable_layers` order):
the bit width, or `-` for float, so the header's length does not depend on the plan. 8-bit
weights lie in [-64, 64] (`mpq.quant.weight_range`), stored as 8 bits each.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch
from torch import nn

from .pack import packed_size
from .quant.modules import ActQuantizer, QuantConv, _QuantLayer
from .quant.prepare import quantization_of

__all__ = ["ACT_QUANT_BYTES", "CRC", "FLOAT_BYTES", "LayerShape", "MAGIC", "MPQ_VERSION",
           "PREFIX", "READS", "header_bytes", "header_of", "layer_bytes", "shape_of",
           "stored_parts"]

MAGIC = b"MPQ\x01"
MPQ_VERSION = 3
# Version 1 bit-packed weights at every width (`mpq.pack`'s dense=False); versions 1 and 2 put
# 8-bit weights on the full [-127, 127] grid, which saturates int16 on x86 CPUs without VNNI
# (the export refuses to build int8 models from such a file; see `mpq.export.overflow`).
READS = (1, 2, 3)
PREFIX = struct.Struct("<4sHIQ")
CRC = struct.Struct("<I")
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


def _bits_string(bits) -> str:
    return "".join("-" if b is None else str(b) for b in bits)


def header_of(meta: dict, qmodel: nn.Module) -> bytes:
    """The JSON header of a prepared model's file; `meta` holds `model`, `input_size` and
    `normalization`."""
    quantization = quantization_of(qmodel)
    names = list(quantization.layers)
    settings = quantization.plan.resolve(names)
    fields = {"format": "mpq.model", "model": meta["model"], "input_size": meta["input_size"],
              "normalization": meta["normalization"],
              "w_bits": _bits_string(settings[n].w_bits for n in names),
              "a_bits": _bits_string(settings[n].a_bits for n in names),
              "quantize_joins": quantization.config.quantize_joins}
    return json.dumps(fields, separators=(",", ":")).encode()


def header_bytes(meta: dict, qmodel: nn.Module) -> int:
    """Bytes of a `model.mpq` file that are not payload (prefix, header, checksum)."""
    return PREFIX.size + len(header_of(meta, qmodel)) + CRC.size
