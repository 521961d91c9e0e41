"""The export stage: from a fake-quantized model to `model.mpq`, `model_int8.onnx`,
`model_int8.pt` and `export.json`, checked against the fake-quantized model on the test set.

The int8 models are built from the model *rebuilt out of `model.mpq`*, so the packed file is
proven to hold everything they need, and only once `mpq.export.overflow` has proven that no CPU's
int8 kernels can saturate on them. Files are written to a temporary folder and moved into
place at the end; an existing export is replaced only with `force`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..files import file_sha256, write_atomic
from ..models import build_model
from ..quant import quantization_of
from ..size import fp32_parameter_bytes, weight_bytes
from ..timing import openvino_version
from .mpqfile import MPQ_VERSION, load_mpq, save_mpq
from .onnx_qdq import export_onnx
from .openvino_ir import OPENVINO_FILES, openvino_predict, require_openvino, save_openvino_ir
from .overflow import Int8OverflowRisk, check_int8_overflow, reencode_int8_
from .torch_int8 import save_torch_int8

__all__ = ["EXPORT_FILES", "ExportCheckFailed", "export_is_current", "export_model"]

EXPORT_FILES = ("model.mpq", "model_int8.onnx", "model_int8.pt", "export.json")
MIN_AGREEMENT = 99.5   # % of test images where the exported model's top-1 equals fake-quant's
MAX_TOP1_DROP = 0.2    # points


class ExportCheckFailed(RuntimeError):
    """An exported model disagrees with the fake-quantized one beyond the tolerances."""


def export_is_current(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> bool:
    """Whether `out_dir` holds an export of exactly this checkpoint (by its sha256)."""
    report = Path(out_dir) / "export.json"
    if not report.is_file():
        return False
    recorded = json.loads(report.read_text()).get("checkpoint_sha256")
    return recorded == file_sha256(Path(checkpoint))


@torch.no_grad()
def _predictions(fn, batches) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    for x, y in batches:
        preds.append(np.asarray(fn(x)).argmax(1))
        labels.append(y.cpu().numpy())
    return np.concatenate(preds), np.concatenate(labels)


def export_model(qmodel: nn.Module, meta: dict, out_dir: str | os.PathLike, *,
                 test_batches=None, force: bool = False, extra: dict | None = None,
                 threads: int | None = None, architecture=None,
                 resize: int | None = None, openvino: bool = False) -> dict:
    """Exports a fake-quantized model and checks the exports on `test_batches`.

    Args:
        qmodel: a prepared model (from `prepare_qat`, QAT-trained), on the CPU.
        meta: `model` ({"name", "num_classes"}), `input_size`, `normalization` (0..1 units).
        resize: the shorter side evaluation images are resized to before the centre crop
            (default the input size), recorded in `export.json` for other runtimes.
        out_dir: where the files go (created).
        test_batches: (input, label) CPU batches, iterable more than once (a list or a
            loader); None skips the accuracy check.
        force: replace an existing export.
        extra: more fields for `export.json` (e.g. the plan's budget).
        threads: ONNX Runtime threads for the check.
        architecture: builds the bare FP32 model, `architecture(num_classes=...)`; by default
            `meta["model"]["name"]` through `mpq.models.build_model`.
        openvino: also write the int8 model as an OpenVINO IR (`model_int8.xml` and `.bin`,
            needs `mpq[openvino]`), checked as the other int8 models are.
    Returns the content of `export.json`. Raises `ExportCheckFailed` when an int8 kernel could
    saturate on some CPU (nothing written), or (after writing the files) when an exported model
    misses the tolerances.
    """
    import onnxruntime as ort

    out = Path(out_dir)
    existing = [name for name in EXPORT_FILES + OPENVINO_FILES if (out / name).exists()]
    if existing and not force:
        raise UsageError(f"{out} already holds an export ({', '.join(existing)}); pass --force "
                         f"to replace it, or choose another --out")
    if openvino:
        require_openvino()  # before anything is written
    qmodel = qmodel.cpu().eval()
    size = meta["input_size"]
    shape = (3, size, size)
    tmp = out / ".export.tmp"
    out_existed = out.exists()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        check_int8_overflow(qmodel)
    except Int8OverflowRisk as exc:
        shutil.rmtree(tmp)
        if not out_existed:
            out.rmdir()
        raise ExportCheckFailed(f"export refused, nothing written: {exc}") from None
    mpq_bytes = save_mpq(tmp / "model.mpq", qmodel, meta)
    expected = weight_bytes(qmodel, meta)
    if mpq_bytes != expected:  # the size the solver budgets with is the size on disk
        raise AssertionError(f"model.mpq has {mpq_bytes} bytes, mpq.size says {expected}")
    rebuilt, _ = load_mpq(tmp / "model.mpq", architecture=architecture,
                          expect_model=meta["model"]["name"])  # the caller's meta names it
    overflow = check_int8_overflow(rebuilt)  # what the int8 models are built from
    export_onnx(rebuilt, tmp / "model_int8.onnx", input_shape=shape)
    int8 = save_torch_int8(rebuilt, tmp / "model_int8.pt", input_shape=shape)
    written = EXPORT_FILES + (OPENVINO_FILES if openvino else ())
    if openvino:
        save_openvino_ir(tmp / "model_int8.onnx", tmp / "model_int8.xml")

    plan = quantization_of(qmodel).plan
    build = architecture or (lambda num_classes: build_model(meta["model"]["name"],
                                                             num_classes=num_classes))
    fp32_bytes = fp32_parameter_bytes(build(num_classes=meta["model"]["num_classes"]))
    report = {
        "format": "mpq.export", "version": 1, "mpq_file_version": MPQ_VERSION,
        "model": meta["model"],
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "channels": "RGB",
                  "shape": list(shape), "resize": resize or shape[-1],
                  "preprocess": "RGB; if not size x size: resize the shorter side to resize "
                                "(bilinear) and centre-crop size x size; x / 255; "
                                "(x - mean) / std"},
        "normalization": meta["normalization"],
        "output": {"name": "logits", "shape": ["batch", meta["model"]["num_classes"]]},
        "plan": plan.to_dict(),
        "files": {name: {"bytes": (tmp / name).stat().st_size,
                         "sha256": file_sha256(tmp / name)}
                  for name in written if name != "export.json"},
        "mpq_bytes": mpq_bytes, "fp32_bytes": fp32_bytes,
        "compression": fp32_bytes / mpq_bytes,
        "plan_size_bytes": (plan.extra or {}).get("size_bytes"),
        "int8_overflow_proof": overflow,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                     **({"openvino": openvino_version()} if openvino else {})},
        **(extra or {}),
    }
    failures = []
    if test_batches is not None:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(tmp / "model_int8.onnx"), opts,
                                       providers=["CPUExecutionProvider"])
        fq, labels = _predictions(lambda x: qmodel(x).numpy(), test_batches)
        runs = {"onnx": lambda x: session.run(None, {"input": x.numpy()})[0],
                "torch_int8": lambda x: int8(x).numpy()}
        if openvino:
            predict = openvino_predict(tmp / "model_int8.xml", threads=threads)
            runs["openvino"] = lambda x: predict(x.numpy())
        report["test_images"] = int(len(labels))
        report["fake_quant_top1"] = float((fq == labels).mean() * 100)
        for name, fn in runs.items():
            pred, _ = _predictions(fn, test_batches)
            top1 = float((pred == labels).mean() * 100)
            agreement = float((pred == fq).mean() * 100)
            report[f"{name}_top1"], report[f"{name}_agreement"] = top1, agreement
            if agreement < MIN_AGREEMENT or report["fake_quant_top1"] - top1 > MAX_TOP1_DROP:
                failures.append(f"{name}: top-1 {top1:.2f} against fake-quant "
                                f"{report['fake_quant_top1']:.2f}, agreement {agreement:.2f}%")
        report["checks"] = {"min_agreement": MIN_AGREEMENT, "max_top1_drop": MAX_TOP1_DROP,
                            "passed": not failures, "failures": failures}
    write_atomic(tmp / "export.json", json.dumps(report, indent=2) + "\n")
    for name in written:
        os.replace(tmp / name, out / name)
    for name in set(OPENVINO_FILES) - set(written):  # a replaced export's IR is not this one
        (out / name).unlink(missing_ok=True)
    tmp.rmdir()
    if failures:
        raise ExportCheckFailed(f"export check failed ({'; '.join(failures)}); the files are "
                                f"in {out} for inspection")
    return report



def test_batches_for(payload: dict, *, data_root=None, batch_size: int = 500,
                     progress: bool = True):
    """A loader of the test split of a checkpoint's (or a model.mpq's) data set: CPU batches
    normalised its way, again on every pass."""
    from ..checkpoint import data_config
    from ..data import load_split, make_loader

    data_cfg = data_config(payload)
    split = load_split(data_cfg, "test", root=data_root, classes=payload.get("classes"),
                       num_classes=payload["model"]["num_classes"], progress=progress)
    # the loader, not its batches: each pass decodes or normalises again, so a test split the
    # size of ImageNet's never sits in memory as float32
    return make_loader(split, data_cfg, batch_size=batch_size, train=False,
                       device=torch.device("cpu"))


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                      data_root=None, force: bool = False, batch_size: int = 500,
                      progress: bool = True, reencode_int8: bool = False,
                      expect_model: str | None = None, allow_factory: bool = False,
                      openvino: bool = False) -> dict:
    """`export_model` for a QAT checkpoint (it carries its plan) or a packed `model.mpq`,
    checked on its test split. With `reencode_int8`, 8-bit layers on the full [-127, 127] grid
    are moved onto the portable one first (`reencode_int8_`), and `export.json` records which,
    with the fake-quantized top-1 before; with `openvino`, an OpenVINO IR too (`export_model`).
    `expect_model` and `allow_factory` are `mpq.checkpoint.model_from_checkpoint`'s: a
    `package.module:factory` the file names is built only when the caller names it or trusts
    the file."""
    from ..checkpoint import check_payload, data_config, load_checkpoint, model_from_checkpoint
    from .mpqfile import is_mpq_file

    trust = {"expect_model": expect_model, "allow_factory": allow_factory}

    if is_mpq_file(checkpoint):  # any ImageFolder or CIFAR-10 root at the file's input size
        qmodel, payload = load_mpq(checkpoint, **trust)
        qat_top1 = None
    else:
        payload = load_checkpoint(checkpoint)
        if payload.get("kind") != "qat":
            raise UsageError(f"{checkpoint} is an FP32 checkpoint; export needs a QAT "
                             f"checkpoint (train.py --teacher {checkpoint} --bits 8, or --plan "
                             f"PLAN.json) or a packed model.mpq")
        check_payload(payload, source=f"checkpoint {checkpoint}",
                      require=("input_size", "normalization"))  # what the export records
        qmodel = model_from_checkpoint(payload, path=checkpoint, **trust)
        qat_top1 = (payload.get("metrics") or {}).get("top1")
    meta = {key: payload[key] for key in ("model", "input_size", "normalization")}
    batches = test_batches_for(payload, data_root=data_root, batch_size=batch_size,
                               progress=progress)
    extra = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(Path(checkpoint)),
             "qat_top1": qat_top1}
    if reencode_int8:
        qmodel = qmodel.cpu().eval()
        before, labels = _predictions(lambda x: qmodel(x).numpy(), batches)
        layers = reencode_int8_(qmodel)
        extra["reencoded_int8"] = {"layers": layers,
                                   "fake_quant_top1_before": float((before == labels).mean()
                                                                   * 100)}
    return export_model(qmodel, meta, out_dir, test_batches=batches, force=force, extra=extra,
                        resize=data_config(payload).resize, openvino=openvino)
