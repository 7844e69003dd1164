"""Turning logits into tokens: temperature, top-k, top-p, and sampling with per-row generators.

Sampling draws Exp(1) noise per row from that row's own generator and takes argmax(p / noise), which
is distributed exactly as multinomial(p). Giving each row (each image, each request) its own generator
makes a row's result independent of what else is in the batch.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(R, V) logits with everything outside the top-k / nucleus set to -inf (at least one token kept)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def _as_int(v) -> int | None:
    """v as an int if it is integer-typed (int, numpy integer, ...), else None."""
    try:
        return operator.index(v)
    except TypeError:
        return None


def check_temperature(temperature: float) -> None:
    """Raise unless temperature is a finite number >= 0 (0 = greedy)."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")


def check_filters(top_k: int | None, top_p: float | None) -> None:
    """Raise unless top_k is None or an int >= 0 and top_p is None or in [0, 1] (0, 1 and None = off)."""
    if top_k is not None and (isinstance(top_k, bool) or _as_int(top_k) is None or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None:
        try:
            ok = 0.0 <= float(top_p) <= 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"top_p must be None or a number in [0, 1] (0 or 1 = off), got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generators: Sequence[torch.Generator | None] | torch.Generator | None = None) -> torch.Tensor:
    """(R, V) logits -> (R,) token ids. temperature == 0 means argmax."""
    check_temperature(temperature)
    check_filters(top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    noise = torch.empty_like(probs)
    if generators is None or isinstance(generators, torch.Generator):
        noise.exponential_(generator=generators)
    else:
        if len(generators) != probs.shape[0]:
            raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
        for row, g in zip(noise, generators):
            row.exponential_(generator=g)
    # A zero draw would turn a zero-probability token into 0/0; exponential_ avoids 0, clamp anyway.
    return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)


def row_generator(seed: int, index: int) -> torch.Generator:
    """Generator for item `index` of a request seeded `seed`: independent of batch size and chunking."""
    import numpy as np

    for what, v in (("seed", seed), ("index", index)):
        if isinstance(v, bool) or _as_int(v) is None or v < 0:
            raise ValueError(f"{what} must be a non-negative integer, got {v!r}")
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index),)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))
