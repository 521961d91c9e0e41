import numpy as np
import pytest
import torch
from PIL import Image

from mpq.config import DataConfig
from mpq.data import BatchLoader, augment_batch, load_split, normalize
from mpq.errors import UsageError


def make_imagefolder(root, *, splits=("train", "test"), classes=("cat", "dog"), per_class=3,
                     size=8):
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_imagefolder_decodes_exactly_and_caches(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    cfg = DataConfig(dataset="imagefolder", image_size=8)
    split = load_split(cfg, "train", root=root, progress=False)
    assert split.images.shape == (6, 3, 8, 8) and split.images.dtype == torch.uint8
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1] and split.classes == ["cat", "dog"]
    first = np.array(Image.open(root / "train" / "cat" / "0.png")).transpose(2, 0, 1)
    assert torch.equal(split.images[0], torch.from_numpy(first))
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npz"))) == 1
    again = load_split(cfg, "train", root=root, progress=False)  # from the cache
    assert torch.equal(again.images, split.images)


def test_imagefolder_resizes_and_uses_val(tmp_path):
    root = make_imagefolder(tmp_path / "data", splits=("train", "val"), size=20)
    cfg = DataConfig(dataset="imagefolder", image_size=16)
    assert load_split(cfg, "test", root=root, progress=False).images.shape == (6, 3, 16, 16)


def test_data_root_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MPQ_DATA", raising=False)
    cfg = DataConfig(dataset="imagefolder")
    with pytest.raises(UsageError, match="does not exist.*ImageFolder layout"):
        load_split(cfg, "train", root=tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "img.jpg").write_bytes(b"")
    with pytest.raises(UsageError, match="no train/ folder"):
        load_split(cfg, "train", root=tmp_path / "flat")
    with pytest.raises(UsageError, match="no data root"):
        load_split(cfg, "train")


def test_env_var_finds_data(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "data")
    monkeypatch.setenv("MPQ_DATA", str(root))
    assert len(load_split(DataConfig(dataset="cifar10", image_size=8), "test",
                          progress=False)) == 6


def test_corrupt_image_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    (root / "train" / "cat" / "0.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="0.png"):
        load_split(DataConfig(dataset="imagefolder", image_size=8), "train", root=root,
                   progress=False)


def test_crop_is_a_shift_and_flip_mirrors():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).view(2, 3, 6, 6).to(torch.uint8)
    cfg = DataConfig(crop_padding=2, flip=False, cutout=0)
    out = augment_batch(images, cfg, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for b in range(2):  # every output is one of the 25 windows of its padded input
        windows = [padded[b, :, y:y + 6, x:x + 6] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    flipped = augment_batch(images, DataConfig(crop_padding=0, flip=True, cutout=0),
                            torch.Generator().manual_seed(1))
    for b in range(2):
        assert torch.equal(flipped[b], images[b]) or torch.equal(flipped[b], images[b].flip(2))


def test_cutout_fills_a_square_with_the_mean_colour():
    images = torch.full((64, 3, 10, 10), 7, dtype=torch.uint8)
    cfg = DataConfig(crop_padding=0, flip=False, cutout=4)
    out = augment_batch(images, cfg, torch.Generator().manual_seed(0))
    changed = (out != 7).any(1)  # (B, H, W)
    assert changed.sum((1, 2)).max() == 16 and changed.sum((1, 2)).min() >= 4
    fill = (torch.tensor(cfg.mean) * 255).round().to(torch.uint8)
    b, y, x = changed.nonzero()[0]
    assert torch.equal(out[b, :, y, x], fill)
    # After normalisation the hole is zero, as in cutout on normalised floats (up to rounding).
    assert normalize(out, cfg.mean, cfg.std)[b, :, y, x].abs().max() < 0.01


def test_loader_is_deterministic_per_epoch_and_skips_exactly():
    cfg = DataConfig(dataset="synthetic", image_size=8, synthetic_train_size=50, cutout=2)
    split = load_split(cfg, "train")
    loader = BatchLoader(split, cfg, batch_size=8, train=True, seed=3)
    assert len(loader) == 6
    a = list(loader.epoch(1))
    b = list(loader.epoch(1))
    c = list(loader.epoch(2))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    tail = list(loader.epoch(1, start_batch=4))
    assert len(tail) == 2 and torch.equal(tail[0][0], a[4][0])
    test = BatchLoader(split, cfg, batch_size=16, train=False)
    assert sum(len(y) for _, y in test.epoch(0)) == 50  # evaluation keeps the last batch
