"""Runtimes timed side by side, interleaved, so a noisy shared machine slows all of them alike
and the ratios hold (the results table and the benchmarks)."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

__all__ = ["cpu_summary", "openvino_runner", "openvino_version", "ort_runner", "side_by_side"]

# The instruction sets that decide which int8 kernels a runtime can use on x86.
_INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def side_by_side(runtimes: dict, x, *, seconds: float = 3.0, rounds: int = 5) -> dict:
    """Milliseconds per call of each `fn(x)` in `runtimes`, measured in `rounds` rounds that
    visit every runtime in turn, about `seconds` of calls per runtime in all: the lowest of a
    runtime's per-round medians, so outside load that covers some of its rounds but not all
    moves no figure (a pooled median moved once it covered half of them)."""
    for fn in runtimes.values():
        for _ in range(2):
            fn(x)
    samples = {name: [[] for _ in range(rounds)] for name in runtimes}
    for r in range(rounds):
        for name, fn in runtimes.items():
            start = time.perf_counter()
            while True:
                t = time.perf_counter()
                fn(x)
                samples[name][r].append((time.perf_counter() - t) * 1000)
                if time.perf_counter() - start >= seconds / rounds and len(samples[name][r]) >= 2:
                    break
    return {name: min(statistics.median(v) for v in per_round)
            for name, per_round in samples.items()}


def ort_runner(path, threads: int):
    """`fn(x)` running an ONNX model (input `input`) in ONNX Runtime with `threads` threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x.numpy()})


def openvino_runner(path, threads: int, *, precision: str | None = "f32"):
    """`fn(x)` running an ONNX model (input `input`; read through
    `mpq.export.openvino_ir.openvino_model`) or an OpenVINO IR in OpenVINO's CPU plugin with
    `threads` threads, set up for each batch size as OpenVINO advises: at batch 1 the
    latency hint, one request; above it the throughput hint, the batch split across the
    parallel requests it recommends (one per stream) and run asynchronously (one request with
    the latency hint where the batch does not split evenly). Each is compiled for its static
    shape on the first call of that batch size.

    `precision` is that of the graph's float parts: "f32", "bf16", or None for OpenVINO's
    default, which is bf16 on CPUs with native bf16 (so an FP32 model's figure would be bf16's).
    Raises ImportError when openvino is not installed (`pip install 'mpq[openvino]'`).
    """
    import numpy as np
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    core = ov.Core()
    base = {props.inference_num_threads: threads}
    if precision:
        base[hints.inference_precision] = getattr(ov.Type, precision)

    from .export.openvino_ir import openvino_model

    def compiled_for(batch: int, mode, streams: int | None = None):
        model = openvino_model(path)
        shape = model.input(0).get_partial_shape()
        shape[0] = batch
        model.reshape(shape)
        config = {**base, hints.performance_mode: mode}
        if streams:
            config[props.num_streams] = streams
        return core.compile_model(model, "CPU", config)

    def latency(batch: int):
        request = compiled_for(batch, hints.PerformanceMode.LATENCY).create_infer_request()
        return lambda x: request.infer({0: x}, share_inputs=True)[0]

    def throughput(batch: int):
        jobs = compiled_for(batch, hints.PerformanceMode.THROUGHPUT).get_property(
            props.optimal_number_of_infer_requests)
        if batch % jobs:
            return latency(batch)
        queue = ov.AsyncInferQueue(compiled_for(batch // jobs, hints.PerformanceMode.THROUGHPUT,
                                                streams=jobs), jobs)
        parts = [None] * jobs
        queue.set_callback(lambda request, i: parts.__setitem__(
            i, request.get_output_tensor(0).data.copy()))

        def run(x):  # (B, C, H, W) -> jobs requests of (B / jobs, C, H, W), in parallel
            for i, part in enumerate(np.split(x, jobs)):
                queue.start_async({0: part}, userdata=i, share_inputs=True)
            queue.wait_all()
            return np.concatenate(parts)
        return run

    runners = {}

    def run(x):
        x = np.ascontiguousarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float32)
        batch = x.shape[0]
        if batch not in runners:
            runners[batch] = latency(batch) if batch == 1 else throughput(batch)
        return runners[batch](x)
    return run


def openvino_version() -> str | None:
    """OpenVINO's version, or None when it is not installed (it is optional: mpq[openvino])."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__.split("-")[0]


def cpu_summary() -> str:
    """This CPU's model name and which of the int8-relevant instruction sets it has, e.g.
    "AMD EPYC (avx2 yes, avx512_vnni yes, amx_int8 no, ...)"; Linux reads /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    have = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in _INT8_FLAGS)
    family = (f", family {fields['cpu family']} model {fields['model']}"
              if "cpu family" in fields and "model" in fields else "")
    return f"{fields.get('model name', platform.machine())}{family} ({have})"
