"""Compiled decode steps, the gpt-fast way: compile one step (embed, LLM, head, CFG) with static shapes,
not the loop. A step writes its KV slot at a tensor position and attends over the whole static cache
(llama.CacheBias), so every position runs the same graph: one compile per model and batch shape, no
recompiles as decoding advances. Sampling stays eager (it draws from per-row torch.Generators).

On CPU, inductor fuses the small ops between the matmuls (norms, RoPE, SiLU, softmax, CFG) and, with
`freezing`, prepacks the weights for oneDNN as pack_for_cpu does. The first call compiles (tens of
seconds on CPU); bench/bench_decode_paths.py reports it as the warm-up time.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger("januskit.sampling")

F = TypeVar("F", bound=Callable)
_compiled: dict[Callable, Callable] = {}


def compiled_step(fn: F) -> F:
    """`fn` compiled once per process (static shapes); torch.compile's own cache holds one graph per
    model and batch shape. Inductor's `freezing` (weights as constants, prepacked for oneDNN, with
    pointwise ops fused into the matmuls) is set around each call rather than globally, so it does not
    leak into training compiles; it only matters when a call compiles."""
    if fn not in _compiled:
        inner = torch.compile(fn, dynamic=False)

        def run(*args):
            with torch._inductor.config.patch(freezing=True):
                return inner(*args)

        _compiled[fn] = run
    return _compiled[fn]  # type: ignore[return-value]


def check_compilable(model: torch.nn.Module) -> None:
    """Weights prepacked by pack_for_cpu are opaque buffers inductor cannot freeze (it fails deep in its
    lowering); the compiled step prepacks the weights itself, so the two are alternatives."""
    if any(getattr(m, "packed_for_cpu", False) for m in model.modules()):
        raise ValueError("compile: this model was prepacked with pack_for_cpu (CLI --fast); the compiled step "
                         "prepacks its weights itself, so use one or the other")


def cache_length(n: int, compile: bool, step: int = 128) -> int:
    """A compiled step's graph depends on the cache length, so compiled decodes round it up to a multiple
    of `step`: prompts of similar length share one graph instead of compiling one each."""
    return -(-n // step) * step if compile else n


class WarmupTimer:
    """Logs how long the first call of a compiled step took (the compile) once per decode."""

    def __init__(self, what: str, enabled: bool) -> None:
        self.what, self.enabled, self.t0 = what, enabled, time.perf_counter()
        self.seconds: float | None = None

    def first_step_done(self) -> None:
        if self.enabled and self.seconds is None:
            self.seconds = time.perf_counter() - self.t0
            log.info("%s: first compiled step (compile or cache lookup) took %.1f s", self.what, self.seconds)
