"""Recipes: typed, validated stage configs loaded from YAML with command-line overrides.

A recipe is nested dataclasses. Loading it is strict: an unknown key is an error that suggests
the nearest valid key, and a value of the wrong type is an error that names the expected type,
so a typo never trains silently with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError
from .precision import PRECISIONS

__all__ = [
    "DataConfig",
    "ModelConfig",
    "Recipe",
    "TrainConfig",
    "apply_overrides",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
]

RECIPE_VERSION = 1

CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


@dataclass
class ModelConfig:
    """Which network: a registry name (`resnet20`, `resnet18`, ...) and its class count."""

    name: str = "resnet20"
    num_classes: int = 10

    def __post_init__(self):
        if self.num_classes < 2:
            raise UsageError(f"model.num_classes must be >= 2, got {self.num_classes}")


@dataclass
class DataConfig:
    """Where images come from and how they are augmented.

    `dataset` is `cifar10` (an ImageFolder copy or torchvision's files under the root, downloaded
    when online), `imagefolder` (any root with `train/` and `test/` or `val/`), or `synthetic`
    (random images for tests). `mean` and `std` are in 0..1 pixel units and travel with the model.

    Evaluation images are resized (shorter side to `resize`, default `image_size`) and
    centre-cropped to `image_size`. Training augmentation is `pad_crop` (pad by `crop_padding`,
    random crop, flip, `cutout`: CIFAR's) or `random_resized_crop` (a random area in `crop_scale`
    of the full image and aspect ratio in [3/4, 4/3], resized to `image_size`, and a flip:
    ImageNet's). `loader`: `memory` decodes a split once into RAM (cached on disk), `stream`
    decodes each batch in `workers` processes, `auto` streams when the decoded split would
    exceed `memory_limit_mb` or the augmentation needs the full-size image. `skip_corrupt`
    skips unreadable images (counted) instead of stopping; `train_images` > 0 trains on that
    many images of the training split (a fixed random subset), to try a pipeline quickly.
    """

    dataset: str = "cifar10"
    root: str | None = None
    image_size: int = 32
    mean: list[float] = field(default_factory=lambda: list(CIFAR10_MEAN))
    std: list[float] = field(default_factory=lambda: list(CIFAR10_STD))
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    synthetic_train_size: int = 512
    synthetic_test_size: int = 256
    resize: int | None = None
    augment: str = "pad_crop"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    loader: str = "auto"
    memory_limit_mb: int = 4096
    workers: int = 4
    skip_corrupt: bool = False
    train_images: int = 0

    def __post_init__(self):
        if self.dataset not in ("cifar10", "imagefolder", "synthetic"):
            raise UsageError(
                f"data.dataset must be one of cifar10, imagefolder, synthetic; got {self.dataset!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UsageError("data.mean and data.std need 3 values each (R, G, B), in 0..1 units")
        if any(s <= 0 for s in self.std):
            raise UsageError(f"data.std must be positive, got {self.std}")
        for name in ("image_size", "crop_padding", "cutout", "workers", "train_images"):
            if getattr(self, name) < 0:
                raise UsageError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.augment not in ("pad_crop", "random_resized_crop"):
            raise UsageError(f"data.augment must be pad_crop or random_resized_crop; got "
                             f"{self.augment!r}")
        if self.loader not in ("auto", "memory", "stream"):
            raise UsageError(f"data.loader must be auto, memory or stream; got {self.loader!r}")
        if self.resize is not None and self.resize < self.image_size:
            raise UsageError(f"data.resize ({self.resize}) must be >= data.image_size "
                             f"({self.image_size}): evaluation crops image_size from it")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UsageError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, "
                             f"got {self.crop_scale}")
        if self.memory_limit_mb < 1:
            raise UsageError(f"data.memory_limit_mb must be >= 1, got {self.memory_limit_mb}")


@dataclass
class TrainConfig:
    """FP32 training (and the optimiser part of QAT): SGD with momentum and a one-cycle schedule.

    `max_steps` > 0 ends training after that many optimiser steps (the schedule is compressed to
    fit). `precision`: `auto`, `fp32`, `bf16` or `fp16` autocast, or `bf16-emulated` (bf16's
    rounding computed in float32, on any CPU; see `mpq.precision`);
    `compile` runs the network through `torch.compile`. Besides every epoch's end, the run is
    checkpointed every `checkpoint_steps` steps (0: never by count) and every
    `checkpoint_minutes` minutes (0: never by time), and resumes from the exact batch.
    `ema_epochs` > 0 keeps a moving average of the weights with that time constant (in epochs;
    `mpq.ema`) and tests, saves and exports the average; 0 (the default): the last weights.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.0
    seed: int = 0
    channels_last: bool = True
    eval_batch_size: int = 500
    max_steps: int = 0
    precision: str = "auto"
    compile: bool = False
    checkpoint_steps: int = 0
    checkpoint_minutes: float = 10.0
    ema_epochs: float = 0.0

    def __post_init__(self):
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise UsageError(
                f"train.schedule must be onecycle, cosine or constant; got {self.schedule!r}"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise UsageError("train.epochs, train.batch_size and train.eval_batch_size must be >= 1")
        if self.lr <= 0:
            raise UsageError(f"train.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise UsageError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"train.momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_steps < 0 or self.checkpoint_steps < 0 or self.checkpoint_minutes < 0:
            raise UsageError("train.max_steps, train.checkpoint_steps and "
                             "train.checkpoint_minutes must be >= 0 (0: off)")
        if self.ema_epochs < 0:
            raise UsageError(f"train.ema_epochs must be >= 0 (0: no average), got "
                             f"{self.ema_epochs}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"train.precision must be one of {', '.join(PRECISIONS)}; got "
                             f"{self.precision!r}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise UsageError(
                f"train.warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}"
            )


@dataclass
class Recipe:
    """A whole recipe: one section per stage, plus a format version."""

    version: int = RECIPE_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.version != RECIPE_VERSION:
            raise UsageError(
                f"recipe version {self.version} is not supported; this mpq reads version "
                f"{RECIPE_VERSION}"
            )


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Checks `value` against the type hint `tp`; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UsageError:
                pass
        raise UsageError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UsageError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and
                                              not (tp is int and isinstance(value, bool))):
        raise UsageError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):
        raise UsageError(f"{key}: expected a finite number, got {value!r}")
    return value


def _build(cls, data: Any, prefix: str, root) -> Any:
    if not isinstance(data, dict):
        raise UsageError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            full = prefix + str(key)
            # Suggest among every key of the whole recipe, so a top-level `epochs` finds
            # `train.epochs`.
            near = difflib.get_close_matches(full, _all_keys(root), n=1, cutoff=0.5)
            if not near:
                near = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1] == key][:1]
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise UsageError(f"unknown recipe key {full!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", root)
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def recipe_from_dict(data: dict, cls=Recipe):
    """Builds a recipe (or any config dataclass) from plain data, strictly."""
    return _build(cls, data if data is not None else {}, "", cls)


def recipe_to_dict(recipe) -> dict:
    """Plain data for YAML/JSON and checkpoints; `recipe_from_dict` inverts it exactly."""
    return dataclasses.asdict(recipe)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies `section.key=value` strings (values parsed as YAML) to recipe data, in order."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UsageError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def _deepcopy(data):
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def load_recipe(path: str | Path | None, overrides: list[str] = (), cls=Recipe):
    """Reads a YAML recipe (or none: the defaults), applies overrides, validates the result."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"recipe {path} does not exist; see recipes/ for the shipped ones")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UsageError(f"recipe {path} is not a text file (not UTF-8); give a YAML "
                             f"recipe, e.g. one of recipes/") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UsageError(f"recipe {path} is not valid YAML{where}: {problem}") from None
        except OSError as exc:
            raise UsageError(f"recipe {path} cannot be read ({exc.strerror})") from None
        if data is None:
            raise UsageError(f"recipe {path} is empty; start from one of recipes/ (an empty "
                             f"recipe would train on built-in defaults)")
        if not isinstance(data, dict):
            raise UsageError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return recipe_from_dict(apply_overrides(data, list(overrides)), cls)
