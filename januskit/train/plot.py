"""Training curves as PNGs, drawn with matplotlib (the optional `plot` extra, Agg backend: no display, no
pyplot state). Without matplotlib nothing is drawn: metrics.jsonl (the source of truth) is still written, and
one log line says the plots were skipped. `read_metrics` reads a metrics.jsonl either way."""
from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("januskit.train.plot")

# Colours as 0-255 RGB (what a test finds in the PNG); matplotlib gets them as 0-1 fractions.
COLORS = {"loss": (20, 20, 20), "loss_und": (31, 119, 180), "loss_text": (44, 160, 44), "loss_gen": (214, 39, 40),
          "loss_edit": (148, 103, 189)}
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (20, 20, 20)]
OTHER = (120, 120, 120)  # a plot_losses key without a colour of its own
DPI = 100  # figure inches x DPI = the PNG's size in pixels
INSTALL_HINT = "pip install 'januskit[plot]'"

_warned = False


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _figure(size: tuple[int, int]) -> Any:
    """A matplotlib Figure of `size` pixels on an Agg canvas, or None (logged once) without matplotlib."""
    global _warned
    try:
        importlib.import_module("matplotlib")  # the top-level package first: a missing one fails here
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned:
            log.warning("plots skipped: matplotlib is not installed (%s); the metrics are in metrics.jsonl",
                        INSTALL_HINT)
            _warned = True
        return None
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _rgb(c: tuple[int, int, int]) -> tuple[float, float, float]:
    return (c[0] / 255, c[1] / 255, c[2] / 255)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def plot_losses(metrics: Sequence[dict], path: str | Path, keys: Sequence[str] = tuple(COLORS),
                size: tuple[int, int] = (800, 480), title: str = "training loss") -> Path | None:
    """Write the curves of `keys` over steps (skipping missing / null / non-finite values) to `path`, a PNG of
    `size` pixels. None if there is nothing to draw or matplotlib is not installed."""
    series = {k: [(m["step"], m[k]) for m in metrics if m.get(k) is not None and math.isfinite(m[k])] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig = _figure(size)
    if fig is None:
        return None
    ax = fig.add_subplot()
    for k, v in series.items():
        xs, ys = zip(*v)
        ax.plot(xs, ys, color=_rgb(COLORS.get(k, OTHER)), linewidth=1.5, label=k,
                marker="o" if len(v) == 1 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylim(bottom=min(0.0, min(y for v in series.values() for _, y in v)))
    ax.grid(True, color=(0.9, 0.9, 0.9))
    ax.legend(loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def plot_panels(panels: Sequence[tuple[str, dict[str, Sequence[tuple[float, float]]]]], path: str | Path, *,
                xlabel: str = "", log2_x: bool = False, panel_size: tuple[int, int] = (420, 320)) -> Path | None:
    """Side-by-side panels, each (title, {series label: [(x, y), ...]}), in a PNG of len(panels) x
    panel_size pixels: a few measured points per line (the scaling study) get markers and a tick at each x;
    longer series (over 12 points) are drawn as plain curves. Each label keeps one colour across the panels
    (PALETTE, labels sorted). None without matplotlib."""
    W, H = panel_size
    fig = _figure((W * len(panels), H))
    if fig is None:
        return None
    labels = sorted({k for _, series in panels for k in series})
    color = {k: _rgb(PALETTE[i % len(PALETTE)]) for i, k in enumerate(labels)}
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels):
        xs = sorted({x for v in series.values() for x, _ in v})
        for k, v in sorted(series.items()):
            pts = sorted(v)
            ax.plot([x for x, _ in pts], [y for _, y in pts], color=color[k], linewidth=1.5, label=k,
                    marker=None if len(pts) > 12 else "o", markersize=4)
        if log2_x:
            ax.set_xscale("log", base=2)
        if xs and len(xs) <= 12:
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ys = [y for v in series.values() for _, y in v]
        if ys:
            ax.set_ylim(bottom=min(0.0, min(ys)))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(True, color=(0.9, 0.9, 0.9))
        if series:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)
