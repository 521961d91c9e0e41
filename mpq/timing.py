"""Runtimes timed side by side, interleaved, so a noisy shared machine slows all of them alike
and the ratios hold (the results table and the benchmarks)."""

from __future__ import annotations

import statistics
import time

__all__ = ["ort_runner", "side_by_side"]


def side_by_side(runtimes: dict, x, *, seconds: float = 3.0, rounds: int = 5) -> dict:
    """Median milliseconds per call of each `fn(x)` in `runtimes`, measured in `rounds` rounds
    that visit every runtime in turn, about `seconds` of calls per runtime in all."""
    for fn in runtimes.values():
        for _ in range(2):
            fn(x)
    samples = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, fn in runtimes.items():
            start = time.perf_counter()
            while True:
                t = time.perf_counter()
                fn(x)
                samples[name].append((time.perf_counter() - t) * 1000)
                if time.perf_counter() - start >= seconds / rounds and len(samples[name]) >= 2:
                    break
    return {name: statistics.median(v) for name, v in samples.items()}


def ort_runner(path, threads: int):
    """`fn(x)` running an ONNX model (input `input`) in ONNX Runtime with `threads` threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x.numpy()})
