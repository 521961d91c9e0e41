"""TensorBoard views of a search: per-layer sensitivity and bits as bar charts, the trials'
size-vs-score scatter with its Pareto front. Charts are drawn with Pillow (no plotting
library needed) and logged as images beside the same numbers as scalars."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["bar_chart", "log_search", "log_sensitivity", "pareto_points", "scatter_chart"]

_BLUE, _RED, _GREY, _BLACK = (52, 101, 164), (204, 0, 0), (170, 170, 170), (0, 0, 0)


def bar_chart(labels: list[str], values: list[float], errors: list[float] | None = None, *,
              title: str, width: int = 720) -> np.ndarray:
    """Horizontal bars with optional error whiskers; returns an (H, W, 3) uint8 image."""
    row, top, left, right = 18, 28, 8 + 7 * max(map(len, labels)), 70
    height = top + row * len(labels) + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill=_BLACK)
    errors = errors or [0.0] * len(values)
    vmax = max(max(v + e for v, e in zip(values, errors)), 1e-12)
    span = width - left - right
    for i, (label, v, e) in enumerate(zip(labels, values, errors)):
        y = top + i * row
        draw.text((8, y + 3), label, fill=_BLACK)
        x1 = left + span * max(v, 0) / vmax
        draw.rectangle([left, y + 3, x1, y + row - 3], fill=_BLUE)
        if e > 0:
            lo, hi = left + span * max(v - e, 0) / vmax, left + span * (v + e) / vmax
            mid = y + row // 2
            draw.line([lo, mid, hi, mid], fill=_RED, width=2)
            draw.line([lo, mid - 4, lo, mid + 4], fill=_RED)
            draw.line([hi, mid - 4, hi, mid + 4], fill=_RED)
        draw.text((x1 + 6 + (span * e / vmax if e > 0 else 0), y + 3), f"{v:.4g}",
                  fill=_BLACK)
    return np.asarray(img)


def pareto_points(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(size, score) points not dominated by a smaller-or-equal size with a lower score."""
    front, best = [], float("inf")
    for size, score in sorted(points):
        if score < best:
            front.append((size, score))
            best = score
    return front


def scatter_chart(points: list[tuple[float, float]], *, title: str, xlabel: str,
                  ylabel: str, width: int = 640, height: int = 420) -> np.ndarray:
    """Scatter of (x, y) points with the Pareto front (lower y at lower x) drawn as a line."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), f"{title}   (y: {ylabel}, x: {xlabel})", fill=_BLACK)
    left, bottom, top, right = 70, height - 40, 30, width - 20
    draw.line([left, top, left, bottom, right, bottom], fill=_BLACK)
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) + 1e-9
        y0, y1 = min(ys), max(ys) + 1e-9

        def at(x, y):
            return (left + (right - left) * (x - x0) / (x1 - x0 or 1),
                    bottom - (bottom - top) * (y - y0) / (y1 - y0 or 1))
        for x, y in points:
            cx, cy = at(x, y)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], outline=_BLUE)
        front = [at(x, y) for x, y in pareto_points(points)]
        if len(front) > 1:
            draw.line(front, fill=_RED, width=2)
        for x, y in front:
            cx, cy = at(x, y)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=_RED)
        draw.text((left - 60, bottom - 10), f"{y0:.4g}", fill=_GREY)
        draw.text((left - 60, top), f"{y1:.4g}", fill=_GREY)
        draw.text((left, bottom + 6), f"{x0:.0f}", fill=_GREY)
        draw.text((right - 60, bottom + 6), f"{x1:.0f}", fill=_GREY)
    return np.asarray(img)


def log_sensitivity(writer, sensitivity: dict) -> None:
    """Per-layer trace and top eigenvalue: bar charts with error bars, and scalars."""
    names = list(sensitivity)
    s = [sensitivity[n] for n in names]
    writer.add_image("sensitivity/trace", bar_chart(
        names, [x.trace for x in s], [x.trace_se for x in s],
        title="Hessian trace per layer (bars: estimate; red: +/- 1 standard error)"),
        0, dataformats="HWC")
    writer.add_image("sensitivity/top_eigenvalue", bar_chart(
        names, [x.top_eigenvalue for x in s], [x.top_eigenvalue_se for x in s],
        title="Top Hessian eigenvalue per layer"), 0, dataformats="HWC")
    for n, x in zip(names, s):
        writer.add_scalar(f"sensitivity/trace/{n}", x.trace, 0)
        writer.add_scalar(f"sensitivity/top_eigenvalue/{n}", x.top_eigenvalue, 0)


def log_search(writer, plan_layers: dict, trials: list[dict]) -> None:
    """Bits chosen per layer, and every trial's size against its score with the Pareto front."""
    names = list(plan_layers)
    bits = [plan_layers[n]["w_bits"] or 32 for n in names]
    writer.add_image("plan/w_bits", bar_chart(names, bits, title="Weight bits per layer"), 0,
                     dataformats="HWC")
    for n, b in zip(names, bits):
        writer.add_scalar(f"plan/w_bits/{n}", b, 0)
    points = [(t["size_bytes"], t["score"]) for t in trials if t.get("score") is not None]
    writer.add_image("search/size_vs_score", scatter_chart(
        points, title="Trials: stored size vs score (red: Pareto front)",
        xlabel="size (bytes)", ylabel="KL to FP32"), 0, dataformats="HWC")
    for t in trials:
        writer.add_scalar("search/score", t["score"], t["number"])
        writer.add_scalar("search/size_bytes", t["size_bytes"], t["number"])
