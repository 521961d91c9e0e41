"""Every finished row's latency, measured side by side: batch 1 and 256, each row's runtimes
(ONNX Runtime, PyTorch, and OpenVINO where it is installed), rebuilding from committed files
what a fresh clone lacks."""

from __future__ import annotations

import warnings

import torch

from mpq.timing import openvino_runner, openvino_version, ort_runner, side_by_side
from .compute import ao_int8_ptq, fp32_onnx
from .layout import Layout

__all__ = ["latency", "runtime_ranges"]


def _models_to_time(layout: Layout, rows: dict, data_root, *,
                    openvino: bool = False) -> tuple[dict, list]:
    """Each row's model files to time, by runtime ("<row>/onnxruntime", "<row>/pytorch", with
    `openvino` also "<row>/openvino": the same ONNX files ONNX Runtime times), and the ones
    rebuilt because their run's folder is gone (a fresh clone keeps only the committed
    artifacts). Rebuilt: the FP32 ONNX from the teacher, torch.ao's int8 model from the same
    calibration batches, each exported row's PyTorch int8 model from its committed `model.mpq`
    (which computes what the exported model computed)."""
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.errors import UsageError
    from mpq.export.mpqfile import load_mpq
    from mpq.export.torch_int8 import save_torch_int8

    files, rebuilt = {}, []
    for name, row in rows.items():
        if name == "fp16":
            continue
        if name == "fp32":
            path = layout.runs / name / "model_fp32.onnx"
            if not path.exists():
                fp32_onnx(model_from_checkpoint(load_checkpoint(layout.teacher)).eval(), path)
                rebuilt.append(f"{name}/onnxruntime")
            files[f"{name}/onnxruntime"] = path
        elif name == "ao_int8_ptq":
            path = layout.runs / name / "model_int8.pt"
            if not path.exists():
                try:
                    ao_int8_ptq(layout, model_from_checkpoint(
                        load_checkpoint(layout.teacher)).eval(), data_root, path)
                except UsageError as exc:  # no calibration data on this machine
                    print(f"  cannot rebuild {name} to time it: {exc}", flush=True)
                    continue
                rebuilt.append(f"{name}/pytorch")
            files[f"{name}/pytorch"] = path
        else:
            export = layout.in_repo(row["export_dir"])
            if not export.exists():  # a fresh clone: the committed artifacts
                export = layout.artifacts / name
            if (export / "model_int8.onnx").exists():
                files[f"{name}/onnxruntime"] = export / "model_int8.onnx"
            path, mpq_file = export / "model_int8.pt", export / "model.mpq"
            if not path.exists() and mpq_file.exists():
                path = layout.runs / name / "rebuilt" / "model_int8.pt"
                # rebuilt again when the committed model.mpq is newer (a pulled retrained row)
                if not path.exists() or path.stat().st_mtime < mpq_file.stat().st_mtime:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    qmodel, header = load_mpq(mpq_file)
                    size = header["input_size"]
                    save_torch_int8(qmodel, path, input_shape=(3, size, size))
                    rebuilt.append(f"{name}/pytorch")
            if path.exists():
                files[f"{name}/pytorch"] = path
    if openvino:  # OpenVINO reads the QDQ and FP32 ONNX models directly: timed beside ORT
        paired = {}
        for key, path in files.items():
            paired[key] = path
            if key.endswith("/onnxruntime"):
                paired[key.replace("/onnxruntime", "/openvino")] = path
        files = paired
    return files, rebuilt


def latency(layout: Layout, rows: dict, threads: int, seconds: float,
            data_root=None) -> tuple[dict, list]:
    """Milliseconds at batch 1 and 256 of each row's runtimes, measured side by side, and the
    runtimes whose model files had to be rebuilt first (see `_models_to_time`)."""
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(threads)
    torch.backends.quantized.engine = "x86"
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.load's notice
    openvino = openvino_version()
    if openvino is None:
        print("  openvino not installed (pip install 'mpq[openvino]'): OpenVINO not timed",
              flush=True)
    files, rebuilt = _models_to_time(layout, rows, data_root, openvino=openvino is not None)
    if rebuilt:
        print(f"  rebuilt to time them (their {layout.rel(layout.runs)}/ files are gone): "
              f"{', '.join(rebuilt)}", flush=True)
    runtimes = {}
    if "fp32" in rows:
        model = model_from_checkpoint(load_checkpoint(layout.teacher)).eval()
        model = model.to(memory_format=torch.channels_last)
        runtimes["fp32/pytorch"] = lambda x, m=model: m(
            x.contiguous(memory_format=torch.channels_last))
    load = {"onnxruntime": ort_runner, "openvino": openvino_runner,
            "pytorch": lambda path, _: torch.jit.load(str(path))}
    for key, path in files.items():
        runtimes[key] = load[key.split("/")[1]](path, threads)
    missing = [name for name in rows if name != "fp16"
               and not any(k.startswith(f"{name}/") for k in runtimes)]
    if missing:
        print(f"  no model to time for {', '.join(missing)}; their latency cells stay empty",
              flush=True)
    out = {}
    for batch in (1, 256):
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            out[str(batch)] = side_by_side(runtimes, x, seconds=seconds)
        print(f"  batch {batch}: " + ", ".join(f"{k} {v:.2f} ms"
                                               for k, v in out[str(batch)].items()), flush=True)
    for line in runtime_ranges(out):
        print(f"  {line}", flush=True)
    return out, rebuilt


def runtime_ranges(lat: dict) -> list[str]:
    """Per batch, each int8 runtime's fastest and slowest over the exported rows, and the
    fastest FP32 runtime: the README's "which runtime" table."""
    lines = []
    for batch, times in lat.items():
        spans = {}
        for key, ms in times.items():
            row, runtime = key.split("/")
            if row not in ("fp32", "ao_int8_ptq"):
                spans.setdefault(runtime, []).append(ms)
        fp32 = {k.split("/")[1]: v for k, v in times.items() if k.startswith("fp32/")}
        cells = [f"{rt} int8 {min(v):.2f}-{max(v):.2f} ms ({len(v)} rows)"
                 for rt, v in sorted(spans.items())]
        if fp32:
            best = min(fp32, key=fp32.get)
            cells.append(f"best FP32 {fp32[best]:.2f} ms ({best})")
        lines.append(f"batch {batch}: " + "; ".join(cells))
    return lines
