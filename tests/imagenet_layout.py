"""A synthetic data set in ImageNet's layout: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, JPEGs
of varied sizes and aspect ratios, each class a colour so that a few steps learn something."""

import numpy as np
from PIL import Image


def make_imagenet_layout(root, *, classes=1000, train_per_class=2, val_per_class=1, seed=0,
                         sizes=(40, 120), name="n{:08d}"):
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (classes, 3))
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / name.format(c)
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = rng.integers(sizes[0], sizes[1] + 1, 2)
                pixels = np.clip(colours[c] + rng.normal(0, 30, (h, w, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(
                    folder / f"{name.format(c)}_{split}_{i}.JPEG", quality=90)
    return root
