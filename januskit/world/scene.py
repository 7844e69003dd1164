"""The miniature world's vocabulary and scenes: 64x64 images of 1-4 flat shapes on a 2x2 grid.

A scene is a list of objects, each a (shape, colour) in one of the four cells of a 2x2 grid, with a
size and a small offset from the cell centre. Everything is drawn from a seeded numpy generator, so a
(seed, index) pair always gives the same scene. The grid keeps spatial relations unambiguous (two
objects in one row are left/right of each other, in one column above/below) while sizes and offsets
keep the pixels varied.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SIZE = 64  # image side in pixels
CELL = SIZE // 2  # 2x2 grid of 32-pixel cells
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "diamond")
# Six colours at least 120 apart in RGB (closest: blue-cyan), so a decoded image's slightly shifted
# colours still sit nearest their own palette entry.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "yellow": (235, 215, 35), "green": (40, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 230), "purple": (170, 60, 200)}
COLOUR_NAMES = tuple(COLOURS)
CELL_NAMES = ("top left", "top right", "bottom left", "bottom right")  # cell index = 2 * row + col
NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
MIN_R, MAX_R = 9, 13  # half-extent of a shape in pixels
MAX_OFFSET = 2  # |dx|, |dy| of the centre from the cell centre; MAX_R + MAX_OFFSET < CELL / 2


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cell: int  # 0..3, raster order
    r: int = 11  # half-extent in pixels
    dx: int = 0
    dy: int = 0

    @property
    def row(self) -> int:
        return self.cell // 2

    @property
    def col(self) -> int:
        return self.cell % 2

    @property
    def centre(self) -> tuple[float, float]:
        return (self.col * CELL + CELL / 2 + self.dx, self.row * CELL + CELL / 2 + self.dy)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


Scene = tuple[Obj, ...]


def relation(a: Obj, b: Obj) -> str | None:
    """Where `a` is relative to `b` when they share a row or column, else None (diagonal)."""
    if a.row == b.row and a.col != b.col:
        return "left of" if a.col < b.col else "right of"
    if a.col == b.col and a.row != b.row:
        return "above" if a.row < b.row else "below"
    return None


def place(rng: np.random.Generator, shape: str, colour: str, cell: int) -> Obj:
    r = int(rng.integers(MIN_R, MAX_R + 1))
    dx, dy = (int(v) for v in rng.integers(-MAX_OFFSET, MAX_OFFSET + 1, size=2))
    return Obj(shape, colour, cell, r, dx, dy)


def random_scene(rng: np.random.Generator, n: int | None = None) -> Scene:
    """1-4 objects (uniform count), random shapes and colours, distinct cells."""
    n = int(rng.integers(1, 5)) if n is None else n
    cells = rng.permutation(4)[:n]
    return tuple(sorted((place(rng, SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                               int(c)) for c in cells), key=lambda o: o.cell))


def canonical(scene: Scene) -> Scene:
    """Objects in raster (cell) order; geometry jitter removed (for comparing layouts)."""
    return tuple(sorted((replace(o, r=11, dx=0, dy=0) for o in scene), key=lambda o: o.cell))


# Per-patch factors: shape of the cell's object (0 = empty cell), its colour (0 = empty), the cell itself.
PATCH_CLASSES = (1 + len(SHAPES), 1 + len(COLOUR_NAMES), 4)


def patch_labels(scene: Scene, per_side: int) -> np.ndarray:
    """(per_side * per_side, 3) labels of the patches of a per_side x per_side grid over the image, raster order:
    the shape (1 + index, 0 for an empty cell) and colour (likewise) of the object in the 2x2 cell the patch lies
    in, and that cell (0-3). An object never leaves its cell, so the cell is the object's region; the three
    factors are separate so that each is a direction of its own in the features. per_side must be even."""
    if per_side % 2:
        raise ValueError(f"patch_labels: per_side {per_side} is odd; patches must tile the 2x2 grid")
    by_cell = {o.cell: (1 + SHAPES.index(o.shape), 1 + COLOUR_NAMES.index(o.colour)) for o in scene}
    half = per_side // 2
    rows, cols = np.divmod(np.arange(per_side * per_side), per_side)
    cells = 2 * (rows // half) + cols // half
    return np.array([(*by_cell.get(int(c), (0, 0)), int(c)) for c in cells], dtype=np.int64)
