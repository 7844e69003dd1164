"""The judge: find the shapes in an image, then score the image against a prompt (GenEval rules).

Detection needs no learning, and is built to read decoded (slightly blurred, off-colour) images as
well as clean renders:
  1. foreground = pixels far from the white background; 4-connected foreground components are
     objects (the world keeps a 2-pixel gap between objects, so clean objects never touch);
  2. an object's colour is the palette colour most of its pixels are nearest to; a component whose
     pixels split into two large colour groups is two touching objects and is split by colour;
  3. its shape is the template (circle, square, apex-up triangle, diamond, each fitted to the
     object's bounding box) with the highest IoU with its mask: rounded corners or a blurred edge move
     IoU a little, not the ranking.
Components smaller than MIN_AREA pixels (specks of decoding noise) are ignored.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image

from .prompts import Prompt
from .scene import BACKGROUND, CELL, COLOURS, COLOUR_NAMES, SHAPES, Scene, SIZE

MIN_AREA = 40  # pixels at 64 px; the smallest shape the world draws covers ~160
FOREGROUND = 80.0  # RGB distance from the background beyond which a pixel belongs to an object
SPLIT = 0.25  # a second colour covering this share of a component (and MIN_AREA) makes it two objects
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
_MARGIN = 6.0  # pixels a centroid must lead by for a spatial relation to hold


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    cx: float
    cy: float
    area: int
    size: int = SIZE  # side of the image it was found in

    @property
    def cell(self) -> int:
        return 2 * int(self.cy * SIZE / self.size >= CELL) + int(self.cx * SIZE / self.size >= CELL)


def _pixels(img: Image.Image | np.ndarray) -> np.ndarray:
    a = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float32)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"judge: expected an RGB image (H, W, 3), got shape {a.shape}")
    return a


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        out.append(np.array(pts))
    return out


def _template(shape: str, h: int, w: int) -> np.ndarray:
    """The shape's mask filling an h x w box (pixel centres)."""
    y, x = np.mgrid[0:h, 0:w]
    u, v = (x + 0.5) / w * 2 - 1, (y + 0.5) / h * 2 - 1  # [-1, 1] across the box
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "triangle":  # apex at the top centre, base along the bottom
        return np.abs(u) <= (v + 1) / 2
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape {shape!r}")


def classify(pts: np.ndarray) -> str:
    """The shape whose box-fitted template overlaps the object's mask best (IoU)."""
    ys, xs = pts[:, 0] - pts[:, 0].min(), pts[:, 1] - pts[:, 1].min()
    h, w = int(ys.max()) + 1, int(xs.max()) + 1
    mask = np.zeros((h, w), dtype=bool)
    mask[ys, xs] = True
    def iou(shape: str) -> float:
        t = _template(shape, h, w)
        return (mask & t).sum() / float((mask | t).sum())
    return max(SHAPES, key=iou)


def detect(img: Image.Image | np.ndarray) -> list[Detection]:
    return [d for d, _, _ in detect_regions(img, masks=False)]


