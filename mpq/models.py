"""Models: ResNet20 for CIFAR, torchvision classifiers, and a user's own factory, by one name.

`build_model("resnet20")`, `build_model("mobilenet_v2", num_classes=10)` or
`build_model("mypackage.nets:small_net")` all return an `nn.Module` with random weights; the
name is what checkpoints record, so a checkpoint can rebuild its own model.

Building a factory imports its module and calls it, so a factory name read from a file (a
checkpoint, a `model.mpq` header) is built only when the caller names the same factory or opts
in (`check_factory_allowed`); registry and torchvision names build from any file.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .errors import UsageError

__all__ = ["ResNet20", "build_model", "check_factory_allowed", "model_names"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (1x1 conv + BN where the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet20 for 32x32 inputs (He et al. 2016): 3 stages x 3 blocks of 16/32/64 channels."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, in_channels = [], 16
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(3):
                blocks.append(BasicBlock(in_channels, channels, stride if i == 0 else 1))
                in_channels = channels
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, 64, 1, 1) -> (B, 64)


_OURS = {"resnet20": ResNet20}


def model_names() -> list[str]:
    """Registry names: ours first, then torchvision's classification models."""
    import torchvision

    return sorted(_OURS) + sorted(torchvision.models.list_models(module=torchvision.models))


def check_factory_allowed(name: str, *, source, expect_model: str | None = None,
                          allow_factory: bool = False) -> None:
    """Refuses a `package.module:factory` name read from the file `source` unless the caller
    names the same factory (`expect_model`, e.g. the recipe's `model.name`) or trusts the file
    (`allow_factory`): building it would import that module and call that function, so a file
    from elsewhere could run any installed code. Registry and torchvision names always pass."""
    if ":" not in name or allow_factory or name == expect_model:
        return
    module_name, _, attr = name.partition(":")
    raise UsageError(f"{source} names the model factory {name!r}; building it would import "
                     f"{module_name!r} and call {attr}(num_classes=...), so it is not done for "
                     f"a file alone: pass --allow-factory (allow_factory=True in Python) if you "
                     f"trust the file, or name that factory as the recipe's model.name")


def build_model(name: str, *, num_classes: int = 10) -> nn.Module:
    """Builds a freshly initialised model by registry name or `package.module:factory`.

    A factory is called as `factory(num_classes=num_classes)`; for a name read from a file,
    `check_factory_allowed` first.
    """
    if name in _OURS:
        return _OURS[name](num_classes=num_classes)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"model factory {name!r} cannot be imported: {exc}; check that "
                             f"{module_name!r} is on PYTHONPATH and defines {attr!r}") from None
        model = factory(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise UsageError(f"model factory {name!r} returned {type(model).__name__}, "
                             f"not an nn.Module")
        return model
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    import difflib

    near = difflib.get_close_matches(name, model_names(), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise UsageError(f"unknown model {name!r}{hint} (see mpq.models.model_names(), or give "
                     f"'package.module:factory')")
