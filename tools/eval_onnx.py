"""Top-1 of an exported ONNX model on an ImageFolder test split, with ONNX Runtime, Pillow and
NumPy only: no torch, no mpq. It checks that an export stands on its own.

    python tools/eval_onnx.py --export DIR --data-root ROOT [--batch-size 256]

DIR is an export folder (model_int8.onnx and export.json, from `python -m mpq export` or
train.py); ROOT holds test/ (or val/) with one folder per class, sorted by name as the model's
class indices. Preprocessing follows export.json: RGB, resize the shorter side to its `resize`
and centre-crop the input size when the image is not already that size, x / 255,
(x - mean) / std, NCHW float32.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}


def load_image(path: Path, size: int, resize: int) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size) or resize != size:
            w, h = img.size
            scale = resize / min(w, h)
            img = img.resize((max(resize, round(w * scale)), max(resize, round(h * scale))),
                             Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)


def onnxruntime_model(path: Path):
    """`predict(x) -> logits` of the ONNX model at `path` in ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other bad input (mpq.cli.Parser)
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def arguments(description: str) -> Parser:
    """The command line both evaluators share (this one and eval_openvino.py)."""
    parser = Parser(description=description)
    parser.add_argument("--export", required=True,
                        help="folder with model_int8.onnx and export.json")
    parser.add_argument("--data-root", required=True, help="ImageFolder root with test/ or val/")
    parser.add_argument("--model", default="model_int8.onnx")
    parser.add_argument("--batch-size", type=int, default=256)
    return parser


def main() -> int:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    return run(lambda: evaluate(args, onnxruntime_model, runtime="ONNX Runtime"))


def run(evaluation) -> int:
    """`evaluation()`'s exit code; a `BadInput` it raises is one line on stderr and exit 2."""
    try:
        return evaluation()
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class BadInput(Exception):
    """What the user passed cannot be used: one line on stderr, exit code 2."""


def evaluate(args, load_model, *, runtime: str) -> int:
    """Prints the images counted and the top-1 of `load_model(path)`, a `predict(x) -> logits`
    on (N, 3, H, W) float32 arrays, on the test split; `runtime` names it in errors."""
    if args.batch_size < 1:
        raise BadInput(f"--batch-size must be >= 1, got {args.batch_size}")
    export = Path(args.export)
    if not export.is_dir():
        raise BadInput(f"--export {export} is not a folder; pass an export folder (holding "
                       f"export.json and {args.model})")
    try:
        meta = json.loads((export / "export.json").read_text())
        size = meta["input"]["shape"][-1]
        resize = meta["input"].get("resize", size)  # exports before it was recorded: the size
        mean = np.array(meta["normalization"]["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.array(meta["normalization"]["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    except FileNotFoundError:
        raise BadInput(f"{export} has no export.json; export with python -m mpq export") \
            from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise BadInput(f"{export / 'export.json'} is damaged or not an mpq export ({exc!r}); "
                       f"export again") from None
    root = Path(args.data_root)
    split = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if split is None:
        raise BadInput(f"{root} has no test/ or val/ folder")
    classes = sorted(p.name for p in split.iterdir() if p.is_dir())
    files = [(f, label) for label, c in enumerate(classes)
             for f in sorted((split / c).iterdir()) if f.suffix.lower() in SUFFIXES]
    if not files:
        raise BadInput(f"{split} holds no images in class folders")
    try:
        predict = load_model(export / args.model)
    except Exception as exc:  # runtimes raise their own types for missing and malformed files
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{export / args.model} cannot be loaded by {runtime} ({first}); "
                       f"export again") from None
    correct = 0
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        images = []
        for f, _ in chunk:
            try:
                images.append(load_image(f, size, resize))
            except (OSError, ValueError, SyntaxError) as exc:
                raise BadInput(f"cannot decode image {f}: {exc}; fix or remove it") from None
        images = np.stack(images).transpose(0, 3, 1, 2)
        x = ((images.astype(np.float32) / 255 - mean) / std).astype(np.float32)
        logits = predict(x)
        correct += int((logits.argmax(1) == np.array([label for _, label in chunk])).sum())
    print(f"images={len(files)}")
    print(f"top1={100 * correct / len(files):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
