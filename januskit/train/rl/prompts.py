"""Prompt sources for RL: prompt `i` of a run is a pure function of (source, seed, i), so a step's prompts
follow from the step number alone and a resumed run draws exactly what an uninterrupted one would.

- `WorldPrompts`: the miniature world's GenEval-style training prompts (its six categories, drawn as the
  test split's are, and "color_position", colours with a relation as the README's prompt has them),
  held-out combinations never drawn, each carrying its structured prompt for the judge.
- `WorldEditPrompts`: the world's edit tasks on training combinations (docs/editing.md), each an
  instruction carrying its rendered source image (`meta["images"]`, which makes the loop sample an edit)
  and the edit with its exact target scene for the `world_edit` rewards.
- `FilePrompts`: a .txt file (one prompt a line) or a .jsonl file ({"prompt": "...", "meta": {...}} a line,
  meta optional), visited in a new seeded order every pass. A line whose meta holds `"images": ["src.png",
  ...]` (paths relative to the file) is an edit: its prompt is the instruction, the images its sources.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..data.records import jsonl_rows
from .rewards import RewardPrompt

_STREAM = 104729  # keeps these draws apart from the world's other generators


class PromptSource(Protocol):
    def __call__(self, i: int) -> RewardPrompt: ...


class WorldPrompts:
    def __init__(self, seed: int = 0, categories: Sequence[str] | None = None) -> None:
        from ...world.dataset import held_out
        from ...world.prompts import CATEGORIES

        cats = tuple(categories) if categories is not None else CATEGORIES
        valid = (*CATEGORIES, "color_position")
        bad = [c for c in cats if c not in valid]
        if bad or not cats:
            raise ValueError(f"[rl] prompt categories {bad or '(none)'}: valid are {', '.join(valid)}")
        self.seed, self.categories, self.held = seed, cats, held_out()

    def __call__(self, i: int) -> RewardPrompt:
        from ...world.captions import color_position
        from ...world.prompts import sample_prompt

        rng = np.random.default_rng([self.seed, _STREAM, i])
        cat = self.categories[int(rng.integers(len(self.categories)))]
        while True:  # training prompts only: a held-out combination is never asked for
            p = color_position(rng, None)[0] if cat == "color_position" else sample_prompt(rng, cat)
            if not (self.held.prompt_held_out(p) or self.held.mentioned_by(p)):
                return RewardPrompt(p.text, {"prompt": p.to_json()})


class WorldEditPrompts:
    def __init__(self, seed: int = 0, tasks: Sequence[str] | None = None) -> None:
        from ...world.dataset import held_out
        from ...world.edits import TASKS, held_out_edits

        tasks = tuple(tasks) if tasks is not None else TASKS
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"[rl] prompt_categories {bad or '(none)'} for prompts = \"world_edit\": the edit tasks "
                             f"are {', '.join(TASKS)}")
        self.seed, self.tasks, self.held, self.edit_held = seed, tasks, held_out(), held_out_edits()

    def __call__(self, i: int) -> RewardPrompt:
        from ...world.edits import draw_edit
        from ...world.render import render

        rng = np.random.default_rng([self.seed, _STREAM, 1, i])
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        e = draw_edit(rng, task, self.edit_held, world_held=self.held)  # never a held-out combination
        return RewardPrompt(e.instruction, {"edit": e.to_json(), "images": [render(e.source)]})


class FilePrompts:
    def __init__(self, path: str | Path, seed: int = 0) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"[rl] prompts: {path}: no such file")
        self.prompts: list[RewardPrompt] = []
        if path.suffix == ".jsonl":
            for where, row in jsonl_rows(path):
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                    raise ValueError(f"{where}: expected {{\"prompt\": \"...\", \"meta\": {{...}}}} with a non-empty "
                                     "prompt")
                meta = row.get("meta", {})
                if not isinstance(meta, dict):
                    raise ValueError(f"{where}: \"meta\" must be an object")
                if "images" in meta:  # an edit's sources, relative to the file
                    imgs = meta["images"]
                    if not isinstance(imgs, list) or not imgs or not all(isinstance(x, str) for x in imgs):
                        raise ValueError(f"{where}: \"meta\".\"images\" must be a non-empty list of image paths")
                    meta = meta | {"images": [str(path.parent / x) for x in imgs]}
                    missing = [x for x in meta["images"] if not Path(x).is_file()]
                    if missing:
                        raise FileNotFoundError(f"{where}: source image {missing[0]}: no such file")
                self.prompts.append(RewardPrompt(row["prompt"], meta))
        else:
            self.prompts += [RewardPrompt(x.strip()) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        if not self.prompts:
            raise ValueError(f"[rl] prompts: {path} holds no prompts")
        self.seed = seed

    def __call__(self, i: int) -> RewardPrompt:
        n = len(self.prompts)
        order = np.random.default_rng([self.seed, _STREAM, i // n]).permutation(n)
        return self.prompts[int(order[i % n])]


def prompt_source(spec: str, seed: int, categories: Sequence[str] | None = None) -> PromptSource:
    """"world", "world_edit" (`categories`: its edit tasks) or a file path (.txt / .jsonl)."""
    if spec == "world":
        return WorldPrompts(seed, categories)
    if spec == "world_edit":
        return WorldEditPrompts(seed, categories)
    if categories is not None:
        raise ValueError("[rl] prompt_categories is for prompts = \"world\" or \"world_edit\"")
    return FilePrompts(spec, seed)
