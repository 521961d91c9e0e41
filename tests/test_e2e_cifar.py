"""End-to-end checks on the real CIFAR-10 (JPEG copy). They run where the data is: MPQ_DATA set
(make test sets it when ../shared/data is beside the checkout), and skip with a message where
it is not."""

import os
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script
from mpq.config import DataConfig
from mpq.data import load_split

DATA = os.environ.get("MPQ_DATA")
TEACHER = ROOT / "checkpoints" / "resnet20_cifar10.pt"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA or not (Path(DATA) / "test").is_dir(),
                       reason="real CIFAR-10 not found: set MPQ_DATA to an ImageFolder copy "
                              "(make test does this when ../shared/data is present)"),
]


@pytest.fixture(autouse=True)
def _user_cache(monkeypatch):
    # Decoded real data is worth keeping between runs: use the normal cache, not a temp one.
    monkeypatch.delenv("MPQ_CACHE", raising=False)


def test_real_cifar10_splits():
    test = load_split(DataConfig(), "test", progress=False)
    assert test.images.shape == (10_000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes[:3] == ["airplane", "automobile", "bird"]
    train = load_split(DataConfig(), "train", progress=False)
    assert len(train) == 50_000


@pytest.mark.skipif(not TEACHER.is_file(),
                    reason="checkpoints/resnet20_cifar10.pt is not committed yet (its 160-epoch "
                           "training spans sessions)")
def test_committed_teacher_reaches_target():
    env = {k: v for k, v in os.environ.items() if k != "MPQ_CACHE"}
    result = run_script("-m", "mpq", "eval", "--checkpoint", TEACHER, "--quiet", env=env,
                        timeout=600)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1].split("=")[1]) >= 89.0
