"""Image folders on disk: where the data root is, the ImageFolder layout, decoding one file.

Both loaders read files through here, so a layout error, a class list that differs between
splits, or an unreadable image gets the same one-line message whichever loader reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UsageError

__all__ = ["IMAGE_SUFFIXES", "LAYOUT_HELP", "check_classes", "decode", "imagefolder_split_dir",
           "list_imagefolder", "resolve_data_root"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

LAYOUT_HELP = (
    "expected an ImageFolder layout ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg "
    "(or ROOT/val/), or torchvision's ROOT/cifar-10-batches-py. To get CIFAR-10: on a machine "
    "online, leave --data-root unset and mpq downloads it through torchvision; offline, extract "
    "an ImageFolder copy (e.g. tar xzf cifar10-jpeg.tar.gz -C ROOT) and pass --data-root ROOT "
    "or set MPQ_DATA=ROOT"
)


def resolve_data_root(root: str | os.PathLike | None) -> Path | None:
    """`--data-root` if given, else `$MPQ_DATA`, else None (torchvision's download location)."""
    root = root or os.environ.get("MPQ_DATA") or None
    if root is None:
        return None
    path = Path(root).expanduser()
    if not path.exists():
        raise UsageError(f"data root {path} does not exist; {LAYOUT_HELP}")
    return path


def imagefolder_split_dir(root: Path, split: str) -> Path | None:
    names = ["train"] if split == "train" else ["test", "val"]
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def list_imagefolder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, classes) of `folder/<class>/*`, classes sorted by name."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UsageError(f"{folder} has no class folders; {LAYOUT_HELP}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise UsageError(f"{folder} has class folders but no images; {LAYOUT_HELP}")
    return files, labels, classes


def check_classes(found: list[str], expected: list[str], *, what: str) -> None:
    """Refuses a split whose class folders differ from the model's: its labels would shift."""
    if list(found) == list(expected):
        return
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    detail = "; ".join(part for part in (
        f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
        f"extra {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else "")
        if part) or "same names in another order"
    raise UsageError(f"{what} has {len(found)} classes that differ from the {len(expected)} the "
                     f"model was trained on ({detail}); labels would not match; make the class "
                     f"folders of every split the same")


def open_rgb(path: Path):
    """The image at `path` as a PIL RGB image (grayscale, palette and RGBA converted)."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def resize_centre_crop(img, size: int, resize: int):
    """Shorter side to `resize`, then the central `size` x `size` square."""
    from PIL import Image

    w, h = img.size
    if (w, h) != (size, size) or resize != size:
        scale = resize / min(w, h)
        img = img.resize((max(resize, round(w * scale)), max(resize, round(h * scale))),
                         Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def decode(path: Path, size: int, resize: int | None = None) -> np.ndarray:
    """uint8 (size, size, 3): the usual evaluation transform (shorter side to `resize`, default
    `size`, then a centre crop). An unreadable file is a `UsageError` naming it."""
    try:
        img = open_rgb(path)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for bad or empty files
        raise UsageError(f"cannot decode image {path}: {exc}; fix or remove it, or set "
                         f"data.skip_corrupt=true to skip unreadable images") from None
    return np.asarray(resize_centre_crop(img, size, resize or size), dtype=np.uint8)
