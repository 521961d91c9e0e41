"""Splits read from disk batch by batch: large ImageFolder roots such as ImageNet's.

A `FolderSplit` holds only file names (one numpy string array, which worker processes share
without copying). `StreamLoader` decodes each batch in `workers` processes of a
`torch.utils.data.DataLoader` and hands the batch over as uint8, normalised on the device.
Every random draw of a sample (crop, flip) comes from a generator seeded by (seed, epoch,
sample index), and the epoch's order from one seeded by (seed, epoch), so batches do not depend
on which worker decoded them, a resumed run skips the batches already done without decoding them,
and under DDP each rank decodes only its share of every global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UsageError
from .folder import list_imagefolder, open_rgb, resize_centre_crop
from .memory import Loader, augment_batch

__all__ = ["FolderSplit", "StreamLoader"]


@dataclass
class FolderSplit:
    """One split on disk: file paths relative to `root`, labels, class names."""

    root: Path
    names: np.ndarray
    labels: torch.Tensor
    classes: list[str]

    @classmethod
    def from_listing(cls, folder: Path, files: list[Path], labels: list[int],
                     classes: list[str]) -> "FolderSplit":
        names = np.array([str(f.relative_to(folder)) for f in files])
        return cls(folder, names, torch.tensor(labels, dtype=torch.int64), classes)

    @classmethod
    def scan(cls, folder: Path) -> "FolderSplit":
        return cls.from_listing(folder, *list_imagefolder(folder))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "FolderSplit":
        index = torch.as_tensor(index)
        return FolderSplit(self.root, self.names[index.numpy()], self.labels[index], self.classes)

    def path(self, i: int) -> Path:
        return self.root / str(self.names[i])


def random_resized_crop_box(width: int, height: int, scale, g: torch.Generator,
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop of `scale` area and `ratio` aspect (the
    Inception crop, as torchvision's RandomResizedCrop), drawn from `g`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            return left, top, left + w, top + h
    # Fallback: the largest central crop within the ratio bounds.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class _Files(torch.utils.data.Dataset):
    """Item (index, sample seed or None) -> (uint8 (3, S, S) or None, label, error or None)."""

    def __init__(self, split: FolderSplit, cfg: DataConfig, train: bool):
        self.split, self.cfg, self.train = split, cfg, train

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item):
        from PIL import Image

        index, seed = item
        label = int(self.split.labels[index])
        path = self.split.path(index)
        cfg, size = self.cfg, self.cfg.image_size
        try:
            img = open_rgb(path)
        except (OSError, ValueError, SyntaxError) as exc:
            return None, label, f"{path}: {exc}"
        if not self.train:
            img = resize_centre_crop(img, size, cfg.resize or size)
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), \
                label, None
        g = torch.Generator().manual_seed(seed)
        if cfg.augment == "random_resized_crop":
            box = random_resized_crop_box(*img.size, cfg.crop_scale, g)
            img = img.resize((size, size), Image.BILINEAR, box=box)
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
            if cfg.flip and torch.rand(1, generator=g).item() < 0.5:
                x = x.flip(2)
            return x.contiguous(), label, None
        img = resize_centre_crop(img, size, cfg.resize or size)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return augment_batch(x[None], cfg, g)[0].contiguous(), label, None


def _collate(items):
    good = [(x, y) for x, y, err in items if err is None]
    errors = [err for _, _, err in items if err is not None]
    images = torch.stack([x for x, _ in good]) if good else torch.empty(0, dtype=torch.uint8)
    labels = torch.tensor([y for _, y in good], dtype=torch.int64)
    return images, labels, errors


class StreamLoader(Loader):
    """Batches of normalised float tensors decoded from a `FolderSplit`, deterministic per
    (seed, epoch); the same interface as `BatchLoader`.

    Args:
        split: the files.
        cfg: data section (sizes, augmentation, `workers`, `skip_corrupt`).
        batch_size: images per (global) batch.
        train: shuffle and augment; otherwise keep order and apply the evaluation transform.
        seed: base seed of orders and augmentation.
        device: where batches go (through pinned memory on CUDA).
        channels_last: return batches in channels_last memory format.
        drop_last: drop the last incomplete batch (training).
        rank, world_size: under DDP, this rank decodes and yields only its slice
            `rank::world_size` of every global batch (`sharded` is then true).
    """

    def __init__(self, split: FolderSplit, cfg: DataConfig, *, batch_size: int, train: bool,
                 seed: int = 0, device: torch.device | str = "cpu", channels_last: bool = False,
                 drop_last: bool | None = None, rank: int = 0, world_size: int = 1):
        super().__init__(split, cfg, batch_size=batch_size, train=train, seed=seed,
                         device=device, channels_last=channels_last, drop_last=drop_last)
        self.rank, self.world_size = rank, world_size
        self.sharded = world_size > 1
        self.skipped: set[str] = set()

    def _batches(self, epoch: int, start_batch: int):
        base = self.seed * 1_000_003 + epoch
        n = len(self.split)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(base)) if self.train
                 else torch.arange(n)).tolist()
        for i in range(start_batch, len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            index = index[self.rank::self.world_size]
            yield [(j, (base * 10_000_019 + j) % 2 ** 63 if self.train else None) for j in index]

    def epoch(self, epoch: int = 0, *, start_batch: int = 0):
        """Yields (images, labels) for `epoch`, skipping the first `start_batch` batches."""
        workers = self.cfg.workers
        loader = torch.utils.data.DataLoader(
            _Files(self.split, self.cfg, self.train),
            batch_sampler=list(self._batches(epoch, start_batch)), num_workers=workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None)
        for images, labels, errors in loader:
            for err in errors:
                if not self.cfg.skip_corrupt:
                    raise UsageError(f"cannot decode image {err}; fix or remove it, or set "
                                     f"data.skip_corrupt=true to skip unreadable images")
                if err not in self.skipped:
                    self.skipped.add(err)
                    print(f"skipped unreadable image {err}", flush=True)
            if not len(labels):
                continue
            yield self._to_device(images), labels.to(self.device, non_blocking=True)
