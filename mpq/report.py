"""TensorBoard views of a search and of QAT, drawn with matplotlib to be read at TensorBoard's
default size: per-layer sensitivity on a log scale with its standard errors, the
Hessian-weighted perturbation of every layer at every bit width with the chosen bits marked,
bits beside each layer's weights and bytes, the trials' size against score with the Pareto
front, the budget and the chosen plan; the trials as HPARAMS; QAT's accuracy beside the
teacher's and its per-layer quantization error as grouped charts."""

from __future__ import annotations


import numpy as np

__all__ = ["FIGURE_WIDTH", "bits_figure", "changes_figure", "log_qat_layout", "log_search", "log_sensitivity",
           "log_trials_hparams", "pareto_points", "perturbation_figure", "scatter_figure",
           "series_figure",
           "sensitivity_figure", "trials_figure"]

# TensorBoard's IMAGES tab fits each image into a card about 330 pixels wide (a 1400-pixel
# window, default zoom): figures drawn at that width are shown at their own size, unscaled.
FIGURE_WIDTH = 330
_DPI = 100
_ROW = 0.15  # inches per layer row
_FONT = 7.5
_BLUE, _RED, _GREY = "#3465a4", "#cc0000", "#888888"


def _figure(rows: int, *, extra: float = 0.9):
    """A figure `FIGURE_WIDTH` pixels wide, tall enough for `rows` labelled rows."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGURE_WIDTH / _DPI, max(2.4, rows * _ROW + extra)), dpi=_DPI)
    fig.set_layout_engine("constrained", h_pad=0.02, w_pad=0.02)
    return fig


def _rows(ax, names: list[str], right: list[str]) -> None:
    """Layer names on the left, one value per row on the right, first layer on top."""
    y = np.arange(len(names))
    ax.set_yticks(y, names, fontsize=_FONT)
    ax.set_ylim(len(names) - 0.5, -0.5)
    twin = ax.twinx()
    twin.set_ylim(ax.get_ylim())
    twin.set_yticks(y, right, fontsize=_FONT)
    twin.tick_params(length=0)
    ax.tick_params(axis="x", labelsize=_FONT)


def pareto_points(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(size, score) points not dominated by a smaller-or-equal size with a lower score."""
    front, best = [], float("inf")
    for size, score in sorted(points):
        if score < best:
            front.append((size, score))
            best = score
    return front


def sensitivity_figure(sensitivity: dict, *, what: str = "trace"):
    """Per-layer trace (or top eigenvalue) on a log scale with +-1 standard error; each row's
    value and relative error on the right, the estimators in the title."""
    names = list(sensitivity)
    s = [sensitivity[n] for n in names]
    values = np.array([x.trace if what == "trace" else x.top_eigenvalue for x in s], float)
    errors = np.nan_to_num(np.array([x.trace_se if what == "trace" else x.top_eigenvalue_se
                                     for x in s], float))
    shown = np.where(values > 0, values, np.nan)
    fig = _figure(len(names))
    ax = fig.add_subplot()
    ax.barh(np.arange(len(names)), shown,
            xerr=np.minimum(errors, 0.999 * np.nan_to_num(shown)), color=_BLUE, ecolor=_RED,
            capsize=2, error_kw={"linewidth": 1})
    ax.set_xscale("log")
    _rows(ax, names, [f"{v:.2g}" + (f" ±{e / v:.0%}" if e > 0 and v > 0 else "")
                      for v, e in zip(values, errors)])
    counts = {}
    for x in s:
        key = x.estimator if x.quantity == "hessian" else f"{x.estimator} ({x.quantity})"
        counts[key] = counts.get(key, 0) + 1
    label = "trace" if what == "trace" else "top eigenvalue"
    ax.set_title(f"Hessian {label} per layer, log scale\n"
                 + ", ".join(f"{k}: {v}" for k, v in counts.items()), fontsize=_FONT + 0.5)
    ax.grid(axis="x", which="major", alpha=0.3)
    return fig


