"""Command-line plumbing shared by `train.py`, `search.py` and `python -m mpq`."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import UsageError

__all__ = ["add_common_args", "main", "run_cli"]


def run_cli(fn: Callable[[], object]) -> None:
    """Runs a script body; a `UsageError` becomes one line on stderr and exit code 2."""
    from .export.run import ExportCheckFailed
    from .trainer import TrainingDiverged

    try:
        fn()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (TrainingDiverged, ExportCheckFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; the last completed epoch's checkpoint is kept", file=sys.stderr)
        sys.exit(130)


def add_common_args(parser: argparse.ArgumentParser, *, recipe: bool = True) -> None:
    if recipe:
        parser.add_argument("--set", dest="overrides", action="append", default=[],
                            metavar="KEY=VALUE",
                            help="override a recipe value, e.g. train.epochs=3 (repeatable)")
    parser.add_argument("--data-root", default=None,
                        help="data folder (ImageFolder train/ + test/ or val/, or torchvision's "
                             "CIFAR-10); default: $MPQ_DATA, else download CIFAR-10")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _eval(args) -> None:
    import torch

    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .config import DataConfig, recipe_from_dict
    from .data import BatchLoader, load_split
    from .trainer import evaluate, resolve_device

    device = resolve_device(args.device)
    from .export.mpqfile import is_mpq_file

    if is_mpq_file(args.checkpoint):  # a packed model.mpq: the model it rebuilds exactly
        from .export import load_mpq

        model, payload = load_mpq(args.checkpoint)
        model = model.to(device)
        # any ImageFolder or CIFAR-10 root; with no root, CIFAR-10 is downloaded
        data_cfg = DataConfig(image_size=payload["input_size"])
    else:
        payload = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(payload, path=args.checkpoint).to(device)
        data_cfg = recipe_from_dict(payload["recipe"]["data"], DataConfig)
    data_cfg.mean = payload["normalization"]["mean"]
    data_cfg.std = payload["normalization"]["std"]
    split = load_split(data_cfg, "test", root=args.data_root,
                       num_classes=payload["model"]["num_classes"], progress=not args.quiet)
    loader = BatchLoader(split, data_cfg, batch_size=args.batch_size, train=False, device=device)
    with torch.inference_mode():
        result = evaluate(model, loader)
    print(f"images={len(split)} loss={result['loss']:.4f}")
    print(f"top1={result['top1']:.2f}")


def _export(args) -> None:
    from .export.run import export_checkpoint

    report = export_checkpoint(args.checkpoint, args.out, data_root=args.data_root,
                               force=args.force, batch_size=args.batch_size,
                               progress=not args.quiet, reencode_int8=args.reencode_int8)
    print_export(report, args.out)


def print_export(report: dict, out) -> None:
    """The lines `python -m mpq export` and `train.py` print after an export."""
    files = report["files"]
    moved = report.get("reencoded_int8")
    if moved:
        print(f"re-encoded {len(moved['layers'])} 8-bit layers onto [-64, 64] (fake-quant "
              f"top-1 before: {moved['fake_quant_top1_before']:.2f})")
    print(f"wrote {out}: model.mpq {files['model.mpq']['bytes']} bytes "
          f"({report['compression']:.2f}x smaller than FP32), model_int8.onnx "
          f"{files['model_int8.onnx']['bytes']} bytes, model_int8.pt, export.json")
    if "onnx_top1" in report:
        print(f"fake_quant_top1={report['fake_quant_top1']:.2f} "
              f"torch_int8_top1={report['torch_int8_top1']:.2f} "
              f"(agreement {report['torch_int8_agreement']:.2f}%)")
        print(f"onnx_top1={report['onnx_top1']:.2f} "
              f"(agreement {report['onnx_agreement']:.2f}%)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mpq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="top-1 of any mpq checkpoint, or a packed model.mpq, on "
                                     "the test split")
    ev.add_argument("--checkpoint", required=True,
                    help="FP32 or QAT checkpoint (.pt), or a packed model.mpq")
    ev.add_argument("--batch-size", type=int, default=500)
    add_common_args(ev, recipe=False)
    ex = sub.add_parser("export", help="int8 ONNX, PyTorch int8 and packed model.mpq from a QAT "
                                       "checkpoint or a model.mpq, checked on the test split")
    ex.add_argument("--checkpoint", required=True,
                    help="QAT checkpoint (train.py --plan/--bits), or a packed model.mpq")
    ex.add_argument("--reencode-int8", action="store_true",
                    help="move 8-bit layers written on the full [-127, 127] grid (model.mpq "
                         "versions 1-2, older QAT checkpoints) onto [-64, 64], which no CPU's "
                         "int8 kernels can saturate; export.json records the top-1 before")
    ex.add_argument("--out", required=True, help="folder for the exported files")
    ex.add_argument("--force", action="store_true", help="replace an existing export there")
    ex.add_argument("--batch-size", type=int, default=500)
    add_common_args(ex, recipe=False)
    args = parser.parse_args(argv)
    run_cli(lambda: {"eval": _eval, "export": _export}[args.command](args))
