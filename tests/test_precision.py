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


@pytest.mark.parametrize("side, kernel, stride, padding, degenerate", [
    (1, 3, 2, 1, True),    # resnet18's layer4.0.conv1 at 16 px
    (2, 3, 3, 1, True),
    (1, 5, 2, 2, True),
    (1, 1, 2, 0, False),   # no padding: every tap sees the input
    (2, 3, 2, 1, False),
    (1, 3, 1, 1, False),
    (8, 3, 2, 1, False),
])
def test_a_conv_striding_past_its_input_gets_its_float32_weight_gradient_under_bf16(
        side, kernel, stride, padding, degenerate):
    """oneDNN's bf16 backward-weights kernel left the padding-only taps' gradient unwritten
    (garbage up to inf, a different value each call) for these geometries on an AVX-512 BF16
    CPU; mpq's autocast runs them in float32. Elsewhere the conv stays in bf16."""
    from mpq.precision import autocast, stride_passes_input

    assert stride_passes_input((16, 64, side, side), stride, padding) == degenerate
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 128, kernel, stride, padding, bias=False)
    x = torch.randn(16, 64, side, side)
    want = torch.autograd.grad(conv(x).square().sum(), conv.weight)[0]
    for _ in range(8):  # the garbage came on most calls, not all
        with autocast(CPU, torch.bfloat16):
            y = conv(x)
        got = torch.autograd.grad(y.float().square().sum(), conv.weight)[0]
        assert y.dtype == (torch.float32 if degenerate else torch.bfloat16)
        assert torch.allclose(got, want, rtol=0.05, atol=0.02 * want.abs().max().item())
