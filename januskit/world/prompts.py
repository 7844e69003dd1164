"""Captions and GenEval-style prompts of the miniature world, and scenes that satisfy them.

The six GenEval categories (single object, two objects, counting, colours, position, colour
attribution) are prompt templates over shapes and colours; `scene` is the full description of an
arbitrary scene (what the model says when asked what an image shows). A `Prompt` carries its
structured meaning, so the judge scores against the meaning, never by parsing text. The training
captions written the way people write prompts (`captions.py`) add three categories: `color_position`
(position with colours), `color_count` (counting with a colour) and `objects` (every object of the
image listed, each with or without its colour and its cell).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import CELL_NAMES, COLOUR_NAMES, NUMBERS, RELATIONS, SHAPES, Obj, Scene, place

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GEN_KINDS = CATEGORIES + ("scene",)  # training captions also include full scene descriptions

# Cell pairs per relation: (cell of the first object, cell of the second) with "first REL second".
_REL_CELLS = {"left of": ((0, 1), (2, 3)), "right of": ((1, 0), (3, 2)),
              "above": ((0, 2), (1, 3)), "below": ((2, 0), (3, 1))}


@dataclass(frozen=True)
class Prompt:
    category: str
    text: str
    items: tuple[tuple[str | None, str], ...]  # (colour or None, shape) per mentioned object
    count: int = 1  # counting: how many of items[0]
    relation: str | None = None  # position: items[0] RELATION items[1]
    scene: Scene | None = None  # category "scene": the exact scene described
    cells: tuple[int | None, ...] | None = None  # category "objects": the cell named per item, or None

    def to_json(self) -> dict:
        d = {"category": self.category, "text": self.text, "items": [list(i) for i in self.items]}
        if self.category in ("counting", "color_count"):
            d["count"] = self.count
        if self.relation:
            d["relation"] = self.relation
        if self.scene is not None:
            d["scene"] = scene_to_json(self.scene)
        if self.cells is not None:
            d["cells"] = list(self.cells)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Prompt":
        return cls(d["category"], d["text"], tuple((c, s) for c, s in d["items"]), d.get("count", 1),
                   d.get("relation"), scene_from_json(d["scene"]) if "scene" in d else None,
                   tuple(d["cells"]) if "cells" in d else None)


def scene_to_json(scene: Scene) -> list[list]:
    return [[o.shape, o.colour, o.cell, o.r, o.dx, o.dy] for o in scene]


def scene_from_json(rows: list[list]) -> Scene:
    return tuple(Obj(s, c, int(cell), int(r), int(dx), int(dy)) for s, c, cell, r, dx, dy in rows)


def plural(shape: str) -> str:
    return shape + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun(colour: str | None, shape: str) -> str:
    words = f"{colour} {shape}" if colour else shape
    return f"{article(words)} {words}"


def relation_text(rel: str) -> str:
    return {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)


def describe(scene: Scene) -> str:
    """'a red circle at the top left and a blue square at the bottom right' (raster order)."""
    parts = [f"{noun(o.colour, o.shape)} at the {CELL_NAMES[o.cell]}" for o in sorted(scene, key=lambda o: o.cell)]
    if not parts:
        return "nothing"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_prompt(category: str, shapes: tuple[str, ...], colours: tuple[str | None, ...] = (), count: int = 1,
                relation: str | None = None) -> Prompt:
    """The canonical text of a category's prompt."""
    cs = tuple(colours) + (None,) * (len(shapes) - len(colours))
    items = tuple(zip(cs, shapes))
    if category in ("single_object", "colors"):
        text = noun(*items[0])
    elif category in ("two_object", "color_attr"):
        text = f"{noun(*items[0])} and {noun(*items[1])}"
    elif category == "counting":
        text = f"{NUMBERS[count]} {plural(shapes[0])}"
    elif category == "position":
        text = f"{noun(*items[0])} {relation_text(relation)} {noun(*items[1])}"
    else:
        raise ValueError(f"unknown prompt category {category!r}; valid: {', '.join(CATEGORIES)}")
    return Prompt(category, text, items, count, relation)


def _pick(rng: np.random.Generator, seq: tuple[str, ...], k: int = 1) -> list[str]:
    return [seq[i] for i in rng.choice(len(seq), size=k, replace=False)]


def sample_prompt(rng: np.random.Generator, category: str) -> Prompt:
    """A random prompt of a category (shapes of two-object prompts differ, as in GenEval)."""
    if category in ("single_object", "colors"):
        s, = _pick(rng, SHAPES)
        return make_prompt(category, (s,), (_pick(rng, COLOUR_NAMES)[0],) if category == "colors" else ())
    if category in ("two_object", "position", "color_attr"):
        s1, s2 = _pick(rng, SHAPES, 2)
        cols = tuple(_pick(rng, COLOUR_NAMES, 1)[0] for _ in range(2)) if category == "color_attr" else ()
        rel = RELATIONS[rng.integers(len(RELATIONS))] if category == "position" else None
        return make_prompt(category, (s1, s2), cols, relation=rel)
    if category == "counting":
        return make_prompt(category, tuple(_pick(rng, SHAPES)), count=int(rng.integers(2, 5)))
    raise ValueError(f"unknown prompt category {category!r}; valid: {', '.join(CATEGORIES)}")


def scene_for(prompt: Prompt, rng: np.random.Generator) -> Scene:
    """A scene showing exactly what the prompt asks for (no extra objects); unnamed colours random."""
    colour = lambda c: c if c is not None else COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]  # noqa: E731
    if prompt.category == "scene":
        return prompt.scene
    if prompt.category in ("counting", "color_count"):
        cells = rng.permutation(4)[:prompt.count]
        objs = [place(rng, prompt.items[0][1], colour(prompt.items[0][0]), int(c)) for c in cells]
    elif prompt.category in ("position", "color_position"):
        pairs = _REL_CELLS[prompt.relation]
        a, b = pairs[rng.integers(len(pairs))]
        objs = [place(rng, s, colour(c), cell) for (c, s), cell in zip(prompt.items, (a, b))]
    elif prompt.category == "objects" and prompt.cells is not None:  # named cells kept, the others random
        free = [int(c) for c in rng.permutation(4) if int(c) not in prompt.cells]
        cells = [c if c is not None else free.pop(0) for c in prompt.cells]
        objs = [place(rng, s, colour(c), cell) for (c, s), cell in zip(prompt.items, cells)]
    else:
        cells = rng.permutation(4)[:len(prompt.items)]
        objs = [place(rng, s, colour(c), int(cell)) for (c, s), cell in zip(prompt.items, cells)]
    return tuple(sorted(objs, key=lambda o: o.cell))
