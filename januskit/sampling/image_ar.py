"""Janus text-to-image: 576 autoregressive VQ tokens with classifier-free guidance.

Rows: one conditional and one unconditional row per image, side by side in one batch (all
conditional rows first). An unconditional row is the prompt with every id but the first (BOS) and the
last (<begin_of_image>) replaced by pad, attended without a mask, as the reference does. Each step:
gen_head on the last hidden state, logits = uncond + w * (cond - uncond), sample, feed the token's
gen embedding to both rows. Prompts of different lengths are left-padded and masked.

Image-to-image (`edit`): the prompts are edit prompts (Processor.edit_prompt) whose source-image slots
take understanding features; three rows per image (full, image-only, unconditional: processing.edit)
guided as u + s_img * (img - u) + s_txt * (full - img). `prefix`: the first tokens of each image are
given rather than sampled (variations: the source image's top rows), still fed through the LLM.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..models.janus import JanusModel
from ..models.llama import KVCache
from ..processing.edit import ROWS, EditInputs, dropped_positions, guide
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


def edit_rows(prompts: Sequence[Sequence[int]], pad_id: int, e: EditInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(3n, L) ids [full; image-only; unconditional] left-padded (dropped positions -> pad), and the (3n, L)
    validity mask or None."""
    rows = []
    for keep_text, keep_image in ROWS.values():
        for p in prompts:
            drop = dropped_positions(p, image_id=e.image_id, boi_id=e.boi_id, eoi_id=e.eoi_id, keep_text=keep_text,
                                     keep_image=keep_image)
            rows.append(torch.where(drop, pad_id, torch.as_tensor(list(p), dtype=torch.long)))
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], valid[i, L - len(r):] = r, True
    return ids, (None if bool(valid.all()) else valid)


def edit_embeds(model: torch.nn.Module, ids: torch.Tensor, e: EditInputs, groups: int = 2) -> torch.Tensor:
    """Input embeddings of edit rows [full; image-only; unconditional]: the sources' understanding features
    (or, via "vq", their VQ tokens' generation embeddings) at the image slots of the first `groups` groups
    (2 of the three rows; 1 for the full rows alone). Each distinct source tensor is encoded once (the n
    images of one edit share theirs), however many rows use it."""
    dtype = model.text_embeds(ids[:1, :1]).dtype
    distinct: dict[int, torch.Tensor] = {}
    for src in e.sources:
        if id(src) not in distinct:
            distinct[id(src)] = (model.gen_embeds(source_vq_ids(model, src)) if e.via == "vq"
                                 else model.image_embeds(src.to(dtype)))
    feats = torch.cat([distinct[id(src)] for src in e.sources])
    return model.splice(ids, ids == e.image_id, None, features=torch.cat([feats] * groups))


