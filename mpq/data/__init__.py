"""Data: CIFAR-10 (torchvision or an ImageFolder copy), any ImageFolder root, a synthetic set.

Small splits are decoded once into memory (`memory`: `Split`, `BatchLoader`); large ones are
read from disk batch by batch by worker processes (`stream`: `FolderSplit`, `StreamLoader`).
`load_split` picks by the recipe's `data.loader` and `make_loader` builds the matching loader,
so the stages never ask which one they have. Both are deterministic per (seed, epoch) and
resume mid-epoch on the same batches.
"""

from __future__ import annotations

import os

import torch

from ..config import DataConfig
from ..errors import UsageError
from .folder import (LAYOUT_HELP, check_classes, imagefolder_split_dir, list_imagefolder,
                     resolve_data_root)
from .memory import (BatchLoader, Split, augment_batch, cache_dir, load_memory_split,
                     load_torchvision_cifar10, normalize, synthetic_split)
from .stream import FolderSplit, StreamLoader

__all__ = ["BatchLoader", "FolderSplit", "Split", "StreamLoader", "augment_batch", "cache_dir",
           "decoded_bytes", "load_split", "make_loader", "normalize", "resolve_data_root"]


def decoded_bytes(images: int, cfg: DataConfig) -> int:
    """What a split of `images` takes in memory decoded at the recipe's size."""
    return images * 3 * cfg.image_size ** 2


def load_split(cfg: DataConfig, split: str, *, root: str | os.PathLike | None = None,
               num_classes: int | None = None, progress: bool = True,
               classes: list[str] | None = None) -> Split | FolderSplit:
    """Loads `split` ("train" or "test") in memory or as a list of files (see `data.loader`).

    Args:
        cfg: the recipe's data section.
        split: "train" or "test" ("test" falls back to an ImageFolder's `val/`).
        root: overrides `cfg.root`; when both are unset, `$MPQ_DATA` is used.
        num_classes: the model's class count (also that of the synthetic set, default 10): a
            split with another number of class folders is refused.
        progress: show a progress bar while decoding.
        classes: the class names the model was trained on: a split with other class folders
            is refused (its labels would not match).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.dataset == "synthetic":
        found = synthetic_split(cfg, split, num_classes or 10)
    else:
        found = _load(cfg, split, root, progress)
    if classes is not None:
        check_classes(found.classes, classes, what=f"the {split} split")
    elif num_classes is not None and len(found.classes) != num_classes:
        raise UsageError(f"the {split} split has {len(found.classes)} classes but the model "
                         f"{num_classes}; point --data-root at the data set it was trained on "
                         f"(or set model.num_classes to match)")
    return found


def _load(cfg: DataConfig, split: str, root, progress: bool) -> Split | FolderSplit:
    path = resolve_data_root(root or cfg.root)
    if path is None:
        if cfg.dataset == "imagefolder":
            raise UsageError(f"no data root: pass --data-root or set MPQ_DATA; {LAYOUT_HELP}")
        return load_torchvision_cifar10(cache_dir() / "data", split, download=True)
    if not path.is_dir():
        raise UsageError(f"data root {path} is not a folder; {LAYOUT_HELP}")
    folder = imagefolder_split_dir(path, split)
    if folder is not None:
        listing = list_imagefolder(folder)
        if _streams(cfg, len(listing[0]), split):
            return FolderSplit.from_listing(folder, *listing)
        return load_memory_split(folder, cfg, progress=progress, listing=listing)
    if cfg.dataset == "cifar10" and (path / "cifar-10-batches-py").is_dir():
        return load_torchvision_cifar10(path, split, download=False)
    if cfg.dataset == "cifar10" and not any(path.iterdir()):
        return load_torchvision_cifar10(path, split, download=True)
    want = "train/" if split == "train" else "test/ or val/"
    raise UsageError(f"data root {path} has no {want} folder; {LAYOUT_HELP}")


def _streams(cfg: DataConfig, images: int, split: str) -> bool:
    if cfg.loader != "auto":
        if cfg.loader == "memory" and cfg.augment == "random_resized_crop" and split == "train":
            raise UsageError("data.augment=random_resized_crop crops the full-size image, which "
                             "the memory loader does not keep; set data.loader=stream (or auto)")
        return cfg.loader == "stream"
    return (cfg.augment == "random_resized_crop"
            or decoded_bytes(images, cfg) > cfg.memory_limit_mb * 2 ** 20)


def make_loader(split: Split | FolderSplit, cfg: DataConfig, *, batch_size: int, train: bool,
                seed: int = 0, device: torch.device | str = "cpu", channels_last: bool = False,
                drop_last: bool | None = None, rank: int = 0,
                world_size: int = 1) -> BatchLoader | StreamLoader:
    """The loader for a split: `BatchLoader` in memory, `StreamLoader` from files (which
    shards a global batch over `world_size` ranks itself)."""
    if isinstance(split, FolderSplit):
        return StreamLoader(split, cfg, batch_size=batch_size, train=train, seed=seed,
                            device=device, channels_last=channels_last, drop_last=drop_last,
                            rank=rank, world_size=world_size)
    return BatchLoader(split, cfg, batch_size=batch_size, train=train, seed=seed, device=device,
                       channels_last=channels_last, drop_last=drop_last)
