"""Write the miniature world as a training dataset (docs/data-format.md) plus evaluation sets.

    root/world.json                    what was written: counts, seed, held-out combinations
    root/<split>/{generation,understanding,text}.jsonl   image paths relative to root/<split>/
    root/<split>/prompts.jsonl         GenEval-style prompts (structured, for the judge)
    root/<split>/questions.jsonl       understanding questions with exact answers
    root/<split>/edit.jsonl            train: edit records (source image, instruction, target image)
    root/<split>/edits.jsonl           val / test: edit tasks with their exact target scenes (edits.py)

Held-out combinations: a few colour-object pairs (for colour attribution) and a few side-by-side
shape layouts (for position) never occur together in any train or validation image, caption or
question; half of the test split's colour-attribution and position prompts use them.

`captions` chooses the train split's generation captions: "v1" (the default: GenEval's six templates
and full scene descriptions, the same bytes as always) or "v2" / a caption mix (`captions.py`: also
captions written the way people write prompts, in varied wording). Validation and test never change.
Only the generation pairs differ: the understanding and text files are those of the v1 world. The
per-sample draws (`generation_pair`, `understanding_item`, `text_item`) are shared with the
fresh-scenes training source (januskit.train.data.fresh).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint.io import atomic_folder
from .captions import CaptionMix, caption_mix, draw_caption
from .edits import TASKS, draw_edit, held_out_edits
from .prompts import CATEGORIES, GEN_KINDS, Prompt, describe, sample_prompt, scene_for, scene_to_json
from .questions import ALL_QTYPES, QTYPES, Question, ask, ask_some
from .render import render
from .scene import COLOUR_NAMES, SHAPES, Obj, Scene, random_scene, relation

_SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class HeldOut:
    colour_pairs: frozenset[frozenset[tuple[str, str]]]  # {(colour, shape), (colour, shape)}
    layouts: frozenset[tuple[str, str, str]]  # (shape, "left of" | "above", shape)

    def violated_by(self, scene: Scene) -> bool:
        for a, b in itertools.permutations(scene, 2):
            if frozenset({(a.colour, a.shape), (b.colour, b.shape)}) in self.colour_pairs:
                return True
            if relation(a, b) in ("left of", "above") and (a.shape, relation(a, b), b.shape) in self.layouts:
                return True
        return False

    def prompt_held_out(self, p: Prompt) -> bool:
        if p.category == "color_attr":
            return frozenset(p.items) in self.colour_pairs
        if p.category == "position":
            (_, s1), (_, s2) = p.items
            layout = (s1, p.relation, s2) if p.relation in ("left of", "above") else \
                (s2, {"right of": "left of", "below": "above"}[p.relation], s1)
            return layout in self.layouts
        return False

    def mentioned_by(self, p: Prompt) -> bool:
        """Does the caption itself name a held-out combination, of any category: two coloured objects of a
        held-out pair, or two shapes in a held-out layout (by a relation, or by the cells it names)?"""
        if p.scene is not None:
            return self.violated_by(p.scene)
        for a, b in itertools.combinations(p.items, 2):
            if a[0] is not None and b[0] is not None and frozenset({a, b}) in self.colour_pairs:
                return True
        rels = []
        if p.relation is not None:
            rels.append((p.items[0][1], p.relation, p.items[1][1]))
        named = [Obj(s, "red", k) for (_, s), k in zip(p.items, p.cells or ()) if k is not None]
        rels += [(a.shape, relation(a, b), b.shape) for a, b in itertools.permutations(named, 2) if relation(a, b)]
        flip = {"right of": "left of", "below": "above"}
        return any(((s1, r, s2) if r not in flip else (s2, flip[r], s1)) in self.layouts for s1, r, s2 in rels)


def held_out(seed: int = 1234) -> HeldOut:
    """~15% of colour-attribution pairs and 4 of the 24 two-shape layouts, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    objs = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    pairs = sorted({tuple(sorted(p)) for p in itertools.combinations(objs, 2) if p[0][1] != p[1][1]})
    pick = rng.choice(len(pairs), size=round(0.15 * len(pairs)), replace=False)
    layouts = [(a, r, b) for r in ("left of", "above") for a in SHAPES for b in SHAPES if a != b]
    lay = [layouts[i] for i in rng.choice(12, size=2, replace=False)] + \
          [layouts[12 + i] for i in rng.choice(12, size=2, replace=False)]
    return HeldOut(frozenset(frozenset(pairs[i]) for i in pick), frozenset(lay))


