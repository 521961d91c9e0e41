"""A plan's latency on this CPU in one int8 runtime: a per-layer table, measured, cached, and
checked against whole models.

In every int8 runtime mpq exports to, weights of 2..8 bits run on the same int8 kernels (a
narrower weight is an int8 tensor on a coarser grid), so a plan's latency does not depend on
its weight bits. An input activation below 8 bits does: it puts a Clip before its
QuantizeLinear, which ONNX Runtime and PyTorch do not fuse into the int8 conv before it (the
W4A4 row runs 3.0-3.9x slower there; OpenVINO runs it at the same speed). So the table is,
measured on whole exported models side by side: `base_ms`, every layer's input at 8 bits; and
per layer the change when that layer's input alone is narrower (`narrow_ms`). For the ONNX
runtimes each of those models is the base's ONNX graph with a Clip, QuantizeLinear and
DequantizeLinear of its own put before that layer (`_narrowed`: what the exporter writes for a
layer whose input takes other bits than its tensor's other consumers), so one export serves
every layer. A plan is predicted as base plus the changes of its narrow layers, a linear cost
the solver takes exactly; `validation` records how far that prediction is from whole models
measured beside it (interactions are not additive).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .files import write_atomic

__all__ = ["LATENCY_RUNTIMES", "LatencyTable", "latency_table", "measure_plans"]

LATENCY_RUNTIMES = ("onnxruntime", "openvino", "torch")
WIDE = 8  # the activation width every int8 kernel fuses


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds per batch of `batch` images in `runtime` with `threads` threads on `cpu`."""

    runtime: str
    batch: int
    threads: int
    cpu: str
    base_ms: float
    narrow_ms: Mapping[str, float]
    narrow_bits: int
    validation: list = field(default_factory=list)
    versions: Mapping[str, str] = field(default_factory=dict)

    def layer(self, name: str, w_bits: int | None, a_bits: int | None) -> float:
        """What `name` adds to `base_ms` at these bits (0 with an 8-bit input)."""
        if w_bits is None or a_bits is None:
            raise ValueError(f"the latency table covers int8 layers only; {name} is in float "
                             f"(w_bits {w_bits}, a_bits {a_bits})")
        return self.narrow_ms[name] if a_bits < WIDE else 0.0

    def total(self, w_bits: Mapping[str, int | None], a_bits: Mapping[str, int | None]) -> float:
        return self.base_ms + sum(self.layer(n, w_bits[n], a_bits[n]) for n in self.narrow_ms)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.runtime}, batch {self.batch}, {self.threads} thread(s), {self.cpu}"


def _runner(runtime: str, path: Path, threads: int):
    from .timing import openvino_runner, ort_runner

    if runtime == "onnxruntime":
        return ort_runner(path, threads)
    if runtime == "openvino":
        return openvino_runner(path, threads)
    model = torch.jit.load(str(path))

    def run(x):
        torch.set_num_threads(threads)
        with torch.no_grad():
            return model(x)
    return run


def _export(model: nn.Module, plan, runtime: str, path: Path, *, example_inputs: tuple,
            calibration) -> Path:
    """The int8 model `runtime` runs for `plan` (weights as calibrated, BN folded)."""
    from .export.onnx_qdq import export_onnx
    from .export.torch_int8 import save_torch_int8
    from .quant import calibrate_, freeze_bn_, prepare_qat

    q = prepare_qat(model, plan, example_inputs=example_inputs)
    calibrate_(q, calibration)
    freeze_bn_(q)
    q.eval()
    shape = tuple(example_inputs[0].shape[1:])
    if runtime == "torch":
        save_torch_int8(q, path.with_suffix(".pt"), input_shape=shape)
        return path.with_suffix(".pt")
    export_onnx(q, path.with_suffix(".onnx"), input_shape=shape)
    return path.with_suffix(".onnx")


