"""Requests -> engine work, checked against the model and the server's limits before they queue.
Shared by the HTTP API and the web UI, so both refuse the same things with the same words."""
from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..pipelines.base import Pipeline, UnsupportedOption, check_strength
from ..processing.chat import Message
from ..processing.edit import DEFAULT_CFG_IMAGE
from .engine import ChatSpec, Engine, ImageSpec, ImageToImageSpec
from .errors import APIError
from .media import decode_image_bytes


def image_spec(engine: Engine, prompt: str, *, n: int = 1, seed: int | None = None, cfg_weight: float | None = None,
               temperature: float | None = None, steps: int | None = None, size: str | None = None) -> ImageSpec:
    """`temperature` is Janus's, `steps` JanusFlow's: a value for the other architecture's is refused."""
    pipe = engine.pipe
    options = _image_request(engine, prompt, n=n, temperature=temperature, steps=steps, size=size)
    ids = pipe.processor.generation_prompt(prompt)
    _check_context(pipe, ids)
    return ImageSpec(ids, n, _seed(seed), pipe.default_cfg_weight if cfg_weight is None else cfg_weight, options)


class Source(NamedTuple):
    """An uploaded source image: the name refusals give it (its field), its bytes, its declared MIME type."""
    param: str
    data: bytes
    declared: str | None = None


def check_sources(engine: Engine, count: int, strength: float | None = None) -> None:
    """How many source images an edit may have; checked before they are read."""
    limit = engine.limits.max_images_per_request
    if count == 0:
        raise APIError(400, "image: no source image; give the image(s) to edit", param="image")
    if strength is not None and count > 1:
        raise APIError(400, f"image: image-to-image (strength) takes one source image, got {count}", param="image")
    if count > limit:
        raise APIError(400, f"image: {count} source images, over this server's limit of {limit}", param="image")


def edit_spec(engine: Engine, prompt: str, sources: Sequence[Source], *, n: int = 1, seed: int | None = None,
              cfg_weight: float | None = None, cfg_image: float | None = None, strength: float | None = None,
              temperature: float | None = None, steps: int | None = None,
              size: str | None = None) -> ImageSpec | ImageToImageSpec:
    """`pipe.edit_image(prompt, images, ...)`'s work: an edit by instruction of the `sources`, `cfg_weight`
    on the text and `cfg_image` on the sources. With `strength`: `pipe.image_to_image`'s, training-free, of
    the one image (no image guidance there: strength alone says how much is kept). The sources are decoded
    here, so that a bad one is refused by name now, not when its batch runs."""
    pipe = engine.pipe
    check_sources(engine, len(sources), strength)
    options = _image_request(engine, prompt, n=n, temperature=temperature, steps=steps, size=size)
    for s in sources:
        decode_image_bytes(s.data, s.param, engine.limits.max_image_pixels, s.declared)
    images = [s.data for s in sources]
    cfg_weight = pipe.default_cfg_weight if cfg_weight is None else cfg_weight
    if strength is None:
        try:
            ids = pipe.processor.edit_prompt(prompt, len(images))
        except ValueError as e:
            raise APIError(400, f"prompt: {e}", param="prompt") from None
        _check_context(pipe, ids, f" (with {len(images)} source image(s))")
        return ImageSpec(ids, n, _seed(seed), cfg_weight, options, sources=images,
                         cfg_image=DEFAULT_CFG_IMAGE if cfg_image is None else cfg_image)
    try:
        strength = check_strength(strength)
    except ValueError as e:
        raise APIError(400, str(e), param="strength") from None
    if cfg_image is not None:
        raise APIError(400, "cfg_image: image guidance is for edits by instruction; image-to-image (strength) "
                       "keeps the source by strength alone", param="cfg_image")
    _check_context(pipe, pipe.processor.generation_prompt(prompt))
    # image_to_image fills the defaults itself (JanusFlow's img2img sets its own start latents)
    return ImageToImageSpec(prompt, images[0], strength, n, _seed(seed), cfg_weight,
                            pipe.own_options(temperature=temperature, steps=steps))


def _image_request(engine: Engine, prompt: str, *, n: int, temperature: float | None, steps: int | None,
                   size: str | None) -> dict[str, Any]:
    """The checks every image request shares (prompt, n, size, a decoder); the architecture's options."""
    pipe, limits = engine.pipe, engine.limits
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
        return pipe.image_option_values(steps=steps, temperature=temperature)
    except UnsupportedOption as e:
        raise APIError(400, str(e), param=e.option) from None


def _check_context(pipe: Pipeline, ids: Sequence[int], sources: str = "") -> None:
    need, ctx = len(ids) + pipe.image_positions, pipe.config.llm.max_seq_len
    if need > ctx:
        raise APIError(400, f"prompt: {len(ids)} tokens{sources} is too long; with the image it needs {need} "
                       f"positions and the model's context is {ctx}", param="prompt", code="context_length_exceeded")


def _seed(seed: int | None) -> int:
    return secrets.randbelow(2**31) if seed is None else seed


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
    return ChatSpec(encoded, max_tokens, temperature, top_p, _seed(seed))


def _check_chars(n: int, limit: int, param: str) -> None:
    """Tokenising holds the GIL (megabytes take seconds and would stall every request), so text is
    measured in characters first."""
    if n > limit:
        raise APIError(400, f"{param}: {n} characters of text, over this server's limit of {limit}", param=param,
                       code="context_length_exceeded")
