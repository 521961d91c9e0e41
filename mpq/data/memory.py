"""Data: CIFAR-10 (torchvision or an ImageFolder copy), any ImageFolder root, a synthetic set.

Images are decoded once into a uint8 tensor (N, 3, H, W) and cached on disk, so an epoch costs
only the network: decoding 50,000 JPEGs takes longer than a ResNet20 epoch's data needs.
Augmentation (pad-and-crop, flip, cutout) runs on whole batches of tensors, and every random draw
of epoch e comes from a generator seeded by (seed, e), so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .errors import UsageError

__all__ = [
    "BatchLoader",
    "Split",
    "augment_batch",
    "cache_dir",
    "load_split",
    "normalize",
    "resolve_data_root",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

LAYOUT_HELP = (
    "expected an ImageFolder layout ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg "
    "(or ROOT/val/), or torchvision's ROOT/cifar-10-batches-py. To get CIFAR-10: on a machine "
    "online, leave --data-root unset and mpq downloads it through torchvision; offline, extract "
    "an ImageFolder copy (e.g. tar xzf cifar10-jpeg.tar.gz -C ROOT) and pass --data-root ROOT "
    "or set MPQ_DATA=ROOT"
)


@dataclass
class Split:
    """One split in memory: `images` uint8 (N, 3, H, W), `labels` int64 (N,), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index], self.classes)


def cache_dir() -> Path:
    """Where decoded images live: `$MPQ_CACHE` or `~/.cache/mpq`."""
    return Path(os.environ.get("MPQ_CACHE", Path.home() / ".cache" / "mpq"))


def resolve_data_root(root: str | os.PathLike | None) -> Path | None:
    """`--data-root` if given, else `$MPQ_DATA`, else None (torchvision's download location)."""
    root = root or os.environ.get("MPQ_DATA") or None
    if root is None:
        return None
    path = Path(root).expanduser()
    if not path.exists():
        raise UsageError(f"data root {path} does not exist; {LAYOUT_HELP}")
    return path


def _imagefolder_split_dir(root: Path, split: str) -> Path | None:
    names = ["train"] if split == "train" else ["test", "val"]
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _list_imagefolder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
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


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            # Resize the shorter side, then centre-crop: the usual evaluation transform.
            w, h = img.size
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)


