"""Mixed precision: which autocast dtype a device trains in, and the context that applies it.

`auto` is bf16 autocast on CUDA GPUs that support it, fp16 autocast with a GradScaler on older
GPUs, bf16 on CPUs with native bf16 arithmetic (AMX or AVX-512 BF16), and float32 on other CPUs,
where bf16 is emulated and slower than float32 (see `benchmarks/train_speed.py`; README,
"Training runs under autocast", for the measurement behind the CPU choice). `$MPQ_AUTO_PRECISION`
(`fp32` or `bf16`) overrides what `auto` is on a CPU.
The fake quantizers always compute in float32 (`mpq.quant.modules`): a step of an 8-bit grid is
1/256 of its range, and bf16 keeps 8 significant bits, so x / scale rounded in bf16 would land
on the wrong integer.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .errors import UsageError

__all__ = ["AUTO_ENV", "PRECISIONS", "autocast", "autocast_dtype", "cpu_has_fast_bf16",
           "grad_scaler"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


AUTO_ENV = "MPQ_AUTO_PRECISION"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None for float32."""
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


def autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` for `dtype`, or a no-op for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that scales only for fp16 (bf16 has float32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
