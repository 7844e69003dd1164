"""Turning logits into tokens: temperature, top-k, top-p, and sampling with per-row generators.

Sampling draws Exp(1) noise per row from that row's own generator and takes argmax(p / noise), which
is distributed exactly as multinomial(p). Giving each row (each image, each request) its own generator
makes a row's result independent of what else is in the batch.
"""
from __future__ import annotations

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


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generators: Sequence[torch.Generator | None] | torch.Generator | None = None) -> torch.Tensor:
    """(R, V) logits -> (R,) token ids. temperature == 0 means argmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
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

    state = np.random.SeedSequence(entropy=seed, spawn_key=(index,)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))
