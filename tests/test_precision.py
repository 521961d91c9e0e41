"""Which autocast dtype `train.precision` means on a CPU, and its override."""

import pytest
import torch

from mpq.errors import UsageError
from mpq.precision import AUTO_ENV, autocast_dtype, cpu_has_fast_bf16

CPU = torch.device("cpu")


def test_auto_on_a_cpu_follows_native_bf16_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv(AUTO_ENV, raising=False)
    assert autocast_dtype("auto", CPU) == (torch.bfloat16 if cpu_has_fast_bf16() else None)
    monkeypatch.setenv(AUTO_ENV, "bf16")
    assert autocast_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setenv(AUTO_ENV, "fp32")
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("bf16", CPU) == torch.bfloat16  # an explicit choice is not overridden
    monkeypatch.setenv(AUTO_ENV, "fp16")
    with pytest.raises(UsageError, match=f"{AUTO_ENV} must be fp32 or bf16"):
        autocast_dtype("auto", CPU)
