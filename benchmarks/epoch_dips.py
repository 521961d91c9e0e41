"""Epoch-end dips in a row's test curve, beside where the last `mse` ratio refresh fell.

    python benchmarks/epoch_dips.py ROW[:OLD] [ROW[:OLD] ...] [--near 8] [--deepest 3]
        [--from-epoch 40] [--steps-per-epoch 390] [--refresh-every 100]

Each ROW's curve is its committed `benchmarks/results/ROW.json` (`test_top1_by_epoch`), or for
a row still in flight its parked checkpoint's history (`benchmarks/results/inflight/`). An
epoch's dip is its test top-1 less the mean of its two neighbours'. A weight quantizer searches
its clipping ratio afresh every `--refresh-every` of its steps; before the step-count mend
(commit 0c5e595) QAT's logging after each epoch counted as one, so an epoch took
`--steps-per-epoch` + 1: OLD is the last epoch a row ran on that count (`all`: every epoch;
default 0, none). For every epoch whose last `--near` steps held a refresh this prints its dip,
and then the `--deepest` dips from `--from-epoch` on, so the two lists can be compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from results_table.compute import epoch_curve  # noqa: E402


def curve(row: str) -> list[float]:
    """The row's test top-1 after each epoch (index 0: epoch 1); a `ValueError` if it has
    none."""
    finished = RESULTS / f"{row}.json"
    if finished.is_file():
        by_epoch = json.loads(finished.read_text()).get("test_top1_by_epoch")
        if by_epoch:
            return list(by_epoch)
    parked = epoch_curve(RESULTS / "inflight" / row)
    if parked:
        return parked
    raise ValueError(f"{row} has no per-epoch curve: neither {finished.relative_to(ROOT)} with "
             f"test_top1_by_epoch nor a parked run in {(RESULTS / 'inflight').relative_to(ROOT)}")


def steps_after_refresh(epochs: int, old: int, per_epoch: int, every: int) -> list[int]:
    """For each epoch, how many of its training steps followed its last ratio refresh (None
    where the epoch held none; 0 where the old count's logging read refreshed, after them)."""
    out, done = [], 0
    for epoch in range(1, epochs + 1):
        counted = epoch <= old  # the epoch's last count was the logging read, not a step
        start, done = done, done + per_epoch + counted
        last = (done - 1) // every * every  # the last count that refreshed
        out.append(max(0, done - 1 - counted - last) if last >= start else None)
    return out


def dips(top1: list[float]) -> dict[int, float]:
    """Epoch (1-based) -> its top-1 less the mean of its neighbours'."""
    return {e + 1: top1[e] - (top1[e - 1] + top1[e + 1]) / 2 for e in range(1, len(top1) - 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rows", nargs="+", help="ROW or ROW:OLD (OLD: last epoch on the old count, "
                                           "or all)")
    p.add_argument("--near", type=int, default=8, help="a refresh this many steps or fewer "
                                                        "before an epoch's end")
    p.add_argument("--deepest", type=int, default=3)
    p.add_argument("--from-epoch", type=int, default=40)
    p.add_argument("--steps-per-epoch", type=int, default=390)
    p.add_argument("--refresh-every", type=int, default=100)
    args = p.parse_args()
    for spec in args.rows:
        row, _, old = spec.partition(":")
        try:
            top1 = curve(row)
        except ValueError as exc:
            p.error(str(exc))
        try:
            old = len(top1) if old == "all" else int(old or 0)
        except ValueError:
            p.error(f"{spec}: OLD must be an epoch number or all")
        after = steps_after_refresh(len(top1), old, args.steps_per_epoch, args.refresh_every)
        dip = dips(top1)
        print(f"{row} ({len(top1)} epochs, old count through epoch {old}):")
        for epoch, n in enumerate(after, 1):
            if n is not None and n <= args.near and epoch in dip:
                print(f"  epoch {epoch}: refresh {n} steps before its end, top-1 "
                      f"{top1[epoch - 1]:.2f}, dip {dip[epoch]:+.2f}")
        late = sorted((d, e) for e, d in dip.items() if e >= args.from_epoch)[:args.deepest]
        print(f"  deepest from epoch {args.from_epoch}: " + ", ".join(
            f"{e} ({d:+.2f}, refresh {after[e - 1]} steps before its end)" for d, e in late))


if __name__ == "__main__":
    main()
