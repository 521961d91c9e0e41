"""Training loop shared by FP32 training and QAT: schedule, progress, TensorBoard, resume.

Every epoch ends with an atomic `checkpoint_last.pt` holding the model, optimiser, scheduler,
RNG state and history. Data order and augmentation of epoch e are a function of (seed, e), so a
run killed at any point and resumed ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import shutil
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint, model_meta, save_checkpoint
from . import distributed
from .config import TrainConfig, recipe_to_dict
from .data import load_split, make_loader
from .device import resolve_device
from .ema import WeightAverage
from .errors import UsageError
from .files import atomic_path, write_atomic
from .precision import autocast, autocast_dtype, grad_scaler

__all__ = ["Batches", "TrainingDiverged", "evaluate", "fit", "kept_name", "lr_factor",
           "make_loaders", "make_optimizer", "schedule_length", "train_fp32", "train_step",
           "write_metrics"]

LAST = "checkpoint_last.pt"
_RESUME_KEYS = ("state_dict", "optimizer", "scheduler", "rng", "epoch", "history")


def kept_name(epochs: int) -> str:
    """The file a run keeps its checkpoint in after `epochs` epochs (`fit`'s `keep_epochs`)."""
    return f"checkpoint_epoch{epochs}.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based, per optimiser step).

    onecycle: linear warm-up from 0 to 1 over `warmup_steps`, then cosine to 0.
    cosine: cosine from 1 to 0. constant: 1.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle" and step < warmup_steps:
        return (step + 1) / warmup_steps
    start = warmup_steps if schedule == "onecycle" else 0
    progress = (step - start) / max(1, total_steps - start)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> dict:
    """Top-1 accuracy (percent) and mean cross-entropy over a whole loader, in float32 and in
    contiguous memory format whatever training used: every figure mpq reports is that of the
    model it saves and exports, computed as `mpq eval` and the export compute it. (Under bf16
    autocast a ResNet20's top-1 read 0.15 points above its exported model's; in channels_last
    a 13x plan read 89.34 against 89.35: a float32 rounding difference moves a value across
    an activation quantizer's step.)"""
    was_training = model.training
    channels_last = any(p.dim() == 4 and not p.is_contiguous() and
                        p.is_contiguous(memory_format=torch.channels_last)
                        for p in model.parameters())
    if channels_last:
        model.to(memory_format=torch.contiguous_format)  # in place: optimizers keep their refs
    model.eval()
    correct, loss, n = 0, 0.0, 0
    try:
        for x, y in loader.epoch(0):
            logits = model(x.contiguous())
            loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
    finally:
        if channels_last:
            model.to(memory_format=torch.channels_last)
        model.train(was_training)
    return {"top1": 100.0 * correct / n, "loss": loss / n}


def _cross_entropy(label_smoothing: float):
    def loss_fn(model, x, y):
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits, {}
    return loss_fn


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def schedule_length(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(optimiser steps, epochs) of a run: `cfg.epochs` passes, or fewer under `max_steps`."""
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return total, -(-total // steps_per_epoch)


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    """SGD and its per-step learning-rate schedule over `total_steps`, as every training here
    (FP32, QAT by recipe, `fine_tune_qat`) uses them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov and cfg.momentum > 0,
                                weight_decay=cfg.weight_decay)
    warmup = round(cfg.warmup_epochs / cfg.epochs * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total_steps=total_steps, warmup_steps=warmup, schedule=cfg.schedule))
    return optimizer, scheduler


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: Callable,
               optimizer, scheduler, scaler, amp: torch.dtype | None, where: str = ""):
    """One optimiser step (autocast, scaled backward, schedule); returns `loss_fn`'s
    (loss, logits, terms). A loss that is not finite stops training (`where` says where)."""
    with autocast(x.device, amp):
        loss, logits, terms = loss_fn(net, x, y)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"loss became {loss.item()} at {where or 'a training step'}; "
                               f"lower train.lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss, logits, terms