def source_vq_ids(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(k, 3, S, S) generation pixels in [-1, 1] -> (k, n_tokens) VQ ids (the frozen tokenizer)."""
    w = model.gen_vision_model.quant_conv.weight
    return model.gen_vision_model.encode(pixels.to(w.device, w.dtype))


@torch.inference_mode()
def generate_image_tokens(model: JanusModel, prompts: Sequence[Sequence[int]], *, pad_id: int,
                          cfg_weight: float | Sequence[float],
                          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                          generators: Sequence[torch.Generator] | None = None,
                          progress: Callable[[int, int], None] | None = None, compile: bool = False,
                          edit: EditInputs | None = None, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """One image per prompt (repeat a prompt for several images) -> (n, n_tokens) VQ ids.
    `cfg_weight`: one weight for all rows, or one per prompt (a server batches requests that differ);
    with `edit`, the text weight s_txt. `compile`: run each decode step as one compiled graph
    (sampling.compile); same tokens, in float32. `edit`: the prompts are edit prompts (see the module
    docstring). `prefix` (n, m): image i's first m tokens, given instead of sampled."""
    llm, c = model.llm, model.config
    n, n_tokens = len(prompts), c.vq.n_tokens
    if n == 0:
        raise ValueError("generate_image_tokens needs at least one prompt")
    check_temperature(temperature)
    check_filters(top_k, top_p)
    w = cfg_weights(cfg_weight, n)
    w_img = None if edit is None else cfg_weights(edit.cfg_image, n)
    if prefix is not None:
        prefix = torch.as_tensor(prefix, dtype=torch.long)
        if prefix.ndim != 2 or prefix.shape[0] != n or prefix.shape[1] > n_tokens:
            raise ValueError(f"prefix: expected shape ({n}, m) with m <= {n_tokens}, got {tuple(prefix.shape)}")
        if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= c.vq.codebook_size):
            raise ValueError(f"prefix: VQ ids must be in [0, {c.vq.codebook_size})")
    if compile:
        check_compilable(model)
    ids, valid = cfg_rows(prompts, pad_id) if edit is None else edit_rows(prompts, pad_id, edit)
    G = ids.shape[0] // n  # rows per image: 2, or 3 for an edit
    L = ids.shape[1]
    if L + n_tokens > c.llm.max_seq_len:
        raise ValueError(f"prompt is {L} tokens; with {n_tokens} image tokens that exceeds the model context "
                         f"of {c.llm.max_seq_len} tokens")
    dtype = llm.embed_tokens.weight.dtype
    cache = KVCache(c.llm, G * n, cache_length(L + n_tokens, compile), dtype)
    key_valid = None
    if valid is not None:
        key_valid = torch.ones(G * n, cache.max_len, dtype=torch.bool)
        key_valid[:, :L] = valid
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(L).expand(G * n, L)
    out = torch.empty(n, n_tokens, dtype=torch.long)

    embeds = llm.embed_tokens(ids) if edit is None else edit_embeds(model, ids, edit)
    hidden = llm(embeds, positions, cache, 0, key_valid)[:, -1]
    guided = _guide(model, hidden, w, n, w_img)
    step = compiled_step(_image_step) if compile else _image_step
    warmup = WarmupTimer("image decode", compile)
    pos = positions[:, -1:]
    m = 0 if prefix is None else prefix.shape[1]
    for i in range(n_tokens):
        tok = prefix[:, i].clone() if i < m else sample(guided, temperature, top_k, top_p, generators)
        out[:, i] = tok
        if progress is not None:
            progress(i + 1, n_tokens)
        if i == n_tokens - 1:
            break
        pos = pos + 1
        slot = torch.tensor([L + i]) if compile else L + i
        guided = step(model, tok, pos, cache, slot, key_valid, w, w_img)
        warmup.first_step_done()
    return out


def _guide(model: JanusModel, hidden: torch.Tensor, w: torch.Tensor, n: int,
           w_img: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states of the [cond; uncond] rows (or an edit's [full; image-only; uncond]) ->
    (n, codebook) guided logits, float32."""
    logits = model.image_logits(hidden).float()
    if w_img is not None:
        return guide(logits[:n], logits[n:2 * n], logits[2 * n:], w, w_img)
    cond, uncond = logits[:n], logits[n:]
    return uncond + w * (cond - uncond)


def _image_step(model: JanusModel, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                slot: int | torch.Tensor, key_valid: torch.Tensor | None, w: torch.Tensor,
                w_img: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step: the sampled tokens' gen embeddings (the same token to every guidance row of an
    image) through the LLM at `slot`, then the guided logits of the next token."""
    rows = 2 if w_img is None else 3
    e = model.gen_embeds(torch.cat([tok] * rows))[:, None]
    return _guide(model, model.llm(e, pos, cache, slot, key_valid)[:, -1], w, tok.shape[0], w_img)


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


def rows_per_chunk(model: JanusModel, prompt_len: int, budget_bytes: int, rows: int = 2) -> int:
    """How many images fit a memory budget: their KV cache plus per-step activations (`rows` guidance
    rows each: 2, or 3 for an edit)."""
    c = model.config
    dtype = model.llm.embed_tokens.weight.dtype
    per_image = KVCache.nbytes(c.llm, rows, prompt_len + c.vq.n_tokens, dtype)
    per_image += rows * prompt_len * (4 * c.llm.dim + 2 * c.llm.intermediate_size) * 4  # prefill activations
    per_image += rows * c.gen_head.image_token_size * 4 * 3  # logits, probabilities, noise
    return max(1, budget_bytes // per_image)
