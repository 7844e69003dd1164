"""Scenes to pixels: flat, aliased polygons on a white background, drawn with Pillow."""
from __future__ import annotations

from PIL import Image, ImageDraw

from .scene import BACKGROUND, COLOURS, SIZE, Obj, Scene


def outline(o: Obj) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    """Polygon points (or an ellipse box for circles). Areas are kept within ~1.6x of each other so
    no shape is much easier to see than another."""
    cx, cy = o.centre
    r = o.r
    if o.shape == "circle":
        return (cx - r, cy - r, cx + r - 1, cy + r - 1)
    if o.shape == "square":
        s = round(r * 0.85)
        return [(cx - s, cy - s), (cx + s - 1, cy - s), (cx + s - 1, cy + s - 1), (cx - s, cy + s - 1)]
    if o.shape == "triangle":  # apex up
        return [(cx, cy - r), (cx + r, cy + r - 1), (cx - r, cy + r - 1)]
    if o.shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(f"unknown shape {o.shape!r}")


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in scene:
        pts = outline(o)
        if o.shape == "circle":
            d.ellipse(pts, fill=COLOURS[o.colour])
        else:
            d.polygon(pts, fill=COLOURS[o.colour])
    return img if size == SIZE else img.resize((size, size), Image.NEAREST)
