"""What every trainer here shares about the optimiser: the LR schedule and AdamW's weight-decay groups.
The stage trainer (stages.py) and the component pretrainers (pretrain/) all call these, so a change
of convention happens in one place."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn


def lr_at(step: int, *, peak: float, warmup: int, horizon: int, floor: float = 0.0, cosine: bool = True,
          decay_from_step_start: bool = False) -> float:
    """LR of optimiser step `step`, counted from 1: linear warm-up peak * step / warmup over the
    first `warmup` steps, then `peak` (cosine=False) or a half cosine from peak down to peak * floor
    over the steps up to `horizon`. The decay's progress is taken at the end of the step (the
    pretrainers: the last step runs at the floor), or with `decay_from_step_start` at its start (the
    stage trainer: the first step after warm-up runs at the peak). The expressions are kept as they
    were in each trainer, so the LRs are the same to the last bit."""
    if step <= warmup:
        return peak * step / warmup
    if not cosine:
        return peak
    done = step - warmup - (1 if decay_from_step_start else 0)
    progress = min(1.0, done / max(1, horizon - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def decay_groups(module: nn.Module, weight_decay: float,
                 exempt: Callable[[str], bool] = lambda name: False) -> list[dict[str, Any]]:
    """AdamW parameter groups over `module`'s trainable parameters, each in module order: matrices
    and embeddings (ndim >= 2) with `weight_decay`, then norm scales, biases and whatever `exempt(name)`
    names without; an empty group is left out (no group at all when nothing trains)."""
    decay, rest = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not exempt(name) else rest).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
