"""ResNet20 / CIFAR-10 results: every row of the README's results table, resumably.

Rows are data (`layout.ROWS`); each is computed by the commands a user would run (`compute`),
timed side by side with the others (`latency`), and written as a table (`table`). A row whose
`<results>/<row>.json` exists is not recomputed; an mpq row that no longer stands for its
commands is named and marked stale; an unfinished row parked by another machine (`inflight`)
resumes from its parked checkpoint. `benchmarks/results.py` is the command.
"""

from __future__ import annotations

import json
import shutil
import time

import onnxruntime
import torch

from mpq.errors import UsageError
from mpq.files import write_atomic
from mpq.timing import cpu_summary, openvino_version
from .compute import RowFailed, make_row, smallest_plan, stale
from .inflight import clear, park, parked, parking, unpark
from .latency import latency
from .layout import COMPUTE_ORDER, ROWS, Layout
from .table import (CHANGES_FIGURE, EPOCHS_FIGURE, copy_artifacts, log_changes, log_curve,
                    log_epochs, update_readme, write_table)

__all__ = ["COMPUTE_ORDER", "ROWS", "Layout", "RowFailed", "copy_artifacts", "latency",
           "log_curve", "make_row", "park", "parked", "run", "smallest_plan", "stale",
           "update_readme", "write_table"]


def run(layout: Layout, wanted: list[str], *, data_root=None, table_only: bool = False,
        threads: int = 2, seconds: float = 3.0, publish: bool = False,
        park_every: float | None = None, table: bool = True) -> str:
    """Computes the `wanted` rows still missing, times every finished row and returns the table.

    Writes each row's JSON, `latency.json` and the TensorBoard curve under `layout`; with
    `publish`, also the README's table, each exported row's files under `layout.artifacts` and
    the W4A8 QAT checkpoint beside the teacher. With `park_every`, a row being computed is
    parked every that many minutes (`inflight.parking`). Without `table`, it stops once the
    rows are computed (rows run side by side would time each other's noise): returns ""."""
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.size import fp32_parameter_bytes

    if not layout.teacher.exists():
        raise UsageError(f"teacher {layout.teacher} does not exist; train it first (make run "
                         f"does)")
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        raise UsageError(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    layout.results.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        path = layout.results / f"{name}.json"
        if table_only or path.exists():
            continue
        print(f"{name}: {ROWS[name]}", flush=True)
        if unpark(layout, name):
            info = parked(layout)[name]
            print(f"  resuming from its checkpoint parked after {info['epochs_done']} epochs "
                  f"({info['parked']}, {info['cpu']})", flush=True)
        start = time.time()
        with parking(layout, name, park_every):
            row = make_row(layout, name, data_root=data_root)
        row.update(row=name, what=ROWS[name], wall_seconds=round(time.time() - start, 1))
        write_atomic(path, json.dumps(row, indent=2) + "\n")
        clear(layout, name)
        if not row.get("infeasible"):
            print(f"  top1={row['top1']:.2f} {row['file']} {row['file_bytes']} bytes "
                  f"({row['wall_seconds']:.0f} s)", flush=True)
    if not table:
        return ""
    rows = {name: json.loads((layout.results / f"{name}.json").read_text())
            for name in ROWS if (layout.results / f"{name}.json").exists()}
    stale_rows = {name: reason for name, row in rows.items()
                  if (reason := stale(layout, name, row))}
    for name, reason in stale_rows.items():
        print(f"{name}: stale, marked so in the table: {reason}; to redo it, delete "
              f"{layout.rel(layout.results / f'{name}.json')} and move "
              f"{layout.rel(layout.runs / name)} aside", flush=True)
    fp32_bytes = fp32_parameter_bytes(model_from_checkpoint(load_checkpoint(layout.teacher)))
    print("latency, side by side:", flush=True)
    measured = {name: row for name, row in rows.items() if not row.get("infeasible")}
    lat, rebuilt = latency(layout, measured, threads, seconds, data_root)
    write_atomic(layout.results / "latency.json", json.dumps(
        {"threads": threads, "ms": lat, "cpu": cpu_summary(), "torch": torch.__version__,
         "onnxruntime": onnxruntime.__version__, "openvino": openvino_version(),
         "rebuilt": rebuilt}, indent=2) + "\n")
    table = write_table(rows, lat, fp32_bytes, stale_rows)
    if "fp32" in rows:
        log_curve(layout, measured)
        log_epochs(layout, measured, png=layout.root / EPOCHS_FIGURE if publish else None)
        log_changes(layout, measured, png=layout.root / CHANGES_FIGURE if publish else None)
    if publish:
        update_readme(table, layout.root / "README.md")
        copy_artifacts(layout, measured)
        w4 = layout.runs / "qat_w4" / "qat" / "model.pt"
        if w4.exists():
            shutil.copy2(w4, layout.root / "checkpoints" / "resnet20_cifar10_w4a8.pt")
    return table