def perturbation_figure(omega: dict, bits: dict):
    """Each layer's Hessian-weighted perturbation (trace x ||W - Q_b(W)||^2 / n) at every bit
    width, log colour scale, the chosen bits boxed and their perturbation on the right."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    names = list(omega)
    widths = sorted({b for n in names for b in omega[n]})
    table = np.array([[omega[n].get(b, np.nan) for b in widths] for n in names], float)
    positive = table[table > 0]
    fig = _figure(len(names), extra=1.3)
    ax = fig.add_subplot()
    image = ax.imshow(np.where(table > 0, table, np.nan), aspect="auto", cmap="viridis",
                      norm=LogNorm(positive.min(), positive.max()) if len(positive) else None)
    ax.set_xticks(range(len(widths)), [str(b) for b in widths])
    ax.set_xlabel("bits", fontsize=_FONT)
    chosen = [omega[n].get(bits.get(n)) for n in names]
    _rows(ax, names, ["float" if c is None else f"{c:.1e}" for c in chosen])
    for i, n in enumerate(names):
        if bits.get(n) in widths:
            ax.add_patch(Rectangle((widths.index(bits[n]) - 0.5, i - 0.5), 1, 1, fill=False,
                                   edgecolor=_RED, linewidth=1.5))
    bar = fig.colorbar(image, ax=fig.axes, location="bottom", shrink=0.8, aspect=30, pad=0.01)
    bar.ax.tick_params(labelsize=_FONT)
    ax.set_title("Hessian-weighted perturbation\n(red: chosen bits; right: its value)",
                 fontsize=_FONT + 0.5)
    return fig


def bits_figure(bits: dict, numel: dict, nbytes: dict, a_bits: dict | None = None):
    """Weight bits per layer (the upper bar of each row) beside the bits of the activation
    entering it (the lower bar, when `a_bits` is given); on the right each layer's weights and
    stored bytes."""
    names = list(bits)
    fig = _figure(len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    parts = [("w", bits, _BLUE)] + ([("a", a_bits, _RED)] if a_bits is not None else [])
    height = 0.8 / len(parts)
    top = 0
    for k, (tag, values, colour) in enumerate(parts):
        shown = [32 if values[n] is None else values[n] for n in names]
        top = max(top, *shown)
        offset = (k - (len(parts) - 1) / 2) * height
        ax.barh(y + offset, shown, height=height * 0.95,
                color=[_GREY if values[n] is None else colour for n in names])
        for i, n in enumerate(names):
            ax.text(shown[i] - 0.2, i + offset, f"{tag} " + (
                "float" if values[n] is None else str(values[n])), ha="right", va="center",
                color="white", fontsize=_FONT - (1 if a_bits is not None else 0))
    _rows(ax, names, [f"{numel[n]:,} w, {nbytes[n]:,} B" for n in names])
    ax.set_xlim(0, top + 0.5)
    ax.set_xticks([])
    what = "Weight (blue) and activation (red) bits" if a_bits is not None else "Weight bits"
    ax.set_title(f"{what} per layer\n({sum(nbytes.values()):,} B of layers)",
                 fontsize=_FONT + 0.5)
    return fig


def _finish(fig, ax, *, title: str, xlabel: str, ylabel: str):
    """Labels, title, grid and legend of a one-panel chart."""
    ax.set_xlabel(xlabel, fontsize=_FONT)
    ax.set_ylabel(ylabel, fontsize=_FONT)
    ax.tick_params(labelsize=_FONT)
    ax.set_title(title, fontsize=_FONT + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=_FONT - 0.5)
    return fig


def scatter_figure(points: list[tuple[float, float]], *, title: str, xlabel: str, ylabel: str):
    """(x, y) points with their Pareto front (lower y at lower x)."""
    fig = _figure(0, extra=2.8)
    ax = fig.add_subplot()
    if points:
        ax.scatter(*zip(*points), color=_BLUE, s=10, label="points")
        front = pareto_points(points)
        ax.plot(*zip(*front), color=_RED, marker="o", markersize=3, linewidth=1,
                label="Pareto front")
    return _finish(fig, ax, title=title, xlabel=xlabel, ylabel=ylabel)


def series_figure(series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str,
                  ylabel: str, logx: bool = False, unjoined=()):
    """One marked line per named series of (x, y) points, each point labelled with its y; the
    series named in `unjoined` as points only (separate runs, not a curve). The legend goes
    below the axes, where it hides no point."""
    fig = _figure(0, extra=2.8 + 0.18 * len(series))
    ax = fig.add_subplot()
    colors = (_BLUE, _RED, _GREY, "#4e9a06", "#c4a000", "#75507b", "#ce5c00", "#06989a",
              "#8f5902", "#ef29a9")  # 10 distinct
    every_y = [y for points in series.values() for _, y in points]
    # A label within 3% of the y span of one already at the same x would print over it.
    near = 0.03 * (max(every_y) - min(every_y)) if every_y else 0.0
    labelled: dict[float, list[float]] = {}
    for (name, points), color in zip(series.items(), colors * len(series)):
        if not points:
            continue
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, color=color, marker="o", markersize=3, label=name,
                linewidth=0 if name in unjoined else 1)
        for x, y in zip(xs, ys):
            if any(abs(y - other) < near for other in labelled.get(x, ())):
                continue
            labelled.setdefault(x, []).append(y)
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(3, 3),
                        fontsize=_FONT - 1.5, color=color)
    if logx:
        ax.set_xscale("log")
    _finish(fig, ax, title=title, xlabel=xlabel, ylabel=ylabel)
    ax.get_legend().remove()
    fig.legend(fontsize=_FONT - 0.5, loc="outside lower center")
    return fig


def changes_figure(groups: dict[str, tuple[list[float], list[tuple[str, float]]]], *,
                   title: str, xlabel: str):
    """One panel per group: a bar per (label, value), and shaded behind them the span of the
    group's baseline values (what a change must leave to count)."""
    shown = {g: v for g, v in groups.items() if v[1]}
    fig = _figure(sum(len(c) for _, c in shown.values()), extra=0.9 + 0.5 * len(shown))
    axes = fig.subplots(len(shown), 1, squeeze=False,
                        height_ratios=[len(c) for _, c in shown.values()] or None)[:, 0]
    for ax, (group, (base, changes)) in zip(axes, shown.items()):
        labels, values = zip(*changes)
        y = np.arange(len(labels))
        span = ""
        if base:  # over the bars, translucent: a bar that ends inside it is no change
            lo, hi = min(base), max(base)
            if hi > lo:
                ax.axvspan(lo, hi, color=_GREY, alpha=0.3, linewidth=0, zorder=3)
                span = f": the recipe {lo:.2f}-{hi:.2f} (shaded)"
            else:
                ax.axvline(lo, color=_GREY, linestyle="--", zorder=3)
                span = f": the recipe {lo:.2f} (dashed)"
        ax.barh(y, values, height=0.6, color=_BLUE)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=_FONT - 1)
        ax.set_yticks(y, labels, fontsize=_FONT)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_xlim(0, max([*values, *base]) * 1.18)
        ax.tick_params(axis="x", labelsize=_FONT)
        ax.grid(alpha=0.3, axis="x")
        ax.set_title(group + span, fontsize=_FONT)
    axes[-1].set_xlabel(xlabel, fontsize=_FONT)
    fig.suptitle(title, fontsize=_FONT + 0.5)
    return fig