def fit(model: nn.Module, *, train_loader, recipe=None, test_loader=None,
        out_dir: str | os.PathLike | None = None, meta: dict | None = None,
        meta_match: dict[str, Callable] | None = None, train_cfg: TrainConfig | None = None,
        loss_fn: Callable | None = None, progress: bool = True, log: bool = True,
        on_epoch_start: Callable[[int], None] | None = None,
        epoch_logger: Callable | None = None,
        on_train_end: Callable[[nn.Module, dict], dict] | None = None,
        keep_epochs: tuple[int, ...] = ()) -> dict:
    """Trains `model` in place and returns the final metrics; resumes from `out_dir` if possible.
    The one training loop of mpq: FP32 training, QAT by recipe and `fine_tune_qat` all run it.

    Args:
        model: the network, already on its device.
        train_loader: batches for training: `len()` steps an epoch, `.epoch(e, start_batch=0)`
            the batches of epoch e (an `mpq.data` loader, or `Batches` over any batches).
        recipe: the resolved recipe; stored in every checkpoint and compared on resume.
        test_loader: batches for the per-epoch test (float32); None: no test.
        out_dir: run folder: `checkpoint_last.pt`, `model.pt`, `metrics.json`, `tb/`; None:
            train in memory, no files and no resume.
        meta: plain data stored in every checkpoint (model spec, normalisation, plan, ...).
        meta_match: for a key of `meta`, `(recorded, now) -> bool` telling whether a run whose
            checkpoint recorded `recorded` is this command's run (default: equality).
        train_cfg: optimiser and schedule; defaults to `recipe.train`.
        loss_fn: `(model, x, y) -> (loss, logits, {name: tensor})`; defaults to cross-entropy.
        progress: show a progress bar per epoch.
        log: print one summary line per epoch.
        on_epoch_start: called with the epoch index before each epoch (e.g. to freeze BN).
        epoch_logger: called as `(writer, model, epoch)` after each epoch for extra scalars.
        on_train_end: called as `(model, metrics)` once the last epoch is done (also when a
            finished run is resumed), before `model.pt` is written; may change the model, and
            returns metrics that update the final ones (e.g. `top1` after BN re-estimation).
        keep_epochs: after each of these epochs (counted from 1), `checkpoint_last.pt` is
            also kept as `checkpoint_epoch<N>.pt`: a run to fork there with one setting
            changed (`benchmarks/results.py`'s fork rows).
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    cfg = train_cfg or recipe.train
    main = distributed.is_main()
    progress, log = progress and main, log and main
    files = out_dir is not None
    out = Path(out_dir) if files else None
    if files:
        out.mkdir(parents=True, exist_ok=True)
    recipe_dict = recipe_to_dict(recipe) if files else {}
    meta = meta or {}
    loss_fn = loss_fn or _cross_entropy(cfg.label_smoothing)
    device = next(model.parameters()).device
    amp = autocast_dtype(cfg.precision, device)
    scaler = grad_scaler(device, amp)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch < 1:
        raise UsageError(f"the training split has {len(getattr(train_loader, 'split', []))} "
                         f"images, fewer than one batch of {cfg.batch_size}; lower "
                         f"train.batch_size")
    total, epochs = schedule_length(cfg, steps_per_epoch)
    if any(not 1 <= k <= epochs for k in keep_epochs):
        raise UsageError(f"--keep-epoch must name epochs in 1..{epochs} (this run's), got "
                         f"{', '.join(map(str, keep_epochs))}")
    optimizer, scheduler = make_optimizer(model, cfg, total)

    start_epoch, history, partial = 0, [], None
    if files and (out / LAST).is_file():
        state = load_checkpoint(out / LAST)
        missing = [k for k in _RESUME_KEYS if k not in state]
        if missing:
            raise UsageError(f"{out / LAST} is malformed: it has no {missing[0]!r} (not a file "
                             f"this mpq wrote, or one edited since); move it aside to start "
                             f"afresh")
        diff = _diff_keys(state.get("recipe") or {}, recipe_dict, recipe)
        if diff:
            raise UsageError(f"{out} holds a run of a different recipe (differs in: "
                             f"{', '.join(diff) or 'meta'}); use another --out to start afresh")
        # The run's identity beyond its recipe: model, kind, and for QAT the plan (bit widths
        # change no tensor shape, so a run of another plan would load without complaint).
        match = meta_match or {}
        other = sorted(k for k, v in meta.items()
                       if k in state and not match.get(k, operator.eq)(state[k], v))
        if other:
            raise UsageError(f"{out} holds a run of another {' and '.join(other)} than this "
                             f"command's; use another --out to start afresh")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        _set_rng(ranks[distributed.rank()] if len(ranks) == distributed.world_size()
                 else state["rng"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        partial = state.get("partial")
        if log:
            where = (f"at step {partial['batch']} of epoch {partial['epoch'] + 1}" if partial
                     else f"after epoch {start_epoch}")
            print(f"resuming {out} {where} of {epochs}")
    elif files and main:
        write_atomic(out / "recipe.yaml", _yaml(recipe_dict))

    average = None
    if cfg.ema_epochs:
        average = WeightAverage(model, cfg.ema_epochs * steps_per_epoch)
        if start_epoch or partial:
            if "ema" not in state:
                raise UsageError(f"{out / LAST} was written without train.ema_epochs: resume "
                                 f"it without, or use another --out to start afresh")
            average.load_state_dict(state["ema"])
    net = distributed.wrap(model, device)
    if cfg.compile:
        net = torch.compile(net)
    shard = not getattr(train_loader, "sharded", False)
    first_step = (partial["epoch"] * steps_per_epoch + partial["batch"] if partial
                  else start_epoch * steps_per_epoch)
    writer = (SummaryWriter(str(out / "tb"), purge_step=first_step or None)
              if files and main else _NullWriter())

    def save_last(epoch: int, extra: dict) -> None:
        if not files:
            return
        rngs = distributed.all_gather(_get_rng())  # each rank's own: dropout stays exact
        if main:
            save_checkpoint(out / LAST, {
                **meta, "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
                "epoch": epoch, "history": history, "recipe": recipe_dict,
                **({"ema": average.state_dict()} if average else {}), **extra})
        distributed.barrier()

    kept = f". The last good checkpoint ({out / LAST}, if any) is kept" if files else ""
    try:
        for epoch in range(start_epoch, epochs):
            model.train()
            if on_epoch_start:
                on_epoch_start(epoch)
            resumed = partial if partial and partial["epoch"] == epoch else None
            partial = None
            started = time.time() - (resumed["seconds"] if resumed else 0.0)
            sums: dict[str, float] = dict(resumed["sums"]) if resumed else {}
            correct, seen = (resumed["correct"], resumed["seen"]) if resumed else (0, 0)
            first = resumed["batch"] if resumed else 0
            last = min(steps_per_epoch, total - epoch * steps_per_epoch)
            saved_at = time.time()
            batches = train_loader.epoch(epoch, start_batch=first)
            bar = tqdm(batches, total=last, initial=first, disable=not progress,
                       desc=f"epoch {epoch + 1}/{epochs}", leave=False, mininterval=2.0)
            for i, (x, y) in enumerate(bar, start=first):
                if shard:
                    x, y = distributed.shard(x, y)
                loss, logits, terms = train_step(
                    net, x, y, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                    scaler=scaler, amp=amp,
                    where=f"epoch {epoch + 1}, step {i + 1}; stopped" + kept)
                if average:
                    average.update(model)
                step = epoch * steps_per_epoch + i
                for name, value in {"loss": loss, **terms}.items():
                    sums[name] = sums.get(name, 0.0) + value.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                if i % 50 == 0:
                    writer.add_scalar("train/loss_step", loss.item(), step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}",
                                acc=f"{100 * correct / seen:.1f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.4f}", refresh=False)
                if i + 1 >= last:
                    break
                due = bool(cfg.checkpoint_steps and (i + 1) % cfg.checkpoint_steps == 0)
                if cfg.checkpoint_minutes:  # by the clock: all ranks must agree
                    due = distributed.any_rank(
                        due or time.time() - saved_at >= 60 * cfg.checkpoint_minutes)
                if due:
                    save_last(epoch - 1, {"partial": {
                        "epoch": epoch, "batch": i + 1, "sums": sums, "correct": correct,
                        "seen": seen, "seconds": time.time() - started}})
                    saved_at = time.time()
            bar.close()
            batches.close()
            with average.applied(model) if average else nullcontext():
                test = (evaluate(model, test_loader) if test_loader is not None
                        else {"top1": None, "loss": None})
            # An averaging run tests its live weights too: what the average buys, same seed.
            live = ({"live_test_top1": evaluate(model, test_loader)["top1"]}
                    if average and test_loader is not None else {})
            row = {"epoch": epoch + 1, "train_top1": 100 * correct / seen,
                   **{f"train_{k}": v / seen for k, v in sums.items()},
                   "test_top1": test["top1"], "test_loss": test["loss"], **live,
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - started,
                   "steps": last}
            history.append(row)
            for key, value in row.items():
                if key not in ("epoch", "steps") and value is not None:
                    writer.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
            if epoch_logger:
                epoch_logger(writer, model, epoch + 1)
            writer.flush()
            save_last(epoch, {})
            if files and main and epoch + 1 in keep_epochs:
                with atomic_path(out / kept_name(epoch + 1)) as tmp:
                    shutil.copyfile(out / LAST, tmp)
            if log:
                tested = f" test {test['top1']:.2f}%" if test["top1"] is not None else ""
                if live:
                    tested += f" (live weights {live['live_test_top1']:.2f}%)"
                print(f"epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f} "
                      f"train {row['train_top1']:.2f}%{tested} ({row['seconds']:.0f} s)",
                      flush=True)
        if average:  # what is tested each epoch is what is saved and exported
            average.copy_to(model)
        final = history[-1] if history else {}
        metrics = {"top1": final.get("test_top1"), "test_loss": final.get("test_loss"),
                   "epochs": epochs, "steps": total, "precision": str(amp or torch.float32),
                   "train_seconds": sum(r["seconds"] for r in history),
                   **({"live_top1": final["live_test_top1"]} if "live_test_top1" in final
                      else {})}
        if on_train_end:
            metrics.update(on_train_end(model, dict(metrics)))
            for key in ("top1", "test_loss"):
                writer.add_scalar(f"final/{key}", metrics[key], epochs)
    finally:
        writer.close()

    if files and main:
        save_checkpoint(out / "model.pt", {**meta, "state_dict": model.state_dict(),
                                           "epoch": epochs - 1, "metrics": metrics,
                                           "recipe": recipe_dict})
    distributed.barrier()
    return metrics


class Batches:
    """Any re-iterable (input, label) batches with a length (a DataLoader, a list) as `fit`
    reads a loader: one pass an epoch, each batch moved to `device` (images in
    `memory_format`)."""

    def __init__(self, batches, device: torch.device,
                 memory_format: torch.memory_format = torch.preserve_format):
        try:
            self.steps = len(batches)
        except TypeError:
            raise UsageError("training needs batches with a length (a DataLoader or a list), "
                             "to lay out its learning-rate schedule") from None
        self.batches, self.device, self.memory_format = batches, device, memory_format

    def __len__(self) -> int:
        return self.steps

    def move(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return x.to(self.device, memory_format=self.memory_format)
        return x.to(self.device)

    def epoch(self, epoch: int, start_batch: int = 0):
        for x, y in islice(iter(self.batches), start_batch, None):
            yield self.move(x), y.to(self.device)


def _get_rng() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class _NullWriter:
    """Stands in for SummaryWriter on ranks other than 0."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _diff_keys(a: dict, b: dict, spec=None, prefix: str = "") -> list[str]:
    # Keys present on one side only are fields added to the recipe format after the run began,
    # which ran on their defaults: they block a resume only where this recipe (`b`, resolved
    # from the dataclass `spec`) sets one to something else.
    keys = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            if k in b and b[k] != _field_default(spec, k):
                keys.append(prefix + k)
            continue
        va, vb = a[k], b[k]
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, getattr(spec, k, None), f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def _field_default(spec, name: str):
    """The default of dataclass `spec`'s field `name` as plain data; a fresh object (equal to
    nothing) where it has none."""
    field = {f.name: f for f in dataclasses.fields(spec)}.get(name) if (
        dataclasses.is_dataclass(spec)) else None
    if field is not None and field.default is not dataclasses.MISSING:
        return field.default
    if field is not None and field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        return recipe_to_dict(value) if dataclasses.is_dataclass(value) else value
    return object()


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def write_metrics(out_dir: str | os.PathLike, metrics: dict) -> None:
    """Writes `metrics.json` atomically."""
    _write_json(Path(out_dir) / "metrics.json", metrics)