def detect_regions(img: Image.Image | np.ndarray, masks: bool = True
                   ) -> list[tuple[Detection, tuple[float, float, float, float], np.ndarray | None]]:
    """detect(), with each object's box (x1, y1, x2, y2, pixel edges) and, if `masks`, its (H, W) boolean
    mask: what a GenEval detector returns (januskit.eval.geneval.WorldDetector)."""
    a = _pixels(img)
    size = a.shape[0]
    min_area = MIN_AREA * (size / SIZE) ** 2
    fg = np.sqrt(((a - np.asarray(BACKGROUND, dtype=np.float32)) ** 2).sum(-1)) > FOREGROUND
    nearest = ((a[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1).argmin(-1)
    out = []
    for comp in _components(fg):
        if len(comp) < min_area:
            continue
        labels = nearest[comp[:, 0], comp[:, 1]]
        counts = Counter(labels.tolist())
        big = [k for k, n in counts.items() if n >= max(min_area, SPLIT * len(comp))]
        parts = [(k, comp[labels == k]) for k in big] if len(big) > 1 else [(counts.most_common(1)[0][0], comp)]
        for k, pts in parts:
            rows, cols = pts[:, 0], pts[:, 1]
            d = Detection(classify(pts), COLOUR_NAMES[k], float(cols.mean()), float(rows.mean()), len(pts), size)
            box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
            mask = None
            if masks:
                mask = np.zeros(a.shape[:2], dtype=bool)
                mask[rows, cols] = True
            out.append((d, box, mask))
    return sorted(out, key=lambda r: (r[0].cell, r[0].cy, r[0].cx))


def holds(rel: str, a: Detection, b: Detection) -> bool:
    """`a REL b` by centroids: the leading axis must dominate (a diagonal neighbour is neither)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if rel in ("left of", "right of"):
        d = dx if rel == "left of" else -dx
        return d > _MARGIN and abs(dy) < abs(dx)
    if rel in ("above", "below"):
        d = dy if rel == "above" else -dy
        return d > _MARGIN and abs(dx) < abs(dy)
    raise ValueError(f"unknown relation {rel!r}")


def score(prompt: Prompt, found: list[Detection]) -> bool:
    """GenEval's rule for the prompt's category: objects present (and, per category, the exact
    count, the colour, the colour of each object, or the relation between the two). The training
    captions' categories: `color_position` is position with the named colours, `color_count` the exact
    count of the coloured shape, `objects` exactly the listed objects (nothing more), each with its
    named colour and cell."""
    def having(colour: str | None, shape: str) -> list[Detection]:
        return [d for d in found if d.shape == shape and (colour is None or d.colour == colour)]

    cat = prompt.category
    if cat in ("single_object", "colors"):
        return bool(having(*prompt.items[0]))
    if cat in ("two_object", "color_attr"):
        a, b = having(*prompt.items[0]), having(*prompt.items[1])
        return bool(a) and bool(b) and any(x is not y for x in a for y in b)
    if cat in ("counting", "color_count"):
        return len(having(*prompt.items[0])) == prompt.count
    if cat in ("position", "color_position"):
        a, b = having(*prompt.items[0]), having(*prompt.items[1])
        return any(holds(prompt.relation, x, y) for x in a for y in b if x is not y)
    if cat == "scene":
        return same_objects(prompt.scene, found)
    if cat == "objects":
        cells = prompt.cells or (None,) * len(prompt.items)
        return len(found) == len(prompt.items) and any(
            all(d.shape == s and c in (None, d.colour) and k in (None, d.cell)
                for (c, s), k, d in zip(prompt.items, cells, order)) for order in permutations(found))
    raise ValueError(f"judge: unknown prompt category {cat!r}")


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
OUTCOMES = {  # what failure_mode returns per category, in report order
    "position": ("correct", "reversed", "other axis", "diagonal", "missing"),
    "color_attr": ("correct", "colours swapped", "one colour wrong", "both colours wrong", "missing"),
}


def outcome_kind(category: str) -> str | None:
    """The OUTCOMES key of a prompt category: colour + position prompts (the README's) fail as position ones."""
    cat = "position" if category == "color_position" else category
    return cat if cat in OUTCOMES else None


def failure_mode(prompt: Prompt, found: list[Detection]) -> str | None:
    """What an image did with a position (or colour + position) or colour-attribution prompt (OUTCOMES; None for
    other categories).
    position: "correct" (score's verdict), else with both named objects present: "reversed" (the opposite
    relation holds), "other axis" (a relation of the other axis holds), "diagonal" (none does); "missing"
    when a named object is absent. color_attr: "correct", else with both shapes present: "colours swapped"
    (each shape has the other's colour), "one colour wrong", "both colours wrong"; "missing" when a shape is
    absent."""
    cat = outcome_kind(prompt.category)
    if cat is None:
        return None
    if score(prompt, found):
        return "correct"
    (ca, sa), (cb, sb) = prompt.items
    if cat == "position":
        a = [d for d in found if d.shape == sa and ca in (None, d.colour)]
        b = [d for d in found if d.shape == sb and cb in (None, d.colour)]
        if not a or not b:
            return "missing"
        pairs = [(x, y) for x in a for y in b if x is not y]
        if any(holds(_OPPOSITE[prompt.relation], x, y) for x, y in pairs):
            return "reversed"
        other = ("above", "below") if prompt.relation in ("left of", "right of") else ("left of", "right of")
        return "other axis" if any(holds(r, x, y) for r in other for x, y in pairs) else "diagonal"
    a = [d for d in found if d.shape == sa]
    b = [d for d in found if d.shape == sb]
    if not a or not b:
        return "missing"
    if any(x.colour == cb for x in a) and any(y.colour == ca for y in b):
        return "colours swapped"
    if any(x.colour == ca for x in a) or any(y.colour == cb for y in b):
        return "one colour wrong"
    return "both colours wrong"


def same_objects(scene: Scene, found: list[Detection]) -> bool:
    """Exactly the scene's objects (shape, colour, cell), nothing more."""
    return Counter((o.shape, o.colour, o.cell) for o in scene) == Counter((d.shape, d.colour, d.cell) for d in found)
