import pytest
import torch

from mpq.errors import UsageError
from mpq.models import build_model


def test_resnet20_shape_and_size():
    model = build_model("resnet20", num_classes=10)
    # 3 stages x 3 blocks, 16/32/64 channels, 1x1 conv + BN shortcuts: He et al.'s 0.27M.
    assert sum(p.numel() for p in model.parameters()) == 272_474
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 21  # 1 stem + 18 block convs + 2 shortcuts
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_take_num_classes(name):
    model = build_model(name, num_classes=7)
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_factory_spec_and_errors():
    model = build_model("torchvision.models:resnet18", num_classes=3)
    assert model.fc.out_features == 3
    with pytest.raises(UsageError, match="did you mean 'resnet20'"):
        build_model("resnet2O")
    with pytest.raises(UsageError, match="cannot be imported"):
        build_model("no_such_package.nets:small")
