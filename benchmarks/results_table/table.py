"""The results as a Markdown table, in the README between its markers, as a TensorBoard curve,
and as each exported row's committed small files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mpq.errors import UsageError
from mpq.files import atomic_path, write_atomic
from .layout import ARTIFACT_FILES, EPOCH_CURVE, QAT_CHANGES, ROWS, Layout

__all__ = ["change_points", "copy_artifacts", "epoch_points", "log_changes", "log_curve", "log_epochs", "update_readme",
           "write_table"]

EPOCHS_FIGURE = "docs/figures/points_lost_vs_epochs.png"
CHANGES_FIGURE = "docs/figures/qat_changes.png"

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def write_table(rows: dict, lat: dict, fp32_bytes: int, stale_rows=()) -> str:
    """The Markdown table of `rows` (by name, in `ROWS` order) with latencies `lat`."""
    teacher = rows["fp32"]["top1"] if "fp32" in rows else None
    lines = ["| row | top-1 % | lost (points) | stored as | size on disk | compression | "
             "batch 1 | batch 256 | QAT epochs |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, what in ROWS.items():
        if name not in rows:
            continue
        row = rows[name]
        if row.get("infeasible"):
            lines.append(f"| {what} | infeasible | | | budget {row['budget_bytes'] / 1000:.1f} KB"
                         f" < smallest plan {row['smallest_bytes'] / 1000:.1f} KB (all "
                         f"{row['smallest_bits']}-bit) | max "
                         f"{row['smallest_compression']:.2f}x | | | |")
            continue
        best = {}
        for batch in ("1", "256"):
            options = {k.split("/")[1]: v for k, v in lat.get(batch, {}).items()
                       if k.split("/")[0] == name}
            best[batch] = (f"{min(options.values()):.2f} ms ({min(options, key=options.get)})"
                           if options else "")
        lost = f"{teacher - row['top1']:.2f}" if teacher is not None else ""
        if name in stale_rows:
            what += " (stale: rerun benchmarks/results.py)"
        lines.append(f"| {what} | {row['top1']:.2f} | {lost} | {row['file']} | "
                     f"{row['file_bytes'] / 1000:.1f} KB | {fp32_bytes / row['file_bytes']:.2f}x | "
                     f"{best['1']} | {best['256']} | {row['epochs']} |")
    return "\n".join(lines)


def update_readme(table: str, readme: Path) -> None:
    """Puts `table` between the README's results markers."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise UsageError(f"{readme} lacks the {BEGIN} / {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_atomic(readme, f"{head}{BEGIN}\n{table}\n{END}{tail}")


def log_curve(layout: Layout, rows: dict) -> None:
    """Top-1 and points lost against size on disk, in TensorBoard under `layout.runs / "tb"`."""
    from torch.utils.tensorboard import SummaryWriter

    from mpq.report import scatter_figure

    teacher = rows["fp32"]["top1"]
    # Drawn whole each run: an older run's event file would show every point twice.
    for old in (layout.runs / "tb").glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(layout.runs / "tb"))
    points = []
    for name, row in sorted(rows.items(), key=lambda kv: kv[1]["file_bytes"]):
        if name.startswith(("mpq_", "qat_w", "fp32")):
            kb = row["file_bytes"] / 1000
            writer.add_scalar("accuracy_vs_size/top1", row["top1"], round(kb))
            writer.add_scalar("accuracy_vs_size/points_lost", teacher - row["top1"], round(kb))
            points.append((kb, teacher - row["top1"]))
    writer.add_figure("accuracy_vs_size/points_lost_vs_KB",
                      scatter_figure(points, title="ResNet20 / CIFAR-10: points lost vs size",
                                     xlabel="KB on disk", ylabel="points lost"))
    writer.close()


def epoch_points(rows: dict) -> dict[str, list[tuple[int, float, str]]]:
    """EPOCH_CURVE's series as (epochs, points lost, row) of the finished rows."""
    teacher = rows["fp32"]["top1"]
    return {series: [(rows[n]["epochs"], round(teacher - rows[n]["top1"], 2), n)
                     for n in names if n in rows]
            for series, (_, names) in EPOCH_CURVE.items()}


def log_epochs(layout: Layout, rows: dict, *, png: Path | None = None) -> None:
    """Points lost against QAT epochs (EPOCH_CURVE: the 13x plan, the 16x plan, uniform
    ternary), in TensorBoard under `layout.runs / "tb"` (call after `log_curve`, which clears
    that folder) and, with `png`, as an image file."""
    from torch.utils.tensorboard import SummaryWriter

    from mpq.report import series_figure

    series = {name: [(e, lost) for e, lost, _ in points]
              for name, points in epoch_points(rows).items()}
    writer = SummaryWriter(str(layout.runs / "tb"))
    for name, (tag, _) in EPOCH_CURVE.items():
        for epochs, lost in sorted(series[name]) if tag else ():
            writer.add_scalar(f"{tag}/points_lost", lost, epochs)
    fig = series_figure(series, title="ResNet20: points lost vs QAT epochs",
                        xlabel="QAT epochs (log scale)", ylabel="points lost", logx=True,
                        unjoined=[name for name, (tag, _) in EPOCH_CURVE.items() if not tag])
    _publish_figure(writer, "epochs/points_lost_vs_epochs", fig, png)


def change_points(rows: dict) -> dict[str, tuple[list[float], list[tuple[str, float]]]]:
    """QAT_CHANGES of the finished rows: per group, the points lost by the recipe's own runs
    and (label, points lost) of each change."""
    teacher = rows["fp32"]["top1"]

    def lost(name):
        return round(teacher - rows[name]["top1"], 2)
    return {group: ([lost(n) for n in base if n in rows],
                    [(label, lost(n)) for label, n in changes.items() if n in rows])
            for group, (base, changes) in QAT_CHANGES.items()}


def log_changes(layout: Layout, rows: dict, *, png: Path | None = None) -> None:
    """Points lost by each QAT change beside the spread of the recipe's own runs, in
    TensorBoard (`changes/`) and, with `png`, as an image file."""
    from torch.utils.tensorboard import SummaryWriter

    from mpq.report import changes_figure

    fig = changes_figure(change_points(rows), title="ResNet20: one QAT change, 10 epochs",
                         xlabel="points lost")
    _publish_figure(SummaryWriter(str(layout.runs / "tb")), "changes/points_lost_by_qat_change",
                    fig, png)


def _publish_figure(writer, tag: str, fig, png: Path | None) -> None:
    """`fig` into TensorBoard under `tag` (closing `writer`) and, with `png`, into that file."""
    writer.add_figure(tag, fig, close=False)
    writer.close()
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")  # long labels


def copy_artifacts(layout: Layout, rows: dict) -> None:
    """Each exported row's small files into `layout.artifacts/<row>/`; export.json's record of
    the checkpoint it came from made repository-relative, so the committed copy names no
    machine."""
    for name, row in rows.items():
        if "export_dir" not in row:
            continue
        export = layout.in_repo(row["export_dir"])
        if not export.exists():
            continue  # a fresh clone: the committed copies are all there is
        target = layout.artifacts / name
        target.mkdir(parents=True, exist_ok=True)
        for file in ARTIFACT_FILES:
            source = export / file if file != "plan.json" else export.parent / "plan.json"
            shutil.copy2(source, target / file)
        report = json.loads((target / "export.json").read_text())
        report["checkpoint"] = layout.rel(report["checkpoint"])
        write_atomic(target / "export.json", json.dumps(report, indent=2) + "\n")
