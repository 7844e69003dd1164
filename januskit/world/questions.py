"""Understanding questions about a scene, with exact answers.

Types mirror the QA benchmarks the papers report: colour, shape, count and relative position
questions (GQA-like), POPE-style yes/no object probes with balanced negatives (half random absent
objects, half adversarial ones that share the shape or the colour of a present object), and
`describe` (the full scene description; scored by object set, not part of the QA accuracy).
`where` (one object's cell, "at the top left") is a training-only type for studies: it is in neither tuple,
so the recipe's conversations and the test split never draw it unless asked to.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .prompts import describe, noun, plural, relation_text
from .scene import CELL_NAMES, COLOUR_NAMES, NUMBERS, SHAPES, Scene, relation

QTYPES = ("colour", "shape", "count", "position", "pope")
ALL_QTYPES = QTYPES + ("describe",)
STUDY_QTYPES = ("where",)


@dataclass(frozen=True)
class Question:
    qtype: str
    question: str
    answer: str
    variant: str = ""  # pope: "random" / "adversarial"; count: "shape" / "all"

    def to_json(self) -> dict:
        return {"qtype": self.qtype, "question": self.question, "answer": self.answer, "variant": self.variant}


def _unique(scene: Scene, key) -> dict:
    vals = [key(o) for o in scene]
    return {key(o): o for o in scene if vals.count(key(o)) == 1}


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> Question | None:
    """One question of `qtype` about the scene, or None when the scene cannot support it (e.g. no
    shape occurs once, so 'What colour is the circle?' would be ambiguous)."""
    if qtype in ("colour", "shape"):  # ask about an object its other attribute names uniquely
        by = _unique(scene, (lambda o: o.shape) if qtype == "colour" else (lambda o: o.colour))
        if not by:
            return None
        o = by[sorted(by)[rng.integers(len(by))]]
        if qtype == "colour":
            return Question(qtype, f"What colour is the {o.shape}?", o.colour)
        return Question(qtype, f"What shape is the {o.colour} object?", o.shape)
    if qtype == "count":
        if rng.random() < 0.5:
            return Question(qtype, "How many shapes are there?", NUMBERS[len(scene)], "all")
        s = SHAPES[rng.integers(len(SHAPES))]
        return Question(qtype, f"How many {plural(s)} are there?", NUMBERS[sum(o.shape == s for o in scene)], "shape")
    if qtype == "position":
        named = _unique(scene, lambda o: o.name)
        pairs = [(a, b) for a in named.values() for b in named.values() if a is not b and relation(a, b)]
        if not pairs:
            return None
        a, b = pairs[rng.integers(len(pairs))]
        return Question(qtype, f"Where is the {a.name} relative to the {b.name}?", relation_text(relation(a, b)))
    if qtype == "where":  # one object grounded: the first half of a position question
        named = _unique(scene, lambda o: o.name)
        if not named:
            return None
        o = named[sorted(named)[rng.integers(len(named))]]
        return Question(qtype, f"Where is the {o.name}?", f"at the {CELL_NAMES[o.cell]}")
    if qtype == "pope":
        present = {(o.colour, o.shape) for o in scene}
        if rng.random() < 0.5:
            c, s = sorted(present)[rng.integers(len(present))]
            return Question(qtype, f"Is there {noun(c, s)} in the image?", "yes", "present")
        absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]
        adversarial = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        variant = "adversarial" if adversarial and rng.random() < 0.5 else "random"
        pool = adversarial if variant == "adversarial" else absent
        c, s = pool[rng.integers(len(pool))]
        return Question(qtype, f"Is there {noun(c, s)} in the image?", "no", variant)
    if qtype == "describe":
        return Question(qtype, "What is in this image?", describe(scene))
    raise ValueError(f"unknown question type {qtype!r}; valid: {', '.join(ALL_QTYPES + STUDY_QTYPES)}")


def ask_some(scene: Scene, rng: np.random.Generator, k: int, qtypes: tuple[str, ...] = ALL_QTYPES) -> list[Question]:
    """Up to k questions of distinct types, in random type order."""
    out = []
    for t in rng.permutation(len(qtypes)):
        q = ask(scene, qtypes[int(t)], rng)
        if q is not None:
            out.append(q)
        if len(out) == k:
            break
    return out


def normalise(answer: str) -> str:
    return " ".join(answer.lower().replace(".", " ").replace(",", " , ").split())
