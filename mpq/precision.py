"""Mixed precision: which autocast dtype a device trains in, and the context that applies it.

`auto` is bf16 autocast on CUDA GPUs that support it, fp16 autocast with a GradScaler on older
GPUs, bf16 on CPUs with native bf16 arithmetic (AMX or AVX-512 BF16), and float32 on other CPUs,
where bf16 is emulated and slower than float32 (see `benchmarks/train_speed.py`; README,
"Training runs under autocast", for the measurement behind the CPU choice). `$MPQ_AUTO_PRECISION`
(`fp32` or `bf16`) overrides what `auto` is on a CPU.
`bf16-emulated` rounds as bf16 autocast does at every conv, linear and matmul (inputs and
outputs to bf16, products summed in float32, gradients rounded on the way back through the
same casts) but computes in float32, on any device: bf16's numerics where no native bf16 runs
them, at about float32's speed.
The fake quantizers always compute in float32 (`mpq.quant.modules`): a step of an 8-bit grid is
1/256 of its range, and bf16 keeps 8 significant bits, so x / scale rounded in bf16 would land
on the wrong integer.

On the CPU, bf16 autocast runs a conv in float32 where oneDNN's bf16 backward-weights kernel
(v3.12, `jit_bf16:avx512_core_bf16`) returns garbage: a stride larger than the padded input's
side (a 3x3/s2 conv on a 1x1 map, as in resnet18's last stage at 16 px) leaves the gradient of
the taps that see only padding unwritten, and one such step took weights to 1e30.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .errors import UsageError

__all__ = ["AUTO_ENV", "EMULATED_BF16", "PRECISIONS", "EmulatedBF16", "autocast",
           "autocast_dtype", "cpu_has_fast_bf16", "grad_scaler", "stride_passes_input"]

PRECISIONS = ("auto", "fp32", "bf16", "bf16-emulated", "fp16")
# `autocast_dtype`'s answer for `bf16-emulated`: no autocast, float32 with bf16's rounding.
EMULATED_BF16 = "bf16-emulated"


AUTO_ENV = "MPQ_AUTO_PRECISION"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | str | None:
    """The autocast dtype for `precision` on `device`; None for float32, `EMULATED_BF16` for
    float32 with bf16's rounding."""
    if precision not in PRECISIONS:
        raise UsageError(f"train.precision must be one of {', '.join(PRECISIONS)}; got "
                         f"{precision!r}")
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return _cpu_auto()
    if precision == "fp32":
        return None
    if precision == EMULATED_BF16:
        return EMULATED_BF16
    if precision == "fp16" and not cuda:
        raise UsageError("train.precision=fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bf16; use train.precision=fp16 (with loss scaling)")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _cpu_auto() -> torch.dtype | None:
    """What `auto` is on a CPU: $MPQ_AUTO_PRECISION (`fp32` or `bf16`) if set, so that a CPU
    without native bf16 can run what one with it would."""
    forced = os.environ.get(AUTO_ENV)
    if forced:
        if forced not in ("fp32", "bf16"):
            raise UsageError(f"${AUTO_ENV} must be fp32 or bf16, got {forced!r}")
        return torch.bfloat16 if forced == "bf16" else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | str | None):
    """`torch.autocast` for `dtype`, a no-op for float32, `EmulatedBF16` for `EMULATED_BF16`;
    on the CPU in bf16, convs whose stride passes their padded input run in float32 (see the
    module's docstring)."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == EMULATED_BF16:
        return EmulatedBF16()
    if device.type != "cpu" or dtype != torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=dtype)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type="cpu", dtype=dtype))
    stack.enter_context(_StridePastInputConvInFloat32())
    return stack


def stride_passes_input(input_shape, stride, padding) -> bool:
    """Whether a conv2d's stride exceeds a side of its input while that side is padded: the
    geometry whose bf16 weight gradient oneDNN gets wrong on the CPU."""
    if isinstance(padding, str):  # 'valid' pads nothing; 'same' refuses strides above 1
        return False
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return any(s > side and p > 0 for s, side, p in
               zip(pair(stride), input_shape[-2:], pair(padding)))


class _StridePastInputConvInFloat32(TorchFunctionMode):
    """Runs `F.conv2d` outside autocast, in float32, where `stride_passes_input`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            call = dict(zip(("input", "weight", "bias", "stride", "padding"), args), **kwargs)
            if stride_passes_input(call["input"].shape, call.get("stride", 1),
                                   call.get("padding", 0)):
                cast = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v
                          for k, v in kwargs.items()}
                with torch.autocast(device_type="cpu", enabled=False):
                    return func(*cast, **kwargs)
        return func(*args, **kwargs)


def _to_bf16_and_back(t):
    if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64):
        return t.to(torch.bfloat16).to(t.dtype)
    return t


class EmulatedBF16(TorchFunctionMode):
    """Runs the ops bf16 autocast lowers (convolutions, linear layers, matrix products) on
    inputs rounded to bf16 and rounds their outputs to bf16, in float32: the casts' backward
    rounds the gradients as autocast's bf16 kernels do. Elementwise ops stay in float32 (under
    autocast they run in bf16 after a bf16 op: one rounding more there).

    On a QAT student this is far from a small change: an 8-bit activation that bf16 rounds
    lands on another integer often (up to 52% of a ResNet20 quantizer's; docs/design_notes.md,
    "QAT under bf16")."""

    LOWERED = frozenset((
        torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d,
        torch.conv_transpose2d, torch.conv_transpose3d, torch.nn.functional.linear,
        torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul,
        torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.LOWERED:
            return func(*args, **kwargs)
        args = [_to_bf16_and_back(a) for a in args]
        kwargs = {k: _to_bf16_and_back(v) for k, v in kwargs.items()}
        return _to_bf16_and_back(func(*args, **kwargs))


def grad_scaler(device: torch.device, dtype: torch.dtype | str | None) -> torch.amp.GradScaler:
    """A GradScaler that scales only for fp16 (bf16 has float32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
