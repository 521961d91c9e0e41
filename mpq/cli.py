"""Command-line plumbing shared by `train.py`, `search.py` and `python -m mpq`."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Callable

from .errors import UsageError

__all__ = ["Parser", "add_common_args", "check_out_dir", "main", "positive_int", "run_cli"]


class Parser(argparse.ArgumentParser):
    """argparse with bad arguments as one line on stderr (exit code 2), like every other bad
    input, instead of the usage block and then the error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def run_cli(fn: Callable[[], object], *,
            interrupted: str = "the last checkpoint (end of an epoch, or every "
                               "train.checkpoint_minutes) is kept; run the same command to "
                               "resume") -> None:
    """Runs a script body; a `UsageError` becomes one line on stderr and exit code 2, Ctrl-C
    one line saying what was kept (`interrupted`) and exit code 130."""
    from .export.run import ExportCheckFailed
    from .trainer import TrainingDiverged

    try:
        fn()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            FileExistsError) as exc:  # the file system refused: the user's to fix, not a bug
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(f"error: {exc.strerror}: {exc.filename or ''}; free space or write elsewhere",
              file=sys.stderr)
        sys.exit(2)
    except (TrainingDiverged, ExportCheckFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted; {interrupted}", file=sys.stderr)
        sys.exit(130)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_out_dir(path) -> None:
    """Refuses, before any work, an output folder that cannot be one: an existing file, a path
    under a file, or a place this user cannot write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is an existing file, not a folder; choose a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {path} lies under {parent}, which is a file; choose a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: {parent} is not writable by this user; choose a "
                         f"folder you can write")


def _add_allow_factory(parser: argparse.ArgumentParser) -> None:
    """`--allow-factory`, for commands that rebuild a model from a file without a recipe."""
    parser.add_argument("--allow-factory", action="store_true",
                        help="build the package.module:factory model the file names: that "
                             "imports its module and calls it, so only for files you trust "
                             "(registry and torchvision models need no flag)")


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

    from .checkpoint import data_config, load_checkpoint, model_from_checkpoint
    from .data import load_split, make_loader
    from .device import resolve_device
    from .trainer import evaluate

    device = resolve_device(args.device)
    from .export.mpqfile import is_mpq_file

    if is_mpq_file(args.checkpoint):  # a packed model.mpq: the model it rebuilds exactly
        from .export import load_mpq

        model, payload = load_mpq(args.checkpoint, allow_factory=args.allow_factory)
        model = model.to(device)
    else:
        payload = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(payload, path=args.checkpoint,
                                      allow_factory=args.allow_factory).to(device)
    data_cfg = data_config(payload)
    split = load_split(data_cfg, args.split, root=args.data_root, classes=payload.get("classes"),
                       num_classes=payload["model"]["num_classes"], progress=not args.quiet)
    loader = make_loader(split, data_cfg, batch_size=args.batch_size, train=False, device=device)
    with torch.inference_mode():
        result = evaluate(model, loader)
    print(f"split={args.split} images={len(split)} loss={result['loss']:.4f}")
    print(f"top1={result['top1']:.2f}")


def _wrap(args) -> None:
    from .checkpoint import fp32_payload, load_teacher, model_meta, save_checkpoint
    from .config import load_recipe, recipe_to_dict

    if Path(args.out).exists() and not args.force:
        raise UsageError(f"{args.out} exists; pass --force to replace it")
    recipe = load_recipe(args.recipe, args.overrides)
    spec = recipe.model
    payload = fp32_payload(args.state_dict, model_name=spec.name, num_classes=spec.num_classes,
                           allow_pickle=args.allow_pickle)
    model = load_teacher(args.state_dict, model_name=spec.name, num_classes=spec.num_classes,
                         normalization={"mean": list(recipe.data.mean),
                                        "std": list(recipe.data.std)}, payload=payload)
    save_checkpoint(args.out, {**model_meta(recipe), "kind": "fp32",
                               "state_dict": model.state_dict(), "epoch": -1, "metrics": {},
                               "recipe": recipe_to_dict(recipe),
                               "source": str(payload.get("source", args.state_dict))})
    print(f"wrote {args.out}: {spec.name} with {spec.num_classes} classes and the recipe's data "
          f"section (normalization {recipe.data.mean} / {recipe.data.std})")


def _export(args) -> None:
    from .export.run import export_checkpoint

    check_out_dir(args.out)
    report = export_checkpoint(args.checkpoint, args.out, data_root=args.data_root,
                               force=args.force, batch_size=args.batch_size,
                               progress=not args.quiet, reencode_int8=args.reencode_int8,
                               allow_factory=args.allow_factory, openvino=args.openvino)
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
    if "openvino_top1" in report:
        print(f"openvino_top1={report['openvino_top1']:.2f} "
              f"(agreement {report['openvino_agreement']:.2f}%)")
    if "onnx_top1" in report:
        print(f"fake_quant_top1={report['fake_quant_top1']:.2f} "
              f"torch_int8_top1={report['torch_int8_top1']:.2f} "
              f"(agreement {report['torch_int8_agreement']:.2f}%)")
        print(f"onnx_top1={report['onnx_top1']:.2f} "
              f"(agreement {report['onnx_agreement']:.2f}%)")


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m mpq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="top-1 of any mpq checkpoint, or a packed model.mpq, on "
                                     "the test split")
    ev.add_argument("--checkpoint", required=True,
                    help="FP32 or QAT checkpoint (.pt), or a packed model.mpq")
    ev.add_argument("--split", choices=("test", "train"), default="test",
                    help="the split to evaluate; train: the training images as the test ones "
                         "are seen (no augmentation), to tell underfitting from overfitting")
    ev.add_argument("--batch-size", type=positive_int, default=500)
    _add_allow_factory(ev)
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
    ex.add_argument("--openvino", action="store_true",
                    help="also write an OpenVINO IR (model_int8.xml/.bin, needs "
                         "pip install 'mpq[openvino]'), checked like the other int8 models")
    ex.add_argument("--batch-size", type=positive_int, default=500)
    _add_allow_factory(ex)
    add_common_args(ex, recipe=False)
    wr = sub.add_parser("wrap", help="an mpq FP32 checkpoint from a plain state dict (or "
                                     "torchvision:<Weights>) and the recipe it belongs to")
    wr.add_argument("--state-dict", required=True,
                    help="torch.save(model.state_dict()) file, or torchvision:<Weights>")
    wr.add_argument("--recipe", required=True, help="recipe naming the model and its data")
    wr.add_argument("--out", required=True, help="checkpoint file to write")
    wr.add_argument("--force", action="store_true", help="replace an existing file")
    wr.add_argument("--allow-pickle", action="store_true",
                    help="also read a whole pickled nn.Module (torch.save(model)): this runs "
                         "code from the file, so only for files you trust")
    wr.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    args = parser.parse_args(argv)
    run_cli(lambda: {"eval": _eval, "export": _export, "wrap": _wrap}[args.command](args))
