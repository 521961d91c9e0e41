"""Unfinished rows carried from one machine to the next.

A long QAT row (60 epochs: about five hours on one thread here) outlasts a session, and
`runs/` does not survive one, so `park` copies each unfinished row's last checkpoint (the model,
optimiser, scheduler, RNG states and position: what `train.py` resumes from exactly), its
resolved recipe and any checkpoint it keeps for a fork row into
`benchmarks/results/inflight/<row>/`, to be committed; `unpark` puts them back into the row's
run folder before the row runs again, and `clear` drops them once the row's JSON is written
(but a kept checkpoint that an unfinished fork still starts from). A row's searches are not
parked: they are seeded and give the same plan when run again, and `train.py` refuses a
checkpoint whose plan or recipe differs.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from mpq.files import atomic_path, write_atomic
from mpq.timing import cpu_summary
from mpq.trainer import kept_name

from .layout import FORK_ROWS, Layout

__all__ = ["clear", "kept_checkpoint", "park", "parked", "parking", "unpark"]

FILES = ("checkpoint_last.pt", "recipe.yaml")
KEPT = "checkpoint_epoch*.pt"  # kept for fork rows (train.py --keep-epoch)


def _qat(layout: Layout, name: str):
    return layout.runs / name / "qat"


def _parked(layout: Layout, name: str):
    return layout.results / "inflight" / name


def park(layout: Layout, rows: list[str]) -> dict[str, int]:
    """Parks every unfinished row of `rows` that has a QAT checkpoint; returns each parked
    row's epochs done."""
    done = {}
    for name in rows:
        source = _qat(layout, name)
        if (layout.results / f"{name}.json").exists() or not (source / FILES[0]).is_file():
            continue
        target = _parked(layout, name)
        target.mkdir(parents=True, exist_ok=True)
        for file in (*FILES, *(p.name for p in sorted(source.glob(KEPT)))):
            with atomic_path(target / file) as tmp:
                shutil.copyfile(source / file, tmp)
        state = torch.load(target / FILES[0], weights_only=True, map_location="cpu")
        epochs = int(state["epoch"]) + 1  # the last epoch it finished, counted from 0
        write_atomic(target / "parked.json", json.dumps(
            {"row": name, "epochs_done": epochs, "cpu": cpu_summary(),
             "parked": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2) + "\n")
        done[name] = epochs
    return done


@contextmanager
def parking(layout: Layout, name: str, minutes: float | None):
    """Parks row `name` every `minutes` while the body runs (None: never), so that a session
    stopped without warning leaves a recent checkpoint in the work tree to commit. Checkpoints
    are written atomically, so a copy taken while the row trains is one whole file."""
    if not minutes:
        yield
        return
    stop = threading.Event()

    def loop():
        while not stop.wait(60 * minutes):
            park(layout, [name])

    thread = threading.Thread(target=loop, name=f"park {name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def parked(layout: Layout) -> dict[str, dict]:
    """What is parked: row -> its parked.json."""
    root = layout.results / "inflight"
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/parked.json"))}


def unpark(layout: Layout, name: str) -> bool:
    """Puts a parked row's checkpoint back where its QAT run resumes from, unless that run
    folder already has one (a run of this machine, newer or the same); True if it did."""
    source, target = _parked(layout, name), _qat(layout, name)
    if not (source / FILES[0]).is_file() or (target / FILES[0]).is_file():
        return False
    target.mkdir(parents=True, exist_ok=True)
    for file in (*FILES, *(p.name for p in sorted(source.glob(KEPT)))):
        with atomic_path(target / file) as tmp:
            shutil.copyfile(source / file, tmp)
    return True


def clear(layout: Layout, name: str) -> None:
    """Drops finished row `name`'s parked files, but a kept checkpoint an unfinished fork of
    it still starts from; a fork's end drops its finished parent's last kept files."""
    if name in FORK_ROWS and (layout.results / f"{FORK_ROWS[name][1]}.json").exists():
        clear(layout, FORK_ROWS[name][1])
    folder = _parked(layout, name)
    needed = {kept_name(epochs) for fork, (_, parent, epochs, _) in FORK_ROWS.items()
              if parent == name and not (layout.results / f"{fork}.json").exists()}
    for file in folder.glob("*") if folder.is_dir() else ():
        if file.name not in needed:
            file.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def kept_checkpoint(layout: Layout, name: str, epochs: int) -> Path | None:
    """Row `name`'s checkpoint kept after `epochs` epochs, in its run folder or parked; None
    where neither has it."""
    for folder in (_qat(layout, name), _parked(layout, name)):
        if (folder / kept_name(epochs)).is_file():
            return folder / kept_name(epochs)
    return None
