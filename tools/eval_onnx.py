"""Top-1 of an exported ONNX model on an ImageFolder test split, with ONNX Runtime, Pillow and
NumPy only: no torch, no mpq. It checks that an export stands on its own.

    python tools/eval_onnx.py --export DIR --data-root ROOT [--batch-size 256]

DIR is an export folder (model_int8.onnx and export.json, from `python -m mpq export` or
train.py); ROOT holds test/ (or val/) with one folder per class, sorted by name as the model's
class indices. Preprocessing follows export.json: RGB, resize the shorter side and centre-crop
when the image is not already the input size, x / 255, (x - mean) / std, NCHW float32.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}


def load_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            w, h = img.size
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True,
                        help="folder with model_int8.onnx and export.json")
    parser.add_argument("--data-root", required=True, help="ImageFolder root with test/ or val/")
    parser.add_argument("--model", default="model_int8.onnx")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    export = Path(args.export)
    meta = json.loads((export / "export.json").read_text())
    size = meta["input"]["shape"][-1]
    mean = np.array(meta["normalization"]["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(meta["normalization"]["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    root = Path(args.data_root)
    split = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if split is None:
        print(f"error: {root} has no test/ or val/ folder", file=sys.stderr)
        return 2
    classes = sorted(p.name for p in split.iterdir() if p.is_dir())
    files = [(f, label) for label, c in enumerate(classes)
             for f in sorted((split / c).iterdir()) if f.suffix.lower() in SUFFIXES]
    session = ort.InferenceSession(str(export / args.model), providers=["CPUExecutionProvider"])
    correct = 0
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        images = np.stack([load_image(f, size) for f, _ in chunk]).transpose(0, 3, 1, 2)
        x = ((images.astype(np.float32) / 255 - mean) / std).astype(np.float32)
        logits = session.run(None, {meta["input"]["name"]: x})[0]
        correct += int((logits.argmax(1) == np.array([label for _, label in chunk])).sum())
    print(f"images={len(files)}")
    print(f"top1={100 * correct / len(files):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
