"""The params plot: test metric against trainable parameters (log x), one point per method with its 95% CI over
seeds, clipped to the metric's range; the untrained base as a dashed line. Labels are placed so that none
overlaps another label or a point: each tries positions around its point, nearest first, and a label moved
away from its point gets a thin leader line.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .report import metric_key

_OFFSETS = [(7, 0), (-7, 0), (0, 10), (0, -10)]  # right, left, above, below; centred on the point
_STEPS = (0, 10, -10, 20, -20, 30, -30, 45, -45, 60, -60, 80, -80, 100, -100, 130, -130)
METRIC_RANGE = {"em": (0.0, 100.0), "nll": (0.0, float("inf"))}


def _overlaps(a, b, pad: float = 1.0) -> bool:
    return not (a.x1 + pad < b.x0 or b.x1 + pad < a.x0 or a.y1 + pad < b.y0 or b.y1 + pad < a.y0)


def place_labels(ax, points: list[tuple[float, float]], names: list[str], fontsize: float = 8) -> list:
    """Annotate each (x, y) data point with its name where the label hits no other label, no point and stays
    inside the axes; returns the Text artists."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    frame = ax.get_window_extent(renderer)
    marker = 4.0 * fig.dpi / 72  # a point's marker, in pixels
    occupied = [Bbox.from_extents(px - marker, py - marker, px + marker, py + marker)
                for px, py in (to_px(p) for p in points)]
    texts = []
    for i in sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0])):
        best = None
        for ox, oy, dist in _candidates():
            ha = "left" if ox > 0 else "right" if ox < 0 else "center"
            text = ax.annotate(names[i], points[i], textcoords="offset points", xytext=(ox, oy), fontsize=fontsize,
                               ha=ha, va="center")
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            hits = sum(_overlaps(box, other) for other in occupied)
            cost = 1000 * hits + (0 if inside else 500) + dist
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box, dist)
            else:
                text.remove()
            if not hits and inside:  # candidates come nearest first: the first clean one is the best
                break
        _, text, box, dist = best
        if dist >= 20:  # moved away from its point: a leader line says which point it names
            position, ha = text.get_position(), text.get_ha()
            text.remove()
            text = ax.annotate(names[i], points[i], textcoords="offset points", xytext=position, fontsize=fontsize,
                               ha=ha, va="center", arrowprops={"arrowstyle": "-", "color": "0.45", "linewidth": 0.7,
                                                  "shrinkA": 0, "shrinkB": 3})
            box = text.get_window_extent(renderer)
        occupied.append(box)
        texts.append(text)
    return texts


def _candidates():
    for dy in _STEPS:
        for ox, oy in _OFFSETS:
            yield ox, oy + dy, abs(dy)


def clipped_yerr(mean: float, half: float, metric: str) -> tuple[float, float]:
    lo, hi = METRIC_RANGE[metric]
    return max(0.0, min(half, mean - lo)), max(0.0, min(half, hi - mean))


def plot(base: dict, rows: list[dict], metric: str, path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = metric_key(metric)
    fig, ax = plt.subplots(figsize=(7.6, 5.0), dpi=120)
    points, names = [], []
    for row in rows:
        mean, half = row["test"]
        below, above = clipped_yerr(mean, half, metric)
        ax.errorbar(row["trainable_params"], mean, yerr=[[below], [above]], fmt="o", markersize=4, capsize=3,
                    color="tab:blue", ecolor="0.55", elinewidth=1)
        points.append((row["trainable_params"], mean))
        names.append(row["variant"])
    ax.axhline(base["test"][key], color="grey", linestyle="--", linewidth=1, label="untrained base")
    ax.errorbar([], [], yerr=[], fmt="o", markersize=4, capsize=3, color="tab:blue", ecolor="0.55",
                label="mean over seeds, bar: 95% CI (t), clipped to the metric's range")
    ax.set_xscale("log")
    if points:
        xs = [p[0] for p in points]
        ax.set_xlim(min(xs) / 3, max(xs) * 3)
    lo, hi = METRIC_RANGE[metric]
    if metric == "em":
        ax.set_ylim(lo - 3, hi + 3)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test exact match %" if metric == "em" else "test answer NLL (nats/token, lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_labels(ax, points, names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")  # a name of its own
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