def _const(graph, name: str):
    """The value of an initializer or Constant node output `name` of an ONNX graph."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def _narrowed(model_proto, layer: str, bits: int):
    """A copy of the QDQ ONNX model `model_proto` in which every call of `layer` reads its
    input through a Clip to a `bits`-bit grid and a QuantizeLinear/DequantizeLinear of its own,
    as the exporter writes a layer whose input is narrower than 8 bits."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(model_proto)
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    weight = f"{layer}.weight_int8"
    def weight_of(node) -> str | None:  # through a Transpose or Reshape to the int8 weight
        source = producer.get(node.input[1]) if len(node.input) > 1 else None
        while source is not None and source.op_type in ("Transpose", "Reshape", "Identity"):
            source = producer.get(source.input[0])
        return source.input[0] if source is not None and source.op_type == \
            "DequantizeLinear" else None
    calls = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
             and weight_of(n) == weight]
    if not calls:
        raise ValueError(f"no conv or matmul of {layer} in the ONNX graph (no {weight})")
    added = {}
    for i, node in enumerate(calls):
        dq = producer[node.input[0]]
        q = producer[dq.input[0]]
        if dq.op_type != "DequantizeLinear" or q.op_type != "QuantizeLinear":
            raise ValueError(f"{layer}'s input is not quantized in the ONNX graph")
        scale, zero = float(_const(graph, q.input[1])), int(_const(graph, q.input[2]))
        low = -(2 ** (bits - 1)) if zero else 0  # a signed input sits at zero point 128
        tag = f"mpq_narrow_{i}_{layer}"
        graph.initializer.extend([
            numpy_helper.from_array(np.array(low * scale, np.float32), f"{tag}_lo"),
            numpy_helper.from_array(np.array((low + 2 ** bits - 1) * scale, np.float32),
                                    f"{tag}_hi")])
        added[q.name or id(q)] = added.get(q.name or id(q), []) + [
            helper.make_node("Clip", [q.input[0], f"{tag}_lo", f"{tag}_hi"], [f"{tag}_c"]),
            helper.make_node("QuantizeLinear", [f"{tag}_c", *q.input[1:]], [f"{tag}_q"]),
            helper.make_node("DequantizeLinear", [f"{tag}_q", *dq.input[1:]], [f"{tag}_dq"])]
        node.input[0] = f"{tag}_dq"
    # each new chain goes right after the QuantizeLinear it copies: the graph stays sorted
    order = []
    for node in graph.node:
        order.append(node)
        order += added.get(node.name or id(node), [])
    del graph.node[:]
    graph.node.extend(order)
    onnx.checker.check_model(proto)
    return proto


def measure_plans(model: nn.Module, plans: Mapping[str, object], *, runtime: str, batch: int,
                  threads: int, example_inputs: tuple, calibration, seconds: float = 1.0,
                  progress: bool = False, narrowed: Mapping[str, tuple] | None = None
                  ) -> dict[str, float]:
    """Median milliseconds per batch of each plan's exported int8 model, all timed side by
    side (interleaved rounds, so a busy machine slows all alike). `narrowed` adds models made
    from a plan's ONNX graph without another export: name -> (plan name, layer, bits), see
    `_narrowed`."""
    import onnx
    from tqdm import tqdm

    from .timing import side_by_side

    check_runtime(runtime)
    with tempfile.TemporaryDirectory(prefix="mpq-latency-") as tmp:
        runners, paths = {}, {}
        for name, plan in tqdm(plans.items(), desc=f"exporting for {runtime}", unit="model",
                               disable=not progress, leave=False):
            paths[name] = _export(model, plan, runtime, Path(tmp) / f"m{len(paths)}",
                                  example_inputs=example_inputs, calibration=calibration)
            runners[name] = _runner(runtime, paths[name], threads)
        for name, (source, layer, bits) in (narrowed or {}).items():
            path = Path(tmp) / f"n{len(runners)}.onnx"
            onnx.save(_narrowed(onnx.load(str(paths[source])), layer, bits), str(path))
            runners[name] = _runner(runtime, path, threads)
        x = example_inputs[0][:1].expand(batch, *example_inputs[0].shape[1:]).contiguous()
        if progress:
            print(f"timing {len(runners)} models in {runtime}, {seconds:g} s each", flush=True)
        return side_by_side(runners, x, seconds=seconds, rounds=5)


