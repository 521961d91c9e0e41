"""`model.mpq`: writing, checking and reading the packed model file, where a b-bit weight takes
at most b bits. Its layout is `mpq.mpqformat`'s; the file's size is
`mpq.size.Footprint.of(qmodel, meta).bytes(...)` exactly. A truncated or altered file fails its
length or checksum test with a `UsageError`; it never loads as a wrong model.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..files import write_atomic
from ..mpqformat import (CRC, MAGIC, MPQ_VERSION, PREFIX, READS, header_bytes, header_of,
                         stored_parts)
from ..pack import pack, packed_size, unpack
from ..quant import Plan, QuantConfig, freeze_bn_, quantizable_layers, weight_range
from ..quant.modules import QuantConv, _QuantLayer, full_range_int8_weights_

__all__ = ["MPQ_VERSION", "header_bytes", "int_bias", "int_weight", "is_mpq_file", "load_mpq",
           "read_mpq", "save_mpq"]


def int_weight(layer: _QuantLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer weight (int8 tensor) and per-channel float32 scale the layer computes with."""
    w = layer.effective_weight().detach().float()
    q = layer.weight_quant
    scale = q.compute_scale(w, layer.scale_unit()).float()
    k = q.integers(w, scale).to(torch.int8)
    return k, scale.flatten()


@torch.no_grad()
def int_bias(layer: _QuantLayer, w_scale: torch.Tensor, call: int = 0):
    """The layer's bias as the int32 values and per-channel step its call `call` computes
    with, or None when its bias stays float (no bias, no quantized input, or a value beyond
    int32)."""
    bias, step = _layer_bias(layer), layer.bias_step(w_scale, call)
    if bias is None or step is None:
        return None
    k = torch.round(bias / step)  # float32, as the fake-quantized layer rounds it
    if k.abs().max() >= 2 ** 31 - 1:
        return None
    return k.to(torch.int32), step.float()


def _layer_bias(layer: _QuantLayer) -> torch.Tensor | None:
    bias = layer.folded_bias() if isinstance(layer, QuantConv) else layer.layer.bias
    return None if bias is None else bias.detach().float()


def _f32(t: torch.Tensor) -> bytes:
    return t.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes()


def _payload(qmodel: nn.Module) -> bytes:
    layers, acts, rest = stored_parts(qmodel)
    chunks = []
    for layer in layers.values():
        if layer.w_bits is not None:
            k, scale = int_weight(layer)
            lo, hi = weight_range(layer.w_bits)
            if MPQ_VERSION >= 3 and (int(k.min()) < lo or int(k.max()) > hi):
                raise ValueError(f"a {layer.w_bits}-bit weight of this file version lies in "
                                 f"[{lo}, {hi}]; this layer's reach {int(k.min())}..{int(k.max())}")
            chunks += [pack(k.numpy(), layer.w_bits), _f32(scale)]
        else:
            chunks.append(_f32(layer.effective_weight()))
        bias = _layer_bias(layer)
        if bias is not None:
            chunks.append(_f32(bias))
    for q in acts.values():
        chunks += [_f32(q.scale.reshape(1)), bytes([int(bool(q.signed))])]
    chunks += [_f32(t) for t in rest.values()]
    return b"".join(chunks)


def save_mpq(path: str | os.PathLike, qmodel: nn.Module, meta: dict) -> int:
    """Writes the packed file for a prepared model (eval mode); returns its size in bytes.

    `meta` holds `model` ({"name", "num_classes"}), `input_size` and `normalization`.
    """
    qmodel.eval()
    head, payload = header_of(meta, qmodel), _payload(qmodel)
    body = PREFIX.pack(MAGIC, MPQ_VERSION, len(head), len(payload)) + head + payload
    data = body + CRC.pack(zlib.crc32(body))
    write_atomic(path, data)
    return len(data)


def is_mpq_file(path: str | os.PathLike) -> bool:
    """Whether `path` starts with the model.mpq signature (False where it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_mpq(path: str | os.PathLike) -> tuple[dict, bytes, int]:
    """The header, payload and format version of a `model.mpq` file, after checking its length
    and checksum."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    data = path.read_bytes()
    what = f"{path} is not a valid mpq model file"
    if len(data) < PREFIX.size + CRC.size or data[:4] != MAGIC:
        raise UsageError(f"{what} (no MPQ signature); export one with `python -m mpq export`")
    _, version, n_header, n_payload = PREFIX.unpack_from(data)
    if version not in READS:
        raise UsageError(f"{path} is mpq model format version {version}; this mpq reads "
                         f"versions {', '.join(map(str, READS))}")
    expected = PREFIX.size + n_header + n_payload + CRC.size
    if len(data) != expected:
        raise UsageError(f"{what}: it has {len(data)} bytes where its header announces "
                         f"{expected} (truncated or appended to); export it again")
    (crc,) = CRC.unpack_from(data, expected - CRC.size)
    if zlib.crc32(data[:expected - CRC.size]) != crc:
        raise UsageError(f"{what}: checksum mismatch (the file is corrupted); export it again")
    start = PREFIX.size
    try:
        header = json.loads(data[start:start + n_header])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what}: unreadable header ({exc})") from None
    return header, data[start + n_header:expected - CRC.size], version


