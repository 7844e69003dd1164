"""Requests -> engine work, checked against the model and the server's limits before they queue.
Shared by the HTTP API and the web UI, so both refuse the same things with the same words."""
from __future__ import annotations

import secrets
from collections.abc import Sequence

from ..processing.chat import Message
from .engine import ChatSpec, Engine, ImageSpec
from .errors import APIError


def image_side(engine: Engine) -> int | None:
    """The side of the images this model makes (None: a JanusFlow model without its VAE)."""
    pipe, c = engine.pipe, engine.pipe.config
    if engine.flow:
        return c.latent_size * pipe.vae.factor if pipe.vae is not None else None
    return c.vq.image_size


def image_spec(engine: Engine, prompt: str, *, n: int = 1, seed: int | None = None, guidance: float | None = None,
               temperature: float | None = None, steps: int | None = None, size: str | None = None) -> ImageSpec:
    pipe, c, limits = engine.pipe, engine.pipe.config, engine.limits
    if not prompt.strip():
        raise APIError(400, "prompt: empty", param="prompt")
    if n > limits.max_n:
        raise APIError(400, f"n: {n} is over this server's limit of {limits.max_n}", param="n")
    side = image_side(engine)
    if size is not None and side is not None and size != f"{side}x{side}":
        raise APIError(400, f"size: this model makes {side}x{side} images only, got {size!r}", param="size")
    if engine.flow and pipe.vae is None:
        raise APIError(400, "this JanusFlow model was loaded without a VAE, so it cannot make images "
                       "(start the server with --vae DIR)", code="no_vae")
    if steps is not None and not engine.flow:
        raise APIError(400, f"steps: only JanusFlow (rectified flow) takes steps; this model is {pipe.arch}",
                       param="steps")
    if temperature is not None and engine.flow:
        raise APIError(400, "temperature: JanusFlow samples no tokens for images; use steps and guidance",
                       param="temperature")
    ids = pipe.processor.generation_prompt(prompt)
    need = len(ids) + (1 + c.n_gen_tokens if engine.flow else c.vq.n_tokens)
    if need > c.llm.max_seq_len:
        raise APIError(400, f"prompt: {len(ids)} tokens is too long; with the image it needs {need} positions and "
                       f"the model's context is {c.llm.max_seq_len}", param="prompt", code="context_length_exceeded")
    return ImageSpec(ids, n, secrets.randbelow(2**31) if seed is None else seed,
                     pipe.default_cfg if guidance is None else guidance,
                     1.0 if temperature is None else temperature, 30 if steps is None else steps)


def chat_spec(engine: Engine, messages: Sequence[Message], system: str | None, *, max_tokens: int | None = None,
              temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
              max_tokens_field: str = "max_tokens") -> ChatSpec:
    pipe, limits = engine.pipe, engine.limits
    max_tokens = max_tokens or limits.max_tokens
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"{max_tokens_field}: {max_tokens} is over this server's limit of {limits.max_tokens}",
                       param=max_tokens_field)
    try:
        encoded = pipe.processor.encode_chat(messages, system)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    ctx = pipe.config.llm.max_seq_len
    if len(encoded.ids) >= ctx:
        raise APIError(400, f"messages: the prompt is {len(encoded.ids)} tokens; the model's context is {ctx}",
                       param="messages", code="context_length_exceeded")
    return ChatSpec(encoded, max_tokens, temperature, top_p, secrets.randbelow(2**31) if seed is None else seed)
