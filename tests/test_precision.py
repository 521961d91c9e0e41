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


def test_emulated_bf16_rounds_what_autocast_lowers_and_computes_in_float32():
    """`bf16-emulated`: conv and linear see bf16-rounded inputs and give bf16-rounded outputs
    and input gradients, all in float32, as bf16 autocast's kernels do (the same values up to
    float32 summation order); elementwise ops are left alone."""
    from mpq.precision import EMULATED_BF16, autocast

    assert autocast_dtype("bf16-emulated", CPU) == EMULATED_BF16
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Flatten(),
                              torch.nn.Linear(16 * 36, 10))
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    with autocast(CPU, EMULATED_BF16):
        y = net(x)
        scaled = x * 1.001  # elementwise: float32, unrounded
    assert y.dtype == torch.float32 and torch.equal(y, bf16(y))
    assert not torch.equal(scaled, bf16(scaled))
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.equal(gx, bf16(gx))
    with torch.no_grad():
        hidden = bf16(torch.nn.functional.conv2d(bf16(x), bf16(net[0].weight), bf16(net[0].bias),
                                                 padding=1)).flatten(1)
        want = bf16(torch.nn.functional.linear(bf16(hidden), bf16(net[2].weight),
                                               bf16(net[2].bias)))
    assert torch.equal(y, want)
    with autocast(CPU, torch.bfloat16):
        native = net(x)
    assert torch.allclose(y, native.float(), rtol=2 ** -7, atol=1e-3)
    y0 = net(x)  # outside the context: float32 again
    assert not torch.equal(y0, bf16(y0))
