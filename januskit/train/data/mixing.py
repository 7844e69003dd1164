"""Every optimizer step mixes the kinds by a fixed ratio und:text:gen[:edit] (Janus / Janus-Pro recipe;
the papers' ratios have three weights, which leave out edit samples).

Each step's global batch of `batch_size` samples gets, per kind, floor or ceil of its exact share
(so within 1 of proportional; exact when the ratio divides the batch, e.g. 5:1:4 with 10 -> 5,1,4).
Which kinds round up is decided by the running deficit (exact share so far minus what was given),
so over many steps the mix converges to the ratio instead of always favouring the same kind.
The step's kinds are then shuffled by (seed, step) and split into world_size equal contiguous
slices; rank r draws its slice from its own (rank-sharded) sources.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from .records import KINDS


def _fraction(w: float | int | str) -> Fraction:
    f = Fraction(str(w)) if isinstance(w, float) else Fraction(w)
    if f < 0:
        raise ValueError(f"ratio weights must be >= 0, got {w!r}")
    return f


def allocate(batch_size: int, weights: Sequence[Fraction], given: Sequence[int], step: int) -> list[int]:
    """Per-kind counts for step `step` (0-based) given the cumulative counts of the steps before it."""
    total = sum(weights)
    share = [batch_size * w / total for w in weights]  # exact per-step share
    out = [math.floor(x) for x in share]
    left = batch_size - sum(out)
    # round up where the running deficit after this step would be largest (ties: und, text, gen order)
    deficit = [(step + 1) * share[k] - given[k] - out[k] for k in range(len(weights))]
    for k in sorted((k for k in range(len(weights)) if share[k] != out[k]), key=lambda k: (-deficit[k], k))[:left]:
        out[k] += 1
    return out


def missing_source_message(kind: str, weights: Sequence[Fraction]) -> str:
    """The error for a ratio that weights `kind` with no source of it: both ways out, the ratio spelled
    with that weight zeroed (a stage row's ratio, e.g. Stage III's 5:1:4, is easy to inherit unnoticed)."""
    k = KINDS.index(kind)
    w = weights[k]
    zeroed = [0 if i == k else x for i, x in enumerate(weights)]
    names = " : ".join(KINDS[:len(weights)])
    msg = (f"ratio gives {kind!r} weight {_number(w)} but there is no {kind} source: add one ([data] {kind} = "
           f"\"path/to/{kind}.jsonl\")")
    if not any(zeroed):
        return msg + "; the ratio weights no other kind"
    return msg + f", or set [stage] ratio = [{', '.join(map(_number, zeroed))}] ({names}) to train without {kind}"


def _number(w: Fraction) -> str:
    """A ratio weight as TOML would spell it: 5, 0.5."""
    return str(w.numerator) if w.denominator == 1 else repr(float(w))


class Mixer:
    """Iterator of per-step sample lists for this rank. `sources`: kind -> iterator of samples (None for a
    kind with weight 0). `ratio`: und:text:gen[:edit] weights, e.g. (5, 1, 4), (5, 1, 2, 2) or
    {"generation": 3, "edit": 1, ...}.
    `batch_size` is the GLOBAL batch (all ranks), divisible by world_size."""

    def __init__(self, sources: Mapping[str, Iterator | None], ratio: Sequence[float] | Mapping[str, float],
                 batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if isinstance(ratio, Mapping):
            unknown = set(ratio) - set(KINDS)
            if unknown:
                raise ValueError(f"unknown kind(s) in ratio: {sorted(unknown)}; kinds are {', '.join(KINDS)}")
            ratio = [ratio.get(k, 0) for k in KINDS]
        given = len(ratio)  # 3 or 4 weights: an error's suggested ratio keeps the user's form
        if len(ratio) == len(KINDS) - 1:
            ratio = [*ratio, 0]  # a paper's und:text:gen: no edit samples
        if len(ratio) != len(KINDS):
            raise ValueError(f"ratio needs 3 or 4 weights (und:text:gen or und:text:gen:edit), got {list(ratio)}")
        self.weights = [_fraction(w) for w in ratio]
        if sum(self.weights) == 0:
            raise ValueError("ratio weights are all zero")
        unknown = set(sources) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown source kind(s) {sorted(unknown)}; kinds are {', '.join(KINDS)}")
        for k, w in zip(KINDS, self.weights):
            if w > 0 and sources.get(k) is None:
                raise ValueError(missing_source_message(k, self.weights[:given]))
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.sources = {k: s for k, s in sources.items() if s is not None}
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.step = 0
        self.given = [0] * len(KINDS)  # cumulative global counts per kind

    def plan(self) -> list[str]:
        """The global batch's kinds for the current step, shuffled (the same list on every rank)."""
        counts = allocate(self.batch_size, self.weights, self.given, self.step)
        kinds = [k for k, c in zip(KINDS, counts) for _ in range(c)]
        perm = np.random.default_rng([self.seed, self.step]).permutation(len(kinds))
        return [kinds[i] for i in perm]

    def __iter__(self) -> "Mixer":
        return self

    def __next__(self) -> list[Any]:
        plan = self.plan()
        per = self.batch_size // self.world_size
        mine = plan[self.rank * per:(self.rank + 1) * per]
        out = [next(self.sources[k]) for k in mine]
        self.given = [g + plan.count(k) for g, k in zip(self.given, KINDS)]
        self.step += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "given": list(self.given), "batch_size": self.batch_size,
                "ratio": [str(w) for w in self.weights], "world_size": self.world_size,
                "sources": {k: s.state_dict() for k, s in self.sources.items()}}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        old = len(KINDS) - len(st["given"])  # a checkpoint from before the edit kind: it drew none
        st = {**st, "given": [*st["given"], *[0] * old], "ratio": [*st["ratio"], *["0"] * old]}
        for k, now in (("batch_size", self.batch_size), ("ratio", [str(w) for w in self.weights]),
                       ("world_size", self.world_size)):
            if st[k] != now:
                raise ValueError(f"cannot resume the data mix: {k} was {st[k]!r} in the checkpoint, now {now!r}")
        if set(st["sources"]) != set(self.sources):
            raise ValueError(f"cannot resume the data mix: checkpoint has sources {sorted(st['sources'])}, "
                             f"now {sorted(self.sources)}")
        self.step, self.given = st["step"], list(st["given"])
        for k, s in self.sources.items():
            s.load_state_dict(st["sources"][k])

    def reshard(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """This rank's state among `world` ranks from the states of a run with len(states) ranks (train.checkpoints
        resumes at another number of ranks): the step and the counts are global; each source re-splits its
        position (`reshard` of its own; a source without one is refused by name)."""
        if len({(st["step"], tuple(st["given"])) for st in states}) != 1:
            raise ValueError("cannot re-split the data mix: the ranks' states are at different steps")
        out = {**states[0], "world_size": world}
        out["sources"] = {}
        for k, src in self.sources.items():
            src = getattr(src, "inner", src)  # a source in a worker process (workers.SourceProcess): its own
            if not hasattr(src, "reshard"):
                raise ValueError(f"cannot re-split the data mix: its {k} source ({type(src).__name__}) has no "
                                 f"reshard; resume with {len(states)} processes")
            out["sources"][k] = src.reshard([st["sources"][k] for st in states], rank, world)
        return out
