"""Loss curves as a PNG drawn with Pillow (no matplotlib dependency): one line per metric over steps,
axes with a few labelled ticks, and a legend."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = {"loss": (20, 20, 20), "loss_und": (31, 119, 180), "loss_text": (44, 160, 44), "loss_gen": (214, 39, 40),
          "loss_edit": (148, 103, 189)}


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def plot_losses(metrics: Sequence[dict], path: str | Path, keys: Sequence[str] = tuple(COLORS),
                size: tuple[int, int] = (800, 480), title: str = "training loss") -> Path | None:
    """Write the curves of `keys` (skipping missing / null values) to `path`; None if nothing to draw."""
    series = {k: [(m["step"], m[k]) for m in metrics if m.get(k) is not None and math.isfinite(m[k])] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    W, H = size
    left, right, top, bottom = 70, 20, 40, 50
    xs = [s for v in series.values() for s, _ in v]
    ys = [y for v in series.values() for _, y in v]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.05 or 1.0
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)  # noqa: E731

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((left, 12), title, fill="black", font=font)
    for t in _ticks(y0, y1):
        d.line([(left, py(t)), (W - right, py(t))], fill=(230, 230, 230))
        d.text((8, py(t) - 6), f"{t:g}", fill="black", font=font)
    for t in _ticks(x0, x1):
        d.line([(px(t), H - bottom), (px(t), H - bottom + 5)], fill="black")
        d.text((px(t) - 10, H - bottom + 8), f"{int(t)}", fill="black", font=font)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text(((W - right + left) // 2 - 12, H - 20), "step", fill="black", font=font)
    for i, (k, v) in enumerate(series.items()):
        pts = [(px(x), py(y)) for x, y in v]
        color = COLORS.get(k, (120, 120, 120))
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        ly = top + 8 + 14 * i
        d.line([(W - right - 120, ly + 6), (W - right - 100, ly + 6)], fill=color, width=2)
        d.text((W - right - 95, ly), k, fill="black", font=font)
    path = Path(path)
    img.save(path)
    return path


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (20, 20, 20)]


def plot_panels(panels: Sequence[tuple[str, dict[str, Sequence[tuple[float, float]]]]], path: str | Path, *,
                xlabel: str = "", log2_x: bool = False, panel_size: tuple[int, int] = (420, 320)) -> Path:
    """Side-by-side panels, each (title, {series label: [(x, y), ...]}): a few measured points per line (the
    scaling study) get markers and a tick at each x; longer series (over 12 points) are drawn as curves."""
    W, H = panel_size
    img = Image.new("RGB", (W * len(panels), H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    labels = sorted({k for _, series in panels for k in series})
    color = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(labels)}
    fx = (lambda x: math.log2(x)) if log2_x else (lambda x: x)  # noqa: E731
    for n, (title, series) in enumerate(panels):
        ox = n * W
        left, right, top, bottom = ox + 55, ox + W - 15, 30, H - 45
        pts = [(x, y) for v in series.values() for x, y in v]
        x0, x1 = min(fx(x) for x, _ in pts), max(fx(x) for x, _ in pts)
        x0, x1 = (x0 - 0.5, x1 + 0.5) if log2_x else (x0, x1 if x1 > x0 else x0 + 1)
        y0, y1 = min(0.0, min(y for _, y in pts)), max(y for _, y in pts) * 1.1 or 1.0
        px = lambda x: left + (fx(x) - x0) / (x1 - x0) * (right - left)  # noqa: E731
        py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
        d.text((left, 10), title, fill="black", font=font)
        for t in _ticks(y0, y1):
            d.line([(left, py(t)), (right, py(t))], fill=(230, 230, 230))
            d.text((ox + 8, py(t) - 6), f"{t:g}", fill="black", font=font)
        xs = sorted({x for x, _ in pts})
        dense = len(xs) > 12  # a curve (e.g. per step): round ticks, no markers
        for x in (_ticks(x0, x1) if dense and not log2_x else xs):
            d.line([(px(x), bottom), (px(x), bottom + 5)], fill="black")
            d.text((px(x) - 12, bottom + 8), f"{x:g}", fill="black", font=font)
        d.rectangle([left, top, right, bottom], outline="black")
        d.text(((left + right) // 2 - 3 * len(xlabel), H - 18), xlabel, fill="black", font=font)
        for i, (k, v) in enumerate(sorted(series.items())):
            xy = [(px(x), py(y)) for x, y in sorted(v)]
            if len(xy) > 1:
                d.line(xy, fill=color[k], width=2)
            for a, b in ([] if len(v) > 12 else xy):
                d.ellipse([a - 3, b - 3, a + 3, b + 3], fill=color[k])
            d.line([(left + 8, top + 12 + 14 * i), (left + 26, top + 12 + 14 * i)], fill=color[k], width=2)
            d.text((left + 30, top + 6 + 14 * i), k, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
