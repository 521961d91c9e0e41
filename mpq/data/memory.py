"""Splits held in memory: CIFAR-10 (torchvision or an ImageFolder copy), small ImageFolder roots,
a synthetic set.

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

from ..config import DataConfig
from ..errors import UsageError
from ..files import atomic_path
from .folder import LAYOUT_HELP, decode, list_imagefolder

__all__ = ["BatchLoader", "Loader", "Split", "augment_batch", "cache_dir", "load_memory_split",
           "load_torchvision_cifar10", "normalize", "synthetic_split"]


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


def load_memory_split(folder: Path, cfg: DataConfig, *, progress: bool,
                      listing: tuple | None = None) -> Split:
    """An ImageFolder split decoded at `cfg.image_size` (evaluation transform), cached on disk;
    `listing` is `list_imagefolder(folder)` when the caller has it."""
    size = cfg.image_size
    files, labels, classes = listing or list_imagefolder(folder)
    # The cache key covers every file's name, size and mtime, so a changed data set re-decodes.
    resized = f"|{cfg.resize}" if cfg.resize and cfg.resize != size else ""
    digest = hashlib.sha256(f"{folder.resolve()}|{size}{resized}".encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = cache_dir() / "decoded" / f"{digest.hexdigest()[:24]}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                keep = z["keep"] if "keep" in z.files else np.ones(len(files), dtype=bool)
                if keep.all() or cfg.skip_corrupt:  # else decode again: the error names a file
                    return Split(torch.from_numpy(z["images"]),
                                 torch.from_numpy(z["labels"][keep]), classes)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    from tqdm import tqdm

    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    keep = np.ones(len(files), dtype=bool)
    for i, f in enumerate(tqdm(files, desc=f"decoding {folder.name}", disable=not progress,
                               unit="img", mininterval=1.0)):
        try:
            images[i] = decode(f, size, cfg.resize)
        except UsageError:
            if not cfg.skip_corrupt:
                raise
            keep[i] = False
            print(f"skipped unreadable image {f}")
    if not keep.all():
        print(f"{folder}: skipped {int((~keep).sum())} unreadable images of {len(files)}")
    images = np.ascontiguousarray(images[keep].transpose(0, 3, 1, 2))  # -> (N, 3, H, W)
    labels_np = np.asarray(labels, dtype=np.int64)
    with atomic_path(cache, suffix=".npz") as tmp:
        np.savez(tmp, images=images, labels=labels_np, keep=keep)
    return Split(torch.from_numpy(images), torch.from_numpy(labels_np[keep]), classes)


def load_torchvision_cifar10(root: Path, split: str, *, download: bool) -> Split:
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as exc:  # no files and no network
        raise UsageError(f"CIFAR-10 not found under {root} and could not be downloaded "
                         f"({exc}); {LAYOUT_HELP}") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return Split(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def synthetic_split(cfg: DataConfig, split: str, num_classes: int) -> Split:
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


class Loader:
    """What both loaders share: settings, the batch count, iteration over epoch 0."""

    def __init__(self, split, cfg: DataConfig, *, batch_size: int, train: bool, seed: int = 0,
                 device: torch.device | str = "cpu", channels_last: bool = False,
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

    def __iter__(self):
        return self.epoch(0)

    def epoch(self, epoch: int = 0, *, start_batch: int = 0):
        raise NotImplementedError

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(self.device, non_blocking=True), self.cfg.mean, self.cfg.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class BatchLoader(Loader):
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
            yield self._to_device(images), self.split.labels[index].to(self.device,
                                                                       non_blocking=True)