def make_loaders(recipe, *, data_root=None, device: torch.device, progress: bool = True,
                 train_cfg: TrainConfig | None = None, classes: list[str] | None = None):
    """Training and test loaders for a recipe (in memory, decoded and cached the first time, or
    streamed from the files; see `mpq.data`). Both splits must have the model's classes
    (`classes`, default the training split's); `data.train_images` subsets the training split."""
    cfg = train_cfg or recipe.train
    data = recipe.data
    kwargs = dict(root=data_root, num_classes=recipe.model.num_classes, progress=progress)
    train = load_split(data, "train", classes=classes, **kwargs)
    test = load_split(data, "test", classes=train.classes, **kwargs)
    if len(train.classes) != recipe.model.num_classes:
        raise UsageError(f"the data has {len(train.classes)} classes but model.num_classes is "
                         f"{recipe.model.num_classes}; set model.num_classes to match")
    if data.train_images and data.train_images < len(train):
        g = torch.Generator().manual_seed(cfg.seed)
        train = train.subset(torch.randperm(len(train), generator=g)[:data.train_images])
    common = dict(device=device, channels_last=cfg.channels_last)
    return (make_loader(train, data, batch_size=cfg.batch_size, train=True, seed=cfg.seed,
                        rank=distributed.rank(), world_size=distributed.world_size(), **common),
            make_loader(test, data, batch_size=cfg.eval_batch_size, train=False, **common))


def train_fp32(recipe, *, out_dir: str | os.PathLike, data_root=None,
               device: str | torch.device = "auto", progress: bool = True,
               log: bool = True, keep_epochs: tuple[int, ...] = ()) -> dict:
    """The FP32 stage: trains `recipe.model` from scratch (or resumes) and returns its metrics.

    Writes `out_dir/model.pt` (the teacher), `checkpoint_last.pt`, `metrics.json`, `tb/`.
    """
    from .models import build_model

    device = distributed.init_from_env(resolve_device(device))
    train_loader, test_loader = make_loaders(recipe, data_root=data_root, device=device,
                                             progress=progress and distributed.is_main())
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model.name, num_classes=recipe.model.num_classes).to(device)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    metrics = fit(model, recipe=recipe, train_loader=train_loader, test_loader=test_loader,
                  out_dir=out_dir, meta={**model_meta(recipe), "kind": "fp32",
                                         "classes": train_loader.split.classes},
                  progress=progress, log=log, keep_epochs=keep_epochs)
    if distributed.is_main():
        write_metrics(out_dir, metrics)
    return metrics