class _Reader:
    def __init__(self, payload: bytes, path):
        self.payload, self.pos, self.path = payload, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.payload):
            raise UsageError(f"{self.path}: the payload is shorter than the model it describes "
                             f"(written by another version of the model code?)")
        chunk = self.payload[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def floats(self, like: torch.Tensor | tuple) -> torch.Tensor:
        shape = tuple(like.shape) if isinstance(like, torch.Tensor) else like
        n = int(np.prod(shape)) if shape else 1
        return torch.from_numpy(np.frombuffer(self.take(4 * n), dtype="<f4").copy()).reshape(shape)


def _plan_from_header(header: dict, names: list[str], path) -> Plan:
    w, a = header.get("w_bits", ""), header.get("a_bits", "")
    if len(w) != len(names) or len(a) != len(names):
        raise UsageError(f"{path} describes {len(w)} quantizable layers but the model "
                         f"{header['model'].get('name')!r} has {len(names)}")
    parse = (lambda c: None if c == "-" else int(c))
    return Plan(model=header["model"]["name"],
                layers={n: {"w_bits": parse(wc), "a_bits": parse(ac)}
                        for n, wc, ac in zip(names, w, a)})


@torch.no_grad()
def load_mpq(path: str | os.PathLike, *, architecture=None, expect_model: str | None = None,
             allow_factory: bool = False) -> tuple[nn.Module, dict]:
    """Rebuilds the fake-quantized model a `model.mpq` file holds, and its header.

    The model computes exactly what the exported model computed: weights on their grid with
    their stored scales (weight quantizers in `fixed` mode), BN folded, stored activation scales.

    Args:
        architecture: `architecture(num_classes=...)` builds the bare FP32 model; by default
            the header's model name does (`mpq.models.build_model`: registry names and
            `package.module:factory`).
        expect_model: the model name the caller expects; a file of another is refused, and a
            `package.module:factory` it names is built.
        allow_factory: build a `package.module:factory` the header names even when the
            caller named none: that imports the module and calls the factory, so only for a
            file you trust (`mpq.models.check_factory_allowed`).
    """
    from ..checkpoint import check_payload
    from ..models import build_model, check_factory_allowed
    from ..quant import prepare_qat

    header, payload, version = read_mpq(path)
    check_payload(header, source=str(path),
                  require=("input_size", "normalization", "w_bits", "a_bits"))
    spec = header["model"]
    if expect_model is not None and spec["name"] != expect_model:
        raise UsageError(f"{path} holds a {spec['name']!r} model, but {expect_model!r} was "
                         f"expected; pass a file of that architecture")
    if architecture is None:
        check_factory_allowed(spec["name"], source=str(path), expect_model=expect_model,
                              allow_factory=allow_factory)
        architecture = (lambda num_classes: build_model(spec["name"], num_classes=num_classes))
    model = architecture(num_classes=spec["num_classes"])
    plan = _plan_from_header(header, quantizable_layers(model), path)
    size = header["input_size"]
    config = QuantConfig(weight_scale="fixed", quantize_joins=header.get("quantize_joins", True))
    qmodel = prepare_qat(model, plan, example_inputs=(torch.zeros(2, 3, size, size),),
                         config=config).eval()
    freeze_bn_(qmodel)
    if version < 3:
        full_range_int8_weights_(qmodel)  # the grid those versions wrote 8-bit weights on
    layers, acts, rest = stored_parts(qmodel)
    reader = _Reader(payload, path)
    dense = version >= 2  # version 1 bit-packed every width
    for layer in layers.values():
        w = layer.layer.weight
        if layer.w_bits is not None:
            k = unpack(reader.take(packed_size(w.numel(), layer.w_bits, dense=dense)),
                       layer.w_bits, w.numel(), dense=dense)
            scale = reader.floats((w.shape[0],))
            layer.weight_quant.scale.copy_(scale)
            layer.weight_quant.initialized.fill_(True)
            w.copy_(torch.from_numpy(k).float().reshape(w.shape)
                    * scale.reshape((-1,) + (1,) * (w.dim() - 1)))
        else:
            w.copy_(reader.floats(w))
        if layer.layer.bias is not None or getattr(layer, "bn", None) is not None:
            bias = reader.floats((w.shape[0],))
            target = layer.bn.bias if getattr(layer, "bn", None) is not None else layer.layer.bias
            target.copy_(bias)
    for q in acts.values():
        q.scale.copy_(reader.floats((1,)).reshape(()))
        q.signed.fill_(bool(reader.take(1)[0]))
        q.calibrated.fill_(True)
    for t in rest.values():
        t.copy_(reader.floats(t))
    if reader.pos != len(payload):
        raise UsageError(f"{path}: {len(payload) - reader.pos} payload bytes left over after "
                         f"the model was filled (written for another model?)")
    return qmodel, header
