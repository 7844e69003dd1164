"""Loss curves as a PNG drawn with Pillow (no matplotlib dependency): one line per metric over steps,
axes with a few labelled ticks, and a legend."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = {"loss": (20, 20, 20), "loss_und": (31, 119, 180), "loss_text": (44, 160, 44), "loss_gen": (214, 39, 40)}


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
