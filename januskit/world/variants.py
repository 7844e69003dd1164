"""Minimal-contrast variants of a scene, for contrastive pretraining of the understanding encoder.

In a batch of random world scenes the set of colours alone tells nearly every image from every other
caption, so a SigLIP trained on such batches learns a bag of colours and shapes: which colour belongs to
which shape, and where, is never needed. A group of variants that differ only in that (colours swapped
between two objects, two objects trading places, one object moved to an empty cell, one object's colour or
shape changed), drawn into one batch, makes the binding the only way to tell the captions apart.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .scene import COLOUR_NAMES, SHAPES, Scene


def _swap(attr: str, key):
    """An edit trading `attr` (colour or cell) between two objects whose `key` differs."""
    def edit(s: Scene, rng: np.random.Generator) -> Scene | None:
        pairs = [(i, j) for i in range(len(s)) for j in range(i + 1, len(s)) if key(s[i]) != key(s[j])]
        if not pairs:
            return None
        i, j = pairs[rng.integers(len(pairs))]
        out = list(s)
        out[i] = dataclasses.replace(s[i], **{attr: getattr(s[j], attr)})
        out[j] = dataclasses.replace(s[j], **{attr: getattr(s[i], attr)})
        return tuple(out)
    return edit


_swap_colours = _swap("colour", lambda o: o.colour)
_swap_places = _swap("cell", lambda o: (o.shape, o.colour))


def _move(s: Scene, rng: np.random.Generator) -> Scene | None:
    free = sorted(set(range(4)) - {o.cell for o in s})
    if not free:
        return None
    i = int(rng.integers(len(s)))
    out = list(s)
    out[i] = dataclasses.replace(s[i], cell=free[rng.integers(len(free))])
    return tuple(out)


def _change(attr: str, values: tuple[str, ...]):
    """An edit giving one random object another value of `attr` (colour or shape)."""
    def edit(s: Scene, rng: np.random.Generator) -> Scene | None:
        i = int(rng.integers(len(s)))
        others = [v for v in values if v != getattr(s[i], attr)]
        out = list(s)
        out[i] = dataclasses.replace(s[i], **{attr: others[rng.integers(len(others))]})
        return tuple(out)
    return edit


_recolour, _reshape = _change("colour", tuple(COLOUR_NAMES)), _change("shape", tuple(SHAPES))


# Binding edits first: they are what a bag of features cannot tell apart.
EDITS = (_swap_colours, _swap_places, _move, _recolour, _reshape)


def variants(scene: Scene, rng: np.random.Generator, k: int, allowed=lambda s: True) -> list[Scene]:
    """Up to k scenes that differ from `scene` by one edit each (tried in EDITS order, binding edits first),
    all distinct in content and each passing `allowed` (e.g. not showing a held-out combination)."""
    key = lambda s: sorted((o.shape, o.colour, o.cell) for o in s)  # noqa: E731 (size and offset do not count)
    seen = [key(scene)]
    out: list[Scene] = []
    for edit in EDITS * 2:  # a second round when some edits did not apply
        if len(out) == k:
            break
        v = edit(scene, rng)
        if v is not None and key(v) not in seen and allowed(v):
            seen.append(key(v))
            out.append(v)
    return out