def trials_figure(trials: list[dict], *, budget_bytes: int | None = None,
                  chosen: dict | None = None):
    """Every trial's stored size against its score, the Pareto front, the budget and the
    chosen plan."""
    points = [(t["size_bytes"], t["score"]) for t in trials if t.get("score") is not None]
    fig = scatter_figure(points, title="Trials: size against score (lower is better)",
                         xlabel="model.mpq bytes", ylabel="KL to FP32 (held out)")
    ax = fig.axes[0]
    if budget_bytes:
        ax.axvline(budget_bytes, color=_GREY, linestyle="--", label=f"budget {budget_bytes:,} B")
    if chosen is not None:
        ax.scatter([chosen["size_bytes"]], [chosen["score"]], marker="*", s=90, color="gold",
                   edgecolor="black", zorder=5, label=f"chosen {chosen['size_bytes']:,} B, "
                   f"{chosen['score']:.3g}")
    ax.legend(fontsize=_FONT - 0.5)
    return fig


def log_sensitivity(writer, sensitivity: dict) -> None:
    """Per-layer trace and top eigenvalue as figures, and as scalars."""
    writer.add_figure("sensitivity/trace", sensitivity_figure(sensitivity), 0)
    if any(x.top_eigenvalue == x.top_eigenvalue for x in sensitivity.values()):
        writer.add_figure("sensitivity/top_eigenvalue",
                          sensitivity_figure(sensitivity, what="top_eigenvalue"), 0)
    for n, x in sensitivity.items():
        writer.add_scalar(f"sensitivity/trace/{n}", x.trace, 0)
        writer.add_scalar(f"sensitivity/top_eigenvalue/{n}", x.top_eigenvalue, 0)


