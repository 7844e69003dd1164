"""Understanding: prefill the spliced prompt once, then decode one token per step from a static cache.

Left-padded rows get RoPE positions counted from their first real token (cumsum of the mask, as
transformers' generate does) and padding slots are masked out of attention. Rows that hit a stop
token keep running (batch shapes stay fixed) but emit nothing more.
"""
from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence

import torch

from ..models.janus import JanusModel
from ..models.llama import KVCache
from ..processing.chat import ChatBatch
from .compile import WarmupTimer, cache_length, check_compilable, compiled_step
from .logits import check_filters, check_temperature, sample


def generate_text(model: JanusModel, batch: ChatBatch, *, max_new_tokens: int, stop_ids: Sequence[int],
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  generators: Sequence[torch.Generator] | torch.Generator | None = None,
                  compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield (B,) new token ids per step; a finished row yields -1. Stops when every row is done.
    Bad arguments and a prompt that does not fit the context raise here, not at the first next().
    `compile`: run each decode step as one compiled graph (sampling.compile)."""
    c = model.config.llm
    T = batch.input_ids.shape[1]
    if T > c.max_seq_len:
        raise ValueError(f"prompt is {T} tokens, longer than the model context of {c.max_seq_len} tokens")
    if T == c.max_seq_len:
        raise ValueError(f"prompt is {T} tokens, which fills the model context of {c.max_seq_len} tokens "
                         "and leaves no room for an answer")
    try:
        n_new = operator.index(max_new_tokens)
    except TypeError:
        n_new = -1
    if isinstance(max_new_tokens, bool) or n_new < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_temperature(temperature)
    check_filters(top_k, top_p)
    if compile:
        check_compilable(model)
    return _decode(model, batch, min(n_new, c.max_seq_len - T), list(stop_ids), temperature, top_k, top_p,
                   generators, compile)


@torch.inference_mode()
def _decode(model: JanusModel, batch: ChatBatch, max_new_tokens: int, stop_ids: list[int], temperature: float,
            top_k: int | None, top_p: float | None,
            generators: Sequence[torch.Generator] | torch.Generator | None, compile: bool) -> Iterator[torch.Tensor]:
    llm, c = model.llm, model.config.llm
    B, T = batch.input_ids.shape
    if max_new_tokens == 0:
        return
    dtype = llm.embed_tokens.weight.dtype
    pixels = None if batch.pixel_values is None else batch.pixel_values.to(dtype)
    h = model.splice(batch.input_ids, batch.image_mask, pixels)

    cache = KVCache(c, B, cache_length(T + max_new_tokens, compile), dtype)
    valid = torch.ones(B, cache.max_len, dtype=torch.bool)
    valid[:, :T] = batch.valid
    key_valid = valid if batch.padded else None
    positions = (batch.valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)

    logits = model.text_logits(llm(h, positions, cache, 0, key_valid)[:, -1]).float()
    step_fn = compiled_step(_text_step) if compile else _text_step
    warmup = WarmupTimer("text decode", compile)
    pos = positions[:, -1:]
    for step in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, generators)
        tok = torch.where(done, -1, tok)
        yield tok
        done |= torch.isin(tok, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        pos = pos + 1
        logits = step_fn(model, tok, pos, cache, torch.tensor([T + step]) if compile else T + step, key_valid)
        warmup.first_step_done()


def _text_step(model: JanusModel, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache, slot: int | torch.Tensor,
               key_valid: torch.Tensor | None) -> torch.Tensor:
    """One decode step: the sampled tokens (a finished row's -1 feeds token 0; nothing reads it) through
    the LLM at `slot` -> the next token's text logits, float32."""
    e = model.llm.embed_tokens(tok.clamp(min=0))[:, None]
    return model.text_logits(model.llm(e, pos, cache, slot, key_valid)[:, -1]).float()


@torch.inference_mode()
def next_token_probs(model: JanusModel, batch: ChatBatch) -> torch.Tensor:
    """(B, vocab) float32 probabilities of the first answer token (one prefill, no sampling): what a
    judge reads, e.g. P("yes") after a yes/no question."""
    c = model.config.llm
    if batch.input_ids.shape[1] > c.max_seq_len:
        raise ValueError(f"prompt is {batch.input_ids.shape[1]} tokens, longer than the model context of "
                         f"{c.max_seq_len} tokens")
    dtype = model.llm.embed_tokens.weight.dtype
    pixels = None if batch.pixel_values is None else batch.pixel_values.to(dtype)
    h = model.splice(batch.input_ids, batch.image_mask, pixels)
    positions = (batch.valid.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.llm(h, positions, None, 0, batch.valid if batch.padded else None)[:, -1]
    return model.text_logits(hidden).float().softmax(-1)