def _load_imagefolder(folder: Path, size: int, *, progress: bool) -> Split:
    files, labels, classes = _list_imagefolder(folder)
    # The cache key covers every file's name, size and mtime, so a changed data set re-decodes.
    digest = hashlib.sha256(f"{folder.resolve()}|{size}".encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = cache_dir() / "decoded" / f"{digest.hexdigest()[:24]}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return Split(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), classes)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    from tqdm import tqdm

    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(tqdm(files, desc=f"decoding {folder.name}", disable=not progress,
                               unit="img", mininterval=1.0)):
        try:
            images[i] = _decode(f, size)
        except OSError as exc:
            raise UsageError(f"cannot decode image {f}: {exc}") from None
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # (N, H, W, 3) -> (N, 3, H, W)
    labels_np = np.asarray(labels, dtype=np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, labels=labels_np)
    os.replace(tmp, cache)
    return Split(torch.from_numpy(images), torch.from_numpy(labels_np), classes)


def _load_torchvision_cifar10(root: Path, split: str, *, download: bool) -> Split:
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as exc:  # no files and no network
        raise UsageError(f"CIFAR-10 not found under {root} and could not be downloaded "
                         f"({exc}); {LAYOUT_HELP}") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return Split(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def _synthetic(cfg: DataConfig, split: str, num_classes: int) -> Split:
    """Learnable random images: one smooth template per class plus per-image noise and shifts."""
    g = torch.Generator().manual_seed(1234)
    size = cfg.image_size
    templates = torch.nn.functional.interpolate(
        torch.rand(num_classes, 3, 4, 4, generator=g), size=(size, size), mode="bilinear",
        align_corners=False) * 255
    n = cfg.synthetic_train_size if split == "train" else cfg.synthetic_test_size
    g.manual_seed(1 if split == "train" else 2)
    labels = torch.randint(num_classes, (n,), generator=g)
    noise = torch.randn(n, 3, size, size, generator=g) * 40
    images = (templates[labels] + noise).clamp(0, 255).round().to(torch.uint8)
    return Split(images, labels, [f"class{i}" for i in range(num_classes)])


def load_split(cfg: DataConfig, split: str, *, root: str | os.PathLike | None = None,
               num_classes: int = 10, progress: bool = True) -> Split:
    """Loads `split` ("train" or "test") as uint8 tensors.

    Args:
        cfg: the recipe's data section.
        split: "train" or "test" ("test" falls back to an ImageFolder's `val/`).
        root: overrides `cfg.root`; when both are unset, `$MPQ_DATA` is used.
        num_classes: class count for the synthetic set.
        progress: show a progress bar while decoding.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.dataset == "synthetic":
        return _synthetic(cfg, split, num_classes)
    path = resolve_data_root(root or cfg.root)
    if path is None:
        if cfg.dataset == "imagefolder":
            raise UsageError(f"no data root: pass --data-root or set MPQ_DATA; {LAYOUT_HELP}")
        return _load_torchvision_cifar10(cache_dir() / "data", split, download=True)
    if not path.is_dir():
        raise UsageError(f"data root {path} is not a folder; {LAYOUT_HELP}")
    folder = _imagefolder_split_dir(path, split)
    if folder is not None:
        return _load_imagefolder(folder, cfg.image_size, progress=progress)
    if cfg.dataset == "cifar10" and (path / "cifar-10-batches-py").is_dir():
        return _load_torchvision_cifar10(path, split, download=False)
    if cfg.dataset == "cifar10" and not any(path.iterdir()):
        return _load_torchvision_cifar10(path, split, download=True)
    want = "train/" if split == "train" else "test/ or val/"
    raise UsageError(f"data root {path} has no {want} folder; {LAYOUT_HELP}")


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, scaled to 0..1 and standardised per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


def augment_batch(images: torch.Tensor, cfg: DataConfig, g: torch.Generator) -> torch.Tensor:
    """Pad-and-random-crop, horizontal flip and cutout on a uint8 batch (B, 3, H, W)."""
    b, _, h, w = images.shape
    p = cfg.crop_padding
    if p:
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]   # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]   # (B, 1, 1, W)
        batch = torch.arange(b)[:, None, None, None]
        chans = torch.arange(images.shape[1])[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if cfg.flip:
        flip = torch.rand(b, generator=g) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if cfg.cutout:
        cy = torch.randint(0, h, (b,), generator=g)[:, None, None]
        cx = torch.randint(0, w, (b,), generator=g)[:, None, None]
        ys = torch.arange(h)[None, :, None]
        xs = torch.arange(w)[None, None, :]
        # A cutout x cutout square of zeros centred on (cy, cx), clipped at the border.
        top, left = cy - cfg.cutout // 2, cx - cfg.cutout // 2
        hole = (ys >= top) & (ys < top + cfg.cutout) & (xs >= left) & (xs < left + cfg.cutout)
        # Fill with the mean colour, which is zero after normalisation (as cutout on floats).
        fill = (torch.tensor(cfg.mean) * 255).round().to(torch.uint8).view(1, -1, 1, 1)
        images = torch.where(hole[:, None], fill, images)
    return images


class BatchLoader:
    """Batches of normalised float tensors from a `Split`, deterministic per (seed, epoch).

    Args:
        split: images and labels in memory.
        cfg: data section (normalisation and augmentation).
        batch_size: images per batch.
        train: shuffle and augment; otherwise keep order and leave images as they are.
        seed: base seed; epoch e draws from a generator seeded with (seed, e).
        device: where batches go.
        channels_last: return batches in channels_last memory format (faster convs on CPU).
        drop_last: drop the last incomplete batch (training).
    """

    def __init__(self, split: Split, cfg: DataConfig, *, batch_size: int, train: bool,
                 seed: int = 0, device: torch.device | str = "cpu", channels_last: bool = False,
                 drop_last: bool | None = None):
        self.split = split
        self.cfg = cfg
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.drop_last = train if drop_last is None else drop_last

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0, *, start_batch: int = 0):
        """Yields (images, labels) for `epoch`, skipping the first `start_batch` batches."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.split)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.split.images[index]
            if self.train:
                images = augment_batch(images, self.cfg, g)  # draws even for skipped batches
            if i < start_batch:
                continue
            x = normalize(images.to(self.device, non_blocking=True), self.cfg.mean, self.cfg.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.split.labels[index].to(self.device, non_blocking=True)

    def __iter__(self):
        return self.epoch(0)