def check_runtime(runtime: str) -> None:
    if runtime not in LATENCY_RUNTIMES:
        raise UsageError(f"search.latency_runtime must be one of {', '.join(LATENCY_RUNTIMES)}; "
                         f"got {runtime!r}")
    if runtime == "openvino":
        from .export.openvino_ir import require_openvino

        require_openvino()


def _versions(runtime: str) -> dict[str, str]:
    out = {"torch": torch.__version__}
    if runtime == "onnxruntime":
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    elif runtime == "openvino":
        from .timing import openvino_version

        out["openvino"] = openvino_version()
    return out


def latency_table(model: nn.Module, model_name: str, layers: list[str], *, runtime: str,
                  batch: int, threads: int, narrow_bits: int | None, example_inputs: tuple,
                  calibration, cache_dir: Path | None, key: Mapping, seconds: float = 1.0,
                  progress: bool = False) -> LatencyTable:
    """The latency table of `model` (FP32, eval) in `runtime`, cached on disk under `cache_dir`
    by `key` (the checkpoint), the layers, the runtime and its version, the batch, the threads
    and this CPU. With `narrow_bits` None no layer's input can be narrowed: only `base_ms` is
    measured. Two more models check the table: every layer narrow, and every other one."""
    from .quant import uniform_plan
    from .timing import cpu_summary

    check_runtime(runtime)
    threads = threads or os.cpu_count() or 1
    cpu, versions = cpu_summary(), _versions(runtime)
    full_key = {**key, "version": 1, "model": model_name, "layers": layers, "runtime": runtime,
                "versions": versions, "batch": batch, "threads": threads, "cpu": cpu,
                "narrow_bits": narrow_bits, "input": list(example_inputs[0].shape[1:])}
    digest = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir / f"latency-{digest}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        return LatencyTable(**json.loads(path.read_text())["table"])

    def plan(narrow: set[str]):
        p = uniform_plan(model_name, layers, w_bits=8, a_bits=WIDE)
        for n in narrow:
            p.layers[n] = {"w_bits": 8, "a_bits": narrow_bits}
        return p
    plans, checks, narrowed = {"base": plan(set())}, {}, {}
    if narrow_bits is not None:
        if runtime == "torch":  # TorchScript: one export per layer
            plans.update({n: plan({n}) for n in layers})
        else:
            narrowed = {n: ("base", n, narrow_bits) for n in layers}
        checks = {"every layer narrow": set(layers), "every other layer narrow": set(layers[::2])}
        plans.update({name: plan(narrow) for name, narrow in checks.items()})
    ms = measure_plans(model, plans, runtime=runtime, batch=batch, threads=threads,
                       example_inputs=example_inputs, calibration=calibration, seconds=seconds,
                       progress=progress, narrowed=narrowed)
    base = ms["base"]
    narrow = {n: ms[n] - base for n in layers} if narrow_bits is not None else \
        dict.fromkeys(layers, 0.0)
    validation = []
    for name, layers_narrow in checks.items():
        predicted = base + sum(narrow[n] for n in layers_narrow)
        validation.append({"plan": name, "measured_ms": ms[name], "predicted_ms": predicted,
                           "relative_error": (predicted - ms[name]) / ms[name]})
    table = LatencyTable(runtime=runtime, batch=batch, threads=threads, cpu=cpu, base_ms=base,
                         narrow_ms=narrow, narrow_bits=narrow_bits or WIDE,
                         validation=validation, versions=versions)
    if path is not None:
        write_atomic(path, json.dumps({"key": full_key, "table": table.to_dict()}, indent=2))
    return table
