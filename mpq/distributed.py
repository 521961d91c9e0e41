"""Data-parallel training under `torchrun`: nothing home-made, just DDP wired in one place.

Every rank draws the same global batch (same seed, same augmentation) and trains on its slice
`rank::world_size`, so N processes see exactly the batches one process would. Calibration runs
identically on every rank and DDP broadcasts rank 0's parameters and buffers (quantizer scales,
BN statistics) when it wraps the model and its buffers before each forward, so all ranks train
the same quantized model. Only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["all_gather", "any_rank", "barrier", "init_from_env", "is_main", "rank", "shard",
           "world_size", "wrap"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Joins the process group torchrun describes (NCCL on GPUs, gloo on CPUs), if any.

    Returns the device this rank should use (cuda:LOCAL_RANK under torchrun with GPUs).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return device


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a global batch."""
    n = world_size()
    if n == 1:
        return x, y
    if len(y) % n:
        raise ValueError(f"batch of {len(y)} does not split over {n} processes; choose "
                         f"train.batch_size divisible by the process count")
    return x[rank()::n], y[rank()::n]


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around `model` when running distributed; the model itself otherwise.

    `find_unused_parameters` is on because freezing BN in QAT stops gamma from being used.
    """
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank: a decision every rank takes together (a checkpoint
    due by the clock of one rank must be written by all, or the barrier inside deadlocks)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather(obj) -> list:
    """`obj` from every rank, in rank order (plain picklable data)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