def _allowed(rng: np.random.Generator, make, held: HeldOut, split: str, scene_of=lambda x: x):
    """Draw until the held-out rule allows it (train/val never show a held-out combination)."""
    while True:
        x = make(rng)
        if split == "test" or not held.violated_by(scene_of(x)):
            return x


def _gen_pair(rng: np.random.Generator) -> tuple[Prompt, Scene]:
    kind = GEN_KINDS[rng.integers(len(GEN_KINDS))]
    if kind == "scene":
        s = random_scene(rng)
        return Prompt("scene", describe(s), (), scene=s), s
    p = sample_prompt(rng, kind)
    return p, scene_for(p, rng)


def training_pair(rng: np.random.Generator, held: HeldOut,
                  captions: str | dict | CaptionMix = "v1") -> tuple[Prompt, Scene]:
    """A generation (caption, scene) pair as the train split draws them, held-out combinations excluded."""
    return generation_pair(rng, held, "train", captions)


def generation_pair(rng: np.random.Generator, held: HeldOut, split: str = "train",
                    captions: str | dict | CaptionMix = "v1") -> tuple[Prompt, Scene]:
    """One generation (caption, scene) pair of `split`; "v1" captions draw exactly as they always have."""
    if isinstance(captions, str) and captions == "v1":
        return _allowed(rng, _gen_pair, held, split, scene_of=lambda x: x[1])
    mix = caption_mix(captions)
    while True:  # neither the image nor the caption may show a held-out combination
        p, s = draw_caption(rng, mix)
        if split == "test" or not (held.violated_by(s) or held.mentioned_by(p)):
            return p, s


def understanding_item(rng: np.random.Generator, held: HeldOut, split: str = "train",
                       turns: int = 3) -> tuple[Scene, list[Question]]:
    """A scene and up to `turns` questions about it, as `split`'s understanding conversations draw them."""
    s = _allowed(rng, random_scene, held, split)
    return s, ask_some(s, rng, turns)


def text_item(rng: np.random.Generator, held: HeldOut, split: str = "train") -> str:
    """A text document as `split` draws them."""
    return text_document(_allowed(rng, random_scene, held, split), rng)


def training_scene(rng: np.random.Generator, held: HeldOut) -> Scene:
    """A random scene as the train split draws them, held-out combinations excluded."""
    return _allowed(rng, random_scene, held, "train")


def conversation(qs, image: str, question_first: bool = False) -> dict:
    """An understanding record: the image with the first question, before it or (`question_first`) after it."""
    msgs = []
    for i, q in enumerate(qs):
        content = q.question if i else (f"{q.question}\n<image_placeholder>" if question_first
                                         else f"<image_placeholder>\n{q.question}")
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": q.answer})
    return {"kind": "understanding", "images": [image], "messages": msgs}


def text_document(scene: Scene, rng: np.random.Generator) -> str:
    qs = ask_some(scene, rng, 3, QTYPES)
    return " ".join([describe(scene) + "."] + [f"{q.question} {q.answer}." for q in qs])


