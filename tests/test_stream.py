import numpy as np
import pytest
import torch
from PIL import Image

from imagenet_layout import make_imagenet_layout
from mpq.config import DataConfig
from mpq.data import BatchLoader, FolderSplit, StreamLoader, load_split, make_loader
from mpq.data.stream import random_resized_crop_box
from mpq.errors import UsageError


def stream_cfg(**kw):
    base = dict(dataset="imagefolder", image_size=32, resize=36, loader="stream",
                augment="random_resized_crop", workers=0)
    return DataConfig(**{**base, **kw})


@pytest.fixture
def folder(tmp_path):
    return make_imagenet_layout(tmp_path / "inet", classes=5, train_per_class=6,
                                val_per_class=2)


def batches(loader, epoch=0, **kw):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, **kw)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b))


def test_stream_batches_depend_on_seed_and_epoch_only_not_on_workers(folder):
    split = load_split(stream_cfg(), "train", root=folder)
    assert isinstance(split, FolderSplit) and len(split) == 30 and len(split.classes) == 5
    one = StreamLoader(split, stream_cfg(workers=0), batch_size=8, train=True, seed=1)
    two = StreamLoader(split, stream_cfg(workers=2), batch_size=8, train=True, seed=1)
    a = batches(one, 3)
    assert len(a) == 3 and a[0][0].shape == (8, 3, 32, 32)  # drop_last in training
    assert same(a, batches(two, 3))
    assert not torch.equal(a[0][0], batches(one, 4)[0][0])
    # A resumed epoch skips batches without decoding them and yields the rest unchanged.
    assert same(a[2:], batches(two, 3, start_batch=2))


def test_ranks_split_every_global_batch_between_them(folder):
    split = load_split(stream_cfg(), "train", root=folder)
    whole = batches(StreamLoader(split, stream_cfg(), batch_size=8, train=True, seed=0))
    ranks = [batches(StreamLoader(split, stream_cfg(), batch_size=8, train=True, seed=0,
                                  rank=r, world_size=2)) for r in (0, 1)]
    for i, (x, y) in enumerate(whole):
        assert torch.equal(ranks[0][i][0], x[0::2]) and torch.equal(ranks[1][i][0], x[1::2])
        assert torch.equal(ranks[0][i][1], y[0::2])


def test_evaluation_transform_is_the_memory_loaders(folder):
    mem = load_split(stream_cfg(loader="memory", augment="pad_crop"), "test", root=folder)
    files = load_split(stream_cfg(), "test", root=folder)
    a = batches(BatchLoader(mem, stream_cfg(), batch_size=4, train=False))
    b = batches(StreamLoader(files, stream_cfg(workers=2), batch_size=4, train=False))
    assert same(a, b) and sum(len(y) for _, y in b) == 10  # evaluation keeps the last batch


def test_random_resized_crop_boxes_stay_inside_and_cover_the_scale():
    g = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_box(120, 80, (0.08, 1.0), g)
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 80
        ratio = (right - left) / (bottom - top)
        areas.append((right - left) * (bottom - top) / (120 * 80))
        assert 3 / 4 - 0.05 <= ratio <= 4 / 3 + 0.05 or areas[-1] > 0.9
    assert min(areas) < 0.15 and max(areas) > 0.8
    # A strip no crop of the allowed aspect fits: the central crop of the nearest aspect.
    assert random_resized_crop_box(400, 10, (0.9, 1.0), g) == (193, 0, 206, 10)


def test_unreadable_images_are_named_or_skipped_and_odd_modes_converted(folder):
    cls = sorted((folder / "train").iterdir())
    Image.new("L", (50, 40), 128).save(cls[0] / "gray.JPEG")
    Image.new("RGBA", (50, 40), (1, 2, 3, 4)).save(cls[1] / "rgba.png")
    (cls[2] / "empty.JPEG").write_bytes(b"")
    (cls[3] / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    split = load_split(stream_cfg(), "train", root=folder)
    with pytest.raises(UsageError, match=r"(empty|broken)\.JPEG.*skip_corrupt"):
        batches(StreamLoader(split, stream_cfg(workers=2), batch_size=34, train=False))
    loader = StreamLoader(split, stream_cfg(skip_corrupt=True), batch_size=34, train=False)
    got = batches(loader)
    assert sum(len(y) for _, y in got) == 32 and len(loader.skipped) == 2
    with pytest.raises(UsageError, match="empty.JPEG"):
        load_split(stream_cfg(loader="memory", augment="pad_crop"), "train", root=folder)
    mem = load_split(stream_cfg(loader="memory", augment="pad_crop", skip_corrupt=True),
                     "train", root=folder)
    assert len(mem) == 32


def test_auto_streams_past_the_memory_bound_and_memory_refuses_full_image_crops(folder):
    cfg = dict(augment="pad_crop", loader="auto")
    assert not isinstance(load_split(stream_cfg(**cfg), "train", root=folder), FolderSplit)
    tiny = stream_cfg(**cfg, memory_limit_mb=1, image_size=256, resize=256)
    assert isinstance(load_split(tiny, "train", root=folder), FolderSplit)  # 30 x 192 KiB
    assert isinstance(load_split(stream_cfg(loader="auto"), "train", root=folder), FolderSplit)
    with pytest.raises(UsageError, match="data.loader=stream"):
        load_split(stream_cfg(loader="memory"), "train", root=folder)


def test_a_split_with_other_classes_is_refused(folder):
    (folder / "val" / "n00000000").rename(folder / "val" / "n99999999")
    train = load_split(stream_cfg(), "train", root=folder)
    with pytest.raises(UsageError, match="missing n00000000; extra n99999999"):
        load_split(stream_cfg(), "test", root=folder, classes=train.classes)
    (folder / "val" / "n99999999").rename(folder / "val" / "n00000000")
    (folder / "val" / "n00000004").rename(folder / "val" / "x")
    (folder / "val" / "x").rename(folder / "spare")
    with pytest.raises(UsageError, match="4 classes but the model 5"):
        load_split(stream_cfg(), "test", root=folder, num_classes=5)


def test_make_loader_picks_the_loader_of_the_split(folder):
    files = load_split(stream_cfg(), "train", root=folder)
    mem = load_split(stream_cfg(loader="memory", augment="pad_crop"), "train", root=folder)
    assert isinstance(make_loader(files, stream_cfg(), batch_size=4, train=True), StreamLoader)
    assert isinstance(make_loader(mem, stream_cfg(), batch_size=4, train=True), BatchLoader)
    sub = files.subset(torch.tensor([3, 1]))
    assert sub.labels.tolist() == files.labels[[3, 1]].tolist()
    assert sub.path(0) == files.path(3) and np.asarray(sub.names).dtype.kind == "U"