def log_search(writer, plan_layers: dict, trials: list[dict], *, omega: dict | None = None,
               numel: dict | None = None, nbytes: dict | None = None,
               budget_bytes: int | None = None, chosen: dict | None = None) -> None:
    """The chosen weight and activation bits (with each layer's weights and bytes), the
    perturbation table with the weight bits marked, the trials' size against score, and every trial as HPARAMS."""
    bits = {n: plan_layers[n]["w_bits"] for n in plan_layers}
    a_bits = {n: plan_layers[n].get("a_bits") for n in plan_layers}
    if numel is not None and nbytes is not None:
        writer.add_figure("plan/w_bits", bits_figure(bits, numel, nbytes, a_bits), 0)
    if omega:
        writer.add_figure("plan/perturbation", perturbation_figure(omega, bits), 0)
    for n, b in bits.items():
        writer.add_scalar(f"plan/w_bits/{n}", 32 if b is None else b, 0)
        writer.add_scalar(f"plan/a_bits/{n}", 32 if a_bits[n] is None else a_bits[n], 0)
    writer.add_figure("plan/size_vs_score", trials_figure(trials, budget_bytes=budget_bytes,
                                                            chosen=chosen), 0)
    for t in trials:
        if t.get("score") is not None:
            writer.add_scalar("search/score", t["score"], t["number"])
            writer.add_scalar("search/size_bytes", t["size_bytes"], t["number"])
    log_trials_hparams(writer, trials)


def log_trials_hparams(writer, trials: list[dict]) -> None:
    """Each trial in TensorBoard's HPARAMS view: its bits per layer as hyper-parameters, its
    score and size as metrics (one run per trial under `trials/`)."""
    for t in trials:
        if t.get("score") is None or not t.get("bits"):
            continue
        writer.add_hparams({f"bits.{n}": int(b) for n, b in t["bits"].items()},
                           {"hparam/score": float(t["score"]),
                            "hparam/size_bytes": float(t["size_bytes"])},
                           run_name=f"trials/{t['number']:04d}")


def log_qat_layout(writer, layers: list[str]) -> None:
    """CUSTOM SCALARS charts of a QAT run: the student's test top-1 beside the teacher's, and
    every layer's weight quantization error in one chart."""
    writer.add_custom_scalars({"QAT": {
        "test top-1: student and teacher": ["Multiline", ["test/top1", "teacher/top1"]],
        "weight quantization error per layer": ["Multiline",
                                                [f"quant_error/{n}" for n in layers]]}})
