"""Requests -> engine work, checked against the model and the server's limits before they queue.
Shared by the HTTP API and the web UI, so both refuse the same things with the same words."""
from __future__ import annotations

import secrets
from collections.abc import Sequence

from ..pipelines.base import UnsupportedOption
from ..processing.chat import Message
from .engine import ChatSpec, Engine, ImageSpec
from .errors import APIError


def image_spec(engine: Engine, prompt: str, *, n: int = 1, seed: int | None = None, cfg_weight: float | None = None,
               temperature: float | None = None, steps: int | None = None, size: str | None = None) -> ImageSpec:
    """`temperature` is Janus's, `steps` JanusFlow's: a value for the other architecture's is refused."""
    pipe, c, limits = engine.pipe, engine.pipe.config, engine.limits
    if not prompt.strip():
        raise APIError(400, "prompt: empty", param="prompt")
    _check_chars(len(prompt), limits.max_prompt_chars, "prompt")
    if n > limits.max_n:
        raise APIError(400, f"n: {n} is over this server's limit of {limits.max_n}", param="n")
    side = pipe.image_size
    if size is not None and side is not None and size != f"{side}x{side}":
        raise APIError(400, f"size: this model makes {side}x{side} images only, got {size!r}", param="size")
    if side is None:
        raise APIError(400, "this JanusFlow model was loaded without a VAE, so it cannot make images "
                       "(start the server with --vae DIR)", code="no_vae")
    try:
        options = pipe.image_option_values(steps=steps, temperature=temperature)
    except UnsupportedOption as e:
        raise APIError(400, str(e), param=e.option) from None
    ids = pipe.processor.generation_prompt(prompt)
    need = len(ids) + pipe.image_positions
    if need > c.llm.max_seq_len:
        raise APIError(400, f"prompt: {len(ids)} tokens is too long; with the image it needs {need} positions and "
                       f"the model's context is {c.llm.max_seq_len}", param="prompt", code="context_length_exceeded")
    return ImageSpec(ids, n, secrets.randbelow(2**31) if seed is None else seed,
                     pipe.default_cfg_weight if cfg_weight is None else cfg_weight, options)


def chat_spec(engine: Engine, messages: Sequence[Message], system: str | None, *, max_tokens: int | None = None,
              temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
              max_tokens_field: str = "max_tokens") -> ChatSpec:
    pipe, limits = engine.pipe, engine.limits
    max_tokens = max_tokens or limits.max_tokens
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"{max_tokens_field}: {max_tokens} is over this server's limit of {limits.max_tokens}",
                       param=max_tokens_field)
    _check_chars(sum(len(m.content) for m in messages) + len(system or ""), limits.max_prompt_chars, "messages")
    try:
        encoded = pipe.processor.encode_chat(messages, system)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    ctx = pipe.config.llm.max_seq_len
    if len(encoded.ids) >= ctx:
        raise APIError(400, f"messages: the prompt is {len(encoded.ids)} tokens; the model's context is {ctx}",
                       param="messages", code="context_length_exceeded")
    return ChatSpec(encoded, max_tokens, temperature, top_p, secrets.randbelow(2**31) if seed is None else seed)


def _check_chars(n: int, limit: int, param: str) -> None:
    """Tokenising holds the GIL (megabytes take seconds and would stall every request), so text is
    measured in characters first."""
    if n > limit:
        raise APIError(400, f"{param}: {n} characters of text, over this server's limit of {limit}", param=param,
                       code="context_length_exceeded")
