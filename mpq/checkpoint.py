"""Checkpoints: written atomically, read with `torch.load(weights_only=True)`, checked on load.

A checkpoint is a plain dict of tensors and plain data, so loading it can never run code:

    format: "mpq.checkpoint", version: 1
    kind: "fp32" | "qat"
    model: {"name": ..., "num_classes": ...}    # rebuilds the architecture
    normalization: {"mean": [...], "std": [...]}  # 0..1 pixel units; travels with the model
    input_size: int
    state_dict: {...}
    recipe: {...}                                 # the resolved recipe that produced it
    epoch, metrics, and for resumable ones: optimizer, scheduler, rng
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .models import build_model

__all__ = ["CHECKPOINT_VERSION", "load_checkpoint", "model_from_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "mpq.checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Writes `payload` to `path` atomically: a crash leaves the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Reads an mpq checkpoint safely; a missing, corrupted or foreign file is a `UsageError`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"checkpoint {path} is corrupted or not a torch checkpoint ({first})") \
            from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not an mpq checkpoint (no format={CHECKPOINT_FORMAT!r} "
                         f"field); train one with train.py")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise UsageError(f"checkpoint {path} has version {payload.get('version')}; this mpq reads "
                         f"version {CHECKPOINT_VERSION}")
    return payload


def load_state_dict_checked(model: nn.Module, state_dict: dict, *, what: str) -> None:
    """`load_state_dict(strict=True)` whose mismatch is a one-line `UsageError`."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UsageError(f"{what} does not fit the model ({detail[:300]})") from None


def model_from_checkpoint(payload: dict, *, expect_model: str | None = None,
                          path: str | os.PathLike = "checkpoint") -> nn.Module:
    """Rebuilds the model a checkpoint holds (FP32, or fake-quantized for QAT) with its weights."""
    spec = payload.get("model") or {}
    name = spec.get("name")
    if expect_model is not None and name != expect_model:
        raise UsageError(f"checkpoint {path} holds a {name!r} model, but {expect_model!r} was "
                         f"expected; pass a checkpoint of that architecture")
    if payload.get("kind") == "qat":
        from .qat import qat_model_from_checkpoint

        return qat_model_from_checkpoint(payload, path=path)
    model = build_model(name, num_classes=spec.get("num_classes", 10))
    load_state_dict_checked(model, payload["state_dict"], what=f"checkpoint {path}")
    return model
