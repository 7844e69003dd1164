"""Edit tasks of the miniature world: a source scene, an instruction, and the exact target scene.

Six tasks, each changing one thing and nothing else: recolour an object, move it to an empty cell, add
one, remove one, swap two, change an object's shape. The object named in an instruction is the only one
of its colour and shape in the scene, so the target is unambiguous. Geometry (size, offset) is kept by
every task: a moved object keeps its offset in its new cell, a swap exchanges cells only.

Held-out combinations: for each task about 15% of its combinations (recolour: shape x new colour; move:
shape x target cell; add / remove: colour x shape of the object; swap: the two shapes; reshape: old x new
shape) never occur in training; half of the test split's edits of each task use them. Train edits also
respect the world's own held-out colour pairs and layouts (dataset.HeldOut), in source and target.

Scoring (`score_edit`): the judge's detections of the edited image, as (shape, colour, cell), must equal the
target scene's exactly: the edit done, and nothing else changed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .prompts import article, scene_from_json, scene_to_json
from .scene import CELL_NAMES, COLOUR_NAMES, SHAPES, Obj, Scene, place, random_scene

TASKS = ("recolour", "move", "add", "remove", "swap", "reshape")


@dataclass(frozen=True)
class Edit:
    task: str
    instruction: str
    source: Scene
    target: Scene
    combination: tuple  # what the held-out rule looks at

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "instruction": self.instruction, "source": scene_to_json(self.source),
                "target": scene_to_json(self.target), "combination": list(self.combination)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Edit":
        return cls(d["task"], d["instruction"], scene_from_json(d["source"]), scene_from_json(d["target"]),
                   tuple(d["combination"]))


def combinations(task: str) -> list[tuple]:
    if task == "recolour":
        return [(s, c) for s in SHAPES for c in COLOUR_NAMES]
    if task == "move":
        return [(s, k) for s in SHAPES for k in range(4)]
    if task in ("add", "remove"):
        return [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    if task == "swap":
        return sorted(itertools.combinations_with_replacement(SHAPES, 2))
    if task == "reshape":
        return [(a, b) for a in SHAPES for b in SHAPES if a != b]
    raise ValueError(f"unknown edit task {task!r}; tasks: {', '.join(TASKS)}")


def held_out_edits(seed: int = 4321) -> dict[str, frozenset[tuple]]:
    """~15% of each task's combinations (at least one), fixed by `seed`."""
    rng = np.random.default_rng(seed)
    out = {}
    for task in TASKS:
        combos = combinations(task)
        pick = rng.choice(len(combos), size=max(1, round(0.15 * len(combos))), replace=False)
        out[task] = frozenset(combos[i] for i in sorted(pick))
    return out


def _unique(scene: Scene, o: Obj) -> bool:
    return sum(x.shape == o.shape and x.colour == o.colour for x in scene) == 1


def _draw(rng: np.random.Generator, task: str) -> Edit | None:
    """One edit of `task` on a random scene, or None when the scene does not allow it."""
    n = int(rng.integers(2 if task == "swap" else 1, 4 if task in ("move", "add") else 5))
    scene = random_scene(rng, n)
    free = [k for k in range(4) if all(o.cell != k for o in scene)]
    objs = [o for o in scene if _unique(scene, o)]
    if task == "add":
        if not free:
            return None
        k = free[int(rng.integers(len(free)))]
        c, s = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))], SHAPES[int(rng.integers(len(SHAPES)))]
        new = place(rng, s, c, k)
        if not _unique(scene + (new,), new):
            return None
        return Edit(task, f"add {article(c)} {c} {s} at the {CELL_NAMES[k]}", scene, _sorted(scene + (new,)), (c, s))
    if not objs:
        return None
    o = objs[int(rng.integers(len(objs)))]
    rest = tuple(x for x in scene if x is not o)
    if task == "recolour":
        c = [c for c in COLOUR_NAMES if c != o.colour][int(rng.integers(len(COLOUR_NAMES) - 1))]
        new = replace(o, colour=c)
        if not _unique(rest + (new,), new):
            return None
        return Edit(task, f"make the {o.name} {c}", scene, _sorted(rest + (new,)), (o.shape, c))
    if task == "move":
        if not free:
            return None
        k = free[int(rng.integers(len(free)))]
        return Edit(task, f"move the {o.name} to the {CELL_NAMES[k]}", scene, _sorted(rest + (replace(o, cell=k),)),
                    (o.shape, k))
    if task == "remove":
        return Edit(task, f"remove the {o.name}", scene, _sorted(rest), (o.colour, o.shape))
    if task == "reshape":
        s = [s for s in SHAPES if s != o.shape][int(rng.integers(len(SHAPES) - 1))]
        new = replace(o, shape=s)
        if not _unique(rest + (new,), new):
            return None
        return Edit(task, f"turn the {o.name} into {article(s)} {s}", scene, _sorted(rest + (new,)), (o.shape, s))
    if task == "swap":  # two objects, each the only one of its colour and shape, exchange cells
        others = [x for x in objs if x is not o]
        if not others:
            return None
        b = others[int(rng.integers(len(others)))]
        swapped = tuple(replace(x, cell=b.cell) if x is o else replace(x, cell=o.cell) if x is b else x for x in scene)
        return Edit(task, f"swap the {o.name} and the {b.name}", scene, _sorted(swapped), tuple(sorted((o.shape, b.shape))))
    raise ValueError(f"unknown edit task {task!r}; tasks: {', '.join(TASKS)}")


def _sorted(scene: Scene) -> Scene:
    return tuple(sorted(scene, key=lambda o: o.cell))


def draw_edit(rng: np.random.Generator, task: str, held: dict[str, frozenset[tuple]], *, world_held=None,
              want_held: bool | None = None) -> Edit:
    """An edit of `task`. `want_held`: None, never a held-out combination (train / val: also never a
    scene showing one of the world's held-out pairs or layouts, `world_held`); True / False: a held-out /
    a seen combination (the test split asks for both)."""
    if task not in TASKS:
        raise ValueError(f"unknown edit task {task!r}; tasks: {', '.join(TASKS)}")
    while True:
        e = _draw(rng, task)
        if e is None:
            continue
        h = e.combination in held[task]
        if want_held is None:
            if h or (world_held is not None and (world_held.violated_by(e.source) or world_held.violated_by(e.target))):
                continue
        elif h != want_held:
            continue
        return e


def scene_key(scene) -> list[tuple[str, str, int]]:
    """What an edit must get right: each object's shape, colour and cell (geometry aside)."""
    return sorted((o.shape, o.colour, o.cell) for o in scene)


def score_edit(detections, target: Scene) -> bool:
    """The judge's detections (world.judge.detect) of an edited image against the target scene."""
    return scene_key(detections) == scene_key(target)


DIAGNOSTICS = ("count", "objects", "cells", "kept")


def edit_diagnostics(detections, edit: Edit) -> dict[str, bool]:
    """Where an edited image goes wrong, each part of the exact match on its own: the number of objects, the
    objects (shape and colour, cells aside), the occupied cells (what is in them aside), and every object the
    edit does not touch kept (shape, colour and cell)."""
    from collections import Counter

    got, want = Counter(scene_key(detections)), Counter(scene_key(edit.target))
    keep = want & Counter(scene_key(edit.source))
    ident = lambda c: Counter((s, col) for s, col, _ in c.elements())  # noqa: E731
    cells = lambda c: Counter(k for _, _, k in c.elements())  # noqa: E731
    return {"count": sum(got.values()) == sum(want.values()), "objects": ident(got) == ident(want),
            "cells": cells(got) == cells(want), "kept": (keep & got) == keep}
