"""Training captions written the way people write prompts (the "v2" caption mix of the train split).

GenEval's six templates never put a colour and a position in one sentence, and neither do the full
scene descriptions, yet that is how people ask for an image ("a red circle to the left of a blue
square"). This module adds caption kinds that do, each drawn with its scene and carrying a structured
`Prompt` the judge scores (`judge.score`), so every caption is checked against its image:

| kind | example (canonical wording) | judge category |
|---|---|---|
| `color_position` | a red circle to the left of a blue square | `color_position` |
| `position_some_colours` | a circle above a blue diamond (one of the two colours named) | `color_position` |
| `color_count` | three red circles | `color_count` |
| `objects` | two squares, a red circle and a blue diamond (every object listed, some colours named) | `objects` |
| `partial_scene` | a red circle at the top left and a square (every object listed, some cells and colours named) | `objects` |

plus the seven kinds of the "v1" captions (GenEval's six and `scene`). A caption lists every object its
image shows: "partial" means some colours or places are left unsaid, never that an object is (an unnamed
extra object would teach the model to draw objects nobody asked for).

A share `vary` of the captions, of every kind, is reworded the way prompts are typed: a frame ("a picture
of ...", "an image with ...", "draw ...", "there is ... / there are ...", "... on a white background"),
synonyms for the relations ("on the left of", "left of", "over", "under", "beneath", "underneath") and the
cells ("in the upper left corner"), digits for counts, "one" for "a", a capital letter, a full stop. The
rest keep the canonical wording (`phrase(prompt)`), which for the v1 kinds is exactly their v1 text.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from .prompts import CATEGORIES, Prompt, _pick, article, describe, plural, sample_prompt, scene_for
from .scene import COLOUR_NAMES, NUMBERS, RELATIONS, SHAPES, Scene, random_scene

V1_KINDS = CATEGORIES + ("scene",)
NEW_KINDS = ("color_position", "position_some_colours", "color_count", "objects", "partial_scene")
CAPTION_KINDS = V1_KINDS + NEW_KINDS

# Wording: the first entry of each tuple is the canonical one.
REL_WORDS = {"left of": ("to the left of", "on the left of", "left of"),
             "right of": ("to the right of", "on the right of", "right of"),
             "above": ("above", "over"), "below": ("below", "under", "beneath", "underneath")}
CELL_WORDS = {0: ("top left", "upper left", "top-left"), 1: ("top right", "upper right", "top-right"),
              2: ("bottom left", "lower left", "bottom-left"), 3: ("bottom right", "lower right", "bottom-right")}
CELL_FRAMES = ("at the {}", "in the {}", "in the {} corner", "at the {} corner")
FRAMES = ("{}", "a picture of {}", "an image of {}", "an image with {}", "a drawing of {}", "draw {}", "show {}",
          "there is {}", "{} on a white background")  # "there is" becomes "there are" before a plural
_BARE_P, _DIGIT_P, _ONE_P, _CAPITAL_P, _PERIOD_P, _SHUFFLE_P = 0.4, 0.25, 0.15, 0.5, 0.5, 0.5


@dataclass(frozen=True)
class CaptionMix:
    """Which caption kinds the train split draws (relative weights), and how they are worded."""

    weights: tuple[tuple[str, float], ...]
    vary: float = 0.5  # share of captions reworded (the rest keep the canonical wording)
    colour_p: float = 0.6  # objects / partial_scene: chance that an object's colour is named
    cell_p: float = 0.5  # partial_scene: chance that an object's cell is named

    def __post_init__(self) -> None:
        unknown = [k for k, _ in self.weights if k not in CAPTION_KINDS]
        if unknown:
            raise ValueError(f"unknown caption kind(s) {unknown}; valid: {', '.join(CAPTION_KINDS)}")
        if any(w < 0 for _, w in self.weights) or sum(w for _, w in self.weights) <= 0:
            raise ValueError(f"caption weights must be >= 0 with a positive sum, got {dict(self.weights)}")
        for name in ("vary", "colour_p", "cell_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"caption mix {name} must be in [0, 1], got {getattr(self, name)}")

    def to_json(self) -> dict:
        return {**dict(self.weights), "vary": self.vary, "colour_p": self.colour_p, "cell_p": self.cell_p}


MIXES = {  # "v1" is the legacy train split (januskit.world.dataset keeps its exact draws)
    "v2": CaptionMix(tuple((k, 1.0) for k in V1_KINDS) + (
        ("color_position", 2.0), ("position_some_colours", 1.0), ("color_count", 1.0), ("objects", 1.0),
        ("partial_scene", 1.0))),
    # v3: the v2 kinds with the binding ones weighted up (GenEval's position and colour attribution, and
    # colour + position), whole-scene and single-object captions down: the default model drew single
    # objects at 0.93 but bound colour to object at 0.08 and place at 0.21 with v2.
    "v3": CaptionMix((("single_object", 0.5), ("two_object", 1.5), ("counting", 1.0), ("colors", 1.0),
                      ("position", 2.0), ("color_attr", 3.0), ("scene", 0.5), ("color_position", 2.0),
                      ("position_some_colours", 1.0), ("color_count", 1.0), ("objects", 1.0),
                      ("partial_scene", 0.5))),
}


def caption_mix(spec: str | Mapping | CaptionMix) -> CaptionMix:
    """A named mix ("v2"), a CaptionMix, or a table {kind: weight, ..., vary=, colour_p=, cell_p=}."""
    if isinstance(spec, CaptionMix):
        return spec
    if isinstance(spec, str):
        if spec not in MIXES:
            raise ValueError(f"unknown caption mix {spec!r}; named mixes: v1, {', '.join(MIXES)} (or a table of "
                             f"kind weights)")
        return MIXES[spec]
    opts = {k: float(spec[k]) for k in ("vary", "colour_p", "cell_p") if k in spec}
    return CaptionMix(tuple((k, float(w)) for k, w in spec.items() if k not in opts), **opts)


# ------------------------------------------------------------------------------------------- wording
class _Words:
    """Wording choices: the canonical one without a generator, a random one with it."""

    def __init__(self, rng: np.random.Generator | None) -> None:
        self.rng = rng

    def pick(self, options: tuple[str, ...]) -> str:
        return options[0] if self.rng is None else options[int(self.rng.integers(len(options)))]

    def coin(self, p: float) -> bool:
        return self.rng is not None and bool(self.rng.random() < p)


def _mention(colour: str | None, shape: str, n: int, cell: int | None, w: _Words) -> str:
    if n == 1:
        words = f"{colour} {shape}" if colour else shape
        text = f"{'one' if w.coin(_ONE_P) else article(words)} {words}"
    else:
        text = f"{str(n) if w.coin(_DIGIT_P) else NUMBERS[n]} {f'{colour} ' if colour else ''}{plural(shape)}"
    return text if cell is None else f"{text} {w.pick(CELL_FRAMES).format(w.pick(CELL_WORDS[cell]))}"


def _join(parts: list[str], w: _Words) -> str:
    if len(parts) == 1:
        return parts[0]
    last = w.pick((" and ", ", and ")) if len(parts) > 2 else " and "
    return ", ".join(parts[:-1]) + last + parts[-1]


def _grouped(items, cells) -> list[tuple[str | None, str, int, int | None]]:
    """Mentions in order of first appearance; equal items without a cell become one counted mention."""
    out: list[list] = []
    for (c, s), k in zip(items, cells):
        same = next((m for m in out if k is None and m[3] is None and (m[0], m[1]) == (c, s)), None)
        if same is not None:
            same[2] += 1
        else:
            out.append([c, s, 1, k])
    return [tuple(m) for m in out]


def phrase(p: Prompt, rng: np.random.Generator | None = None) -> str:
    """The prompt's meaning in words: canonical without `rng` (for the v1 categories exactly the v1 text),
    else in a randomly chosen wording of the same meaning."""
    w = _Words(rng)
    if p.category in ("position", "color_position"):
        (c1, s1), (c2, s2) = p.items
        body = f"{_mention(c1, s1, 1, None, w)} {w.pick(REL_WORDS[p.relation])} {_mention(c2, s2, 1, None, w)}"
        first = 1
    else:
        if p.category == "scene":
            objs = sorted(p.scene, key=lambda o: o.cell)
            if not objs:
                return describe(p.scene)
            mentions = [(o.colour, o.shape, 1, o.cell) for o in objs]
        elif p.category in ("counting", "color_count"):
            mentions = [(p.items[0][0], p.items[0][1], p.count, None)]
        elif p.category in ("single_object", "colors", "two_object", "color_attr", "objects"):
            mentions = _grouped(p.items, p.cells or (None,) * len(p.items))
        else:
            raise ValueError(f"no wording for prompt category {p.category!r}")
        body = _join([_mention(*m, w) for m in mentions], w)
        first = mentions[0][2]
    if w.rng is None:
        return body
    frame = "{}" if w.coin(_BARE_P) else w.pick(FRAMES[1:])
    if frame.startswith("there is") and first > 1:
        frame = "there are {}"
    text = frame.format(body)
    if w.coin(_CAPITAL_P):
        text = text[0].upper() + text[1:]
    return text + "." if w.coin(_PERIOD_P) else text


# -------------------------------------------------------------------------------------- caption kinds
def _colour(rng: np.random.Generator) -> str:
    return COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]


def _shape(rng: np.random.Generator) -> str:
    return SHAPES[int(rng.integers(len(SHAPES)))]


def _v1(kind: str) -> Callable[[np.random.Generator, CaptionMix], tuple[Prompt, Scene]]:
    def draw(rng: np.random.Generator, mix: CaptionMix) -> tuple[Prompt, Scene]:
        if kind == "scene":
            s = random_scene(rng)
            return Prompt("scene", describe(s), (), scene=s), s
        p = sample_prompt(rng, kind)
        return p, scene_for(p, rng)
    return draw


def _with_scene(p: Prompt, rng: np.random.Generator) -> tuple[Prompt, Scene]:
    p = replace(p, text=phrase(p))
    return p, scene_for(p, rng)


def color_position(rng: np.random.Generator, mix: CaptionMix) -> tuple[Prompt, Scene]:
    """Two coloured objects in a relation; the same shape twice only in two colours."""
    s1, s2, c1 = _shape(rng), _shape(rng), _colour(rng)
    c2 = _pick(rng, tuple(c for c in COLOUR_NAMES if s1 != s2 or c != c1))[0]
    rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
    return _with_scene(Prompt("color_position", "", ((c1, s1), (c2, s2)), relation=rel), rng)


def position_some_colours(rng: np.random.Generator, mix: CaptionMix) -> tuple[Prompt, Scene]:
    """Two different shapes in a relation, only one of them with its colour."""
    shapes, c = _pick(rng, SHAPES, 2), _colour(rng)
    rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
    items = ((c, shapes[0]), (None, shapes[1])) if rng.random() < 0.5 else ((None, shapes[0]), (c, shapes[1]))
    return _with_scene(Prompt("color_position", "", items, relation=rel), rng)


def color_count(rng: np.random.Generator, mix: CaptionMix) -> tuple[Prompt, Scene]:
    """2-4 objects of one shape and one colour."""
    s, c, n = _shape(rng), _colour(rng), int(rng.integers(2, 5))
    return _with_scene(Prompt("color_count", "", ((c, s),), count=n), rng)


def _listed(rng: np.random.Generator, scene: Scene, mix: CaptionMix, cells: bool) -> Prompt:
    """Every object of `scene` listed; colours (and, with `cells`, cells) named for some. Objects that share
    a shape are told apart: without cells all or none of their colours are named (none: "two circles"),
    with cells each is named with its cell."""
    objs = list(scene)
    if rng.random() < _SHUFFLE_P:  # people list objects in any order; half the time in reading order
        objs = [objs[int(i)] for i in rng.permutation(len(objs))]
    named_colour = {id(o): bool(rng.random() < mix.colour_p) for o in objs}
    named_cell = {id(o): cells and bool(rng.random() < mix.cell_p) for o in objs}
    for s in {o.shape for o in objs}:
        group = [o for o in objs if o.shape == s]
        if len(group) < 2:
            continue
        if not cells:
            for o in group:
                named_colour[id(o)] = named_colour[id(group[0])]
        else:
            for o in group:
                named_cell[id(o)] = True
    if cells and not any(named_cell.values()):  # a partial description *with positions*
        named_cell[id(objs[int(rng.integers(len(objs)))])] = True
    items = tuple((o.colour if named_colour[id(o)] else None, o.shape) for o in objs)
    where = tuple(o.cell if named_cell[id(o)] else None for o in objs)
    order: list[int] = []  # equal mentions without a cell side by side, so they read as one counted mention
    for i in range(len(objs)):
        after = [n for n, j in enumerate(order) if where[i] is None and where[j] is None and items[j] == items[i]]
        order.insert(after[-1] + 1 if after else len(order), i)
    items, where = tuple(items[i] for i in order), tuple(where[i] for i in order)
    p = Prompt("objects", "", items, cells=where if cells else None)
    return replace(p, text=phrase(p))


def objects(rng: np.random.Generator, mix: CaptionMix) -> tuple[Prompt, Scene]:
    """2-4 objects, all listed, colours named for some (counted when equal: "two red circles")."""
    s = random_scene(rng, int(rng.integers(2, 5)))
    return _listed(rng, s, mix, cells=False), s


def partial_scene(rng: np.random.Generator, mix: CaptionMix) -> tuple[Prompt, Scene]:
    """A scene as `scene` draws them (1-4 objects), all listed, cells and colours named for some."""
    s = random_scene(rng)
    return _listed(rng, s, mix, cells=True), s


KIND_DRAW: dict[str, Callable[[np.random.Generator, CaptionMix], tuple[Prompt, Scene]]] = {
    **{k: _v1(k) for k in V1_KINDS}, "color_position": color_position,
    "position_some_colours": position_some_colours, "color_count": color_count, "objects": objects,
    "partial_scene": partial_scene}


def draw_caption(rng: np.random.Generator, mix: CaptionMix, kind: str | None = None) -> tuple[Prompt, Scene]:
    """A (caption, scene) pair of a kind drawn by the mix's weights (or of `kind`), worded canonically or,
    with probability `mix.vary`, in a random wording of the same meaning."""
    if kind is None:
        kinds = [k for k, _ in mix.weights]
        w = np.asarray([w for _, w in mix.weights], dtype=np.float64)
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
    p, s = KIND_DRAW[kind](rng, mix)
    if rng.random() < mix.vary:
        p = replace(p, text=phrase(p, rng))
    return p, s