def write_split(root: Path, split: str, seed: int, held: HeldOut, *, n_gen: int, n_und: int, n_text: int,
                turns: int = 3, n_prompts: int = 0, n_questions: int = 0,
                captions: str | dict | CaptionMix = "v1", n_edit: int = 0, n_edits: int = 0) -> dict[str, int]:
    rng = np.random.default_rng([seed, _SPLIT_SEED[split]])
    d = root / split
    (d / "img").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}

    def save(scene: Scene, name: str) -> str:
        render(scene).save(d / "img" / name, compress_level=1)
        return f"img/{name}"  # relative to the manifest's folder (the loader's default root)

    def write(name: str, rows: list[dict]) -> None:
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts[f"{split}/{name}"] = len(rows)

    v1 = isinstance(captions, str) and captions == "v1"
    # Other captions come from a stream of their own while the v1 draws still advance `rng`, so the
    # understanding and text files stay those of the v1 world: only the generation pairs differ.
    gen_rng = rng if v1 else np.random.default_rng([seed, _SPLIT_SEED[split], 1])
    gen = []
    for i in range(n_gen):
        if not v1:
            generation_pair(rng, held, split)
        p, s = generation_pair(gen_rng, held, split, captions)
        gen.append({"kind": "generation", "caption": p.text, "image": save(s, f"g{i:06d}.png"), "category": p.category,
                    "scene": scene_to_json(s)} | ({} if v1 else {"prompt": p.to_json()}))
    if n_gen:
        write("generation.jsonl", gen)
    und = []
    for i in range(n_und):
        s, qs = understanding_item(rng, held, split, turns)
        und.append(conversation(qs, save(s, f"u{i:06d}.png")) | {"scene": scene_to_json(s)})
    if n_und:
        write("understanding.jsonl", und)
    if n_text:
        write("text.jsonl", [{"kind": "text", "text": text_item(rng, held, split)} for _ in range(n_text)])
    if n_prompts:
        write("prompts.jsonl", [p.to_json() | {"held_out": held.prompt_held_out(p)}
                                for p in eval_prompts(rng, n_prompts, held, split)])
    if n_questions:
        rows = []
        for qtype in ALL_QTYPES:
            k = 0
            while k < n_questions:
                s = _allowed(rng, random_scene, held, split)
                q = ask(s, qtype, rng)
                if q is None:
                    continue
                rows.append(q.to_json() | {"image": save(s, f"q{len(rows):06d}.png"), "scene": scene_to_json(s)})
                k += 1
        write("questions.jsonl", rows)
    # Edits draw from a stream of their own, so every other file is the same with or without them.
    edit_rng = np.random.default_rng([seed, _SPLIT_SEED[split], 2])
    edit_held = held_out_edits()
    if n_edit:  # training records: the tasks in turn
        rows = []
        for i in range(n_edit):
            e = draw_edit(edit_rng, TASKS[i % len(TASKS)], edit_held, world_held=held)
            rows.append({"kind": "edit", "instruction": e.instruction, "images": [save(e.source, f"e{i:06d}s.png")],
                         "target": save(e.target, f"e{i:06d}t.png"), "task": e.task,
                         "source_scene": scene_to_json(e.source), "target_scene": scene_to_json(e.target)})
        write("edit.jsonl", rows)
    if n_edits:  # evaluation: n_edits per task; on the test split half of them held-out combinations
        rows = []
        for task in TASKS:
            for k in range(n_edits):
                want = (k % 2 == 1) if split == "test" else None
                e = draw_edit(edit_rng, task, edit_held, world_held=held, want_held=want)
                rows.append(e.to_json() | {"image": save(e.source, f"x{len(rows):06d}.png"), "held_out": bool(want)})
        write("edits.jsonl", rows)
    return counts


def eval_prompts(rng: np.random.Generator, per_category: int, held: HeldOut, split: str) -> list[Prompt]:
    """`per_category` prompts of each GenEval category. On the test split half of the position and
    colour-attribution prompts are held-out combinations; elsewhere none are."""
    out = []
    for cat in CATEGORIES:
        want_held = per_category // 2 if split == "test" and cat in ("position", "color_attr") else 0
        got_held = got_seen = 0
        while got_held + got_seen < per_category:
            p = sample_prompt(rng, cat)
            h = held.prompt_held_out(p)
            if h and got_held < want_held:
                got_held += 1
            elif not h and got_seen < per_category - want_held:
                got_seen += 1
            else:
                continue
            out.append(p)
    return out


SIZES = {  # images per split: generation, understanding (3 questions each), text documents, eval sets
    "train": dict(n_gen=24000, n_und=12000, n_text=6000, n_edit=6000),
    "val": dict(n_gen=200, n_und=200, n_text=100, n_prompts=10, n_questions=20, n_edits=5),
    "test": dict(n_gen=0, n_und=0, n_text=0, n_prompts=50, n_questions=100, n_edits=50),
}


def write_world(root: str | Path, *, seed: int = 0, scale: float = 1.0, overwrite: bool = False,
                captions: str | dict | CaptionMix = "v1") -> Path:
    """Write every split (deterministic in `seed`; `scale` shrinks the train split, for smoke runs).
    `captions`: the train split's caption mix ("v1", "v2" or a table, see `captions.py`)."""
    root = Path(root)
    held = held_out()
    v1 = isinstance(captions, str) and captions == "v1"
    if not v1:
        caption_mix(captions)  # an unknown mix fails before anything is written
    with atomic_folder(root, overwrite=overwrite) as tmp:
        counts = {}
        for split, sizes in SIZES.items():
            n = {k: max(1, round(v * scale)) if split == "train" else v for k, v in sizes.items()}
            counts.update(write_split(tmp, split, seed, held, **n, **({"captions": captions} if split == "train" else {})))
        meta = {"seed": seed, "scale": scale, "counts": counts,
                "held_out": {"colour_pairs": sorted(sorted(map(list, p)) for p in held.colour_pairs),
                             "layouts": sorted(map(list, held.layouts))}}
        if not v1:
            meta["captions"] = captions if isinstance(captions, str) else caption_mix(captions).to_json()
        (tmp / "world.json").write_text(json.dumps(meta, indent=1) + "\n")
    return root


def read_prompts(path: str | Path) -> list[tuple[Prompt, bool]]:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return [(Prompt.from_json(r), bool(r.get("held_out"))) for r in rows]
