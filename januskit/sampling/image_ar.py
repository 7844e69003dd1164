"""Janus text-to-image: 576 autoregressive VQ tokens with classifier-free guidance.

Rows: one conditional and one unconditional row per image, side by side in one batch (all
conditional rows first). An unconditional row is the prompt with every id but the first (BOS) and the
last (<begin_of_image>) replaced by pad, attended without a mask, as the reference does. Each step:
gen_head on the last hidden state, logits = uncond + w * (cond - uncond), sample, feed the token's
gen embedding to both rows. Prompts of different lengths are left-padded and masked.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..models.janus import JanusModel
from ..models.llama import KVCache
from .compile import WarmupTimer, cache_length, check_compilable, compiled_step
from .logits import check_filters, check_temperature, sample


def cfg_rows(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(2n, L) ids [cond rows; uncond rows] left-padded, and the (2n, L) validity mask or None."""
    L = max(len(p) for p in prompts)
    n = len(prompts)
    ids = torch.full((2 * n, L), pad_id, dtype=torch.long)
    valid = torch.zeros((2 * n, L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p) < 2:
            raise ValueError("a generation prompt needs at least BOS and <begin_of_image>")
        row = torch.tensor(list(p))
        uncond = torch.full_like(row, pad_id)
        uncond[0], uncond[-1] = row[0], row[-1]
        ids[i, L - len(p):], ids[n + i, L - len(p):] = row, uncond
        valid[i, L - len(p):] = valid[n + i, L - len(p):] = True
    return ids, (None if bool(valid.all()) else valid)


@torch.inference_mode()
def generate_image_tokens(model: JanusModel, prompts: Sequence[Sequence[int]], *, pad_id: int,
                          cfg_weight: float | Sequence[float],
                          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                          generators: Sequence[torch.Generator] | None = None,
                          progress: Callable[[int, int], None] | None = None, compile: bool = False) -> torch.Tensor:
    """One image per prompt (repeat a prompt for several images) -> (n, n_tokens) VQ ids.
    `cfg_weight`: one weight for all rows, or one per prompt (a server batches requests that differ).
    `compile`: run each decode step as one compiled graph (sampling.compile); same tokens, in float32."""
    llm, c = model.llm, model.config
    n, n_tokens = len(prompts), c.vq.n_tokens
    if n == 0:
        raise ValueError("generate_image_tokens needs at least one prompt")
    check_temperature(temperature)
    check_filters(top_k, top_p)
    w = cfg_weights(cfg_weight, n)
    if compile:
        check_compilable(model)
    ids, valid = cfg_rows(prompts, pad_id)
    L = ids.shape[1]
    if L + n_tokens > c.llm.max_seq_len:
        raise ValueError(f"prompt is {L} tokens; with {n_tokens} image tokens that exceeds the model context "
                         f"of {c.llm.max_seq_len} tokens")
    dtype = llm.embed_tokens.weight.dtype
    cache = KVCache(c.llm, 2 * n, cache_length(L + n_tokens, compile), dtype)
    key_valid = None
    if valid is not None:
        key_valid = torch.ones(2 * n, cache.max_len, dtype=torch.bool)
        key_valid[:, :L] = valid
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(L).expand(2 * n, L)
    out = torch.empty(n, n_tokens, dtype=torch.long)

    hidden = llm(llm.embed_tokens(ids), positions, cache, 0, key_valid)[:, -1]
    guided = _guide(model, hidden, w, n)
    step = compiled_step(_image_step) if compile else _image_step
    warmup = WarmupTimer("image decode", compile)
    pos = positions[:, -1:]
    for i in range(n_tokens):
        tok = sample(guided, temperature, top_k, top_p, generators)
        out[:, i] = tok
        if progress is not None:
            progress(i + 1, n_tokens)
        if i == n_tokens - 1:
            break
        pos = pos + 1
        slot = torch.tensor([L + i]) if compile else L + i
        guided = step(model, tok, pos, cache, slot, key_valid, w)
        warmup.first_step_done()
    return out


def _guide(model: JanusModel, hidden: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    """Last hidden states of the [cond; uncond] rows -> (n, codebook) CFG logits, float32."""
    logits = model.image_logits(hidden).float()
    cond, uncond = logits[:n], logits[n:]
    return uncond + w * (cond - uncond)


def _image_step(model: JanusModel, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                slot: int | torch.Tensor, key_valid: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """One decode step: the sampled tokens' gen embeddings (same token to the cond and uncond row)
    through the LLM at `slot`, then the CFG logits of the next token."""
    e = model.gen_embeds(torch.cat([tok, tok]))[:, None]
    return _guide(model, model.llm(e, pos, cache, slot, key_valid)[:, -1], w, tok.shape[0])


def cfg_weights(cfg_weight: float | Sequence[float], n: int) -> torch.Tensor:
    """One weight or n per-row weights -> an (n, 1) float32 column (finite values only). A scalar
    takes the same tensor path as a list, so one request gives the same bits alone or batched."""
    try:
        w = torch.as_tensor(cfg_weight, dtype=torch.float32).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"cfg_weight must be a finite number (or one per prompt), got {cfg_weight!r}") from None
    if w.numel() == 1:
        w = w.expand(n)
    if w.numel() != n:
        raise ValueError(f"cfg_weight: {w.numel()} weights for {n} prompts")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"cfg_weight must be a finite number (or one per prompt), got {cfg_weight!r}")
    return w[:, None].clone()


def rows_per_chunk(model: JanusModel, prompt_len: int, budget_bytes: int) -> int:
    """How many images fit a memory budget: their KV cache plus per-step activations (both CFG rows)."""
    c = model.config
    dtype = model.llm.embed_tokens.weight.dtype
    per_image = KVCache.nbytes(c.llm, 2, prompt_len + c.vq.n_tokens, dtype)
    per_image += 2 * prompt_len * (4 * c.llm.dim + 2 * c.llm.intermediate_size) * 4  # prefill activations
    per_image += 2 * c.gen_head.image_token_size * 4 * 3  # logits, probabilities, noise
    return max(1, budget_bytes // per_image)
