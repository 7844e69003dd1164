"""JanusFlow text-to-image: Euler integration of the rectified-flow ODE with CFG on the velocity.

Rows: one conditional and one unconditional row per image, all conditional rows first (the
reference's layout). The prompt is the generation prompt without its last token (<begin_of_image>:
the timestep token takes that slot). In an unconditional row every prompt slot but BOS is masked
out of attention. Each step, for t = s / steps:
    inputs = [prompt, t_emb, grid tokens of z_t]  ->  LLM  ->  v at the grid positions
    v = w * v_cond - (w - 1) * v_uncond;  z += v / steps
The prompt's keys and values do not depend on z or t, so they are computed once and every step
feeds only the 1 + n_gen new positions (`reuse_prompt_kv=True`, positions continuing after the
prompt); the generation encoder also runs once per image, not once per CFG row.
`reuse_prompt_kv=False` recomputes the whole sequence at every step, as the reference does.

Image-to-image (`edit`): edit prompts (Processor.edit_prompt) with the sources' understanding features
in their slots, three rows per image (full, image-only, unconditional: processing.edit; dropped positions
hidden from attention), v = u + s_img * (v_img - u) + s_txt * (v_full - v_img). `start`: img2img, the
ODE begins at step `start` from latents the caller noised to t = start / steps.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..models.janusflow import JanusFlowModel
from ..models.llama import KVCache
from ..processing.edit import ROWS, EditInputs, dropped_positions, guide
from .image_ar import cfg_weights, edit_embeds


def flow_rows(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts (each ending with <begin_of_image>, which is dropped) -> left-padded ids (2n, L), the
    key-validity mask (2n, L) (padding and the masked unconditional slots False) and the RoPE
    positions (2n, L), counted from each row's first real token (unconditional rows keep the
    conditional row's positions: the reference masks those slots, it does not remove them)."""
    n = len(prompts)
    if any(len(p) < 2 for p in prompts):
        raise ValueError("a generation prompt needs at least BOS and <begin_of_image>")
    L = max(len(p) for p in prompts) - 1
    ids = torch.zeros(2 * n, L, dtype=torch.long)
    valid = torch.zeros(2 * n, L, dtype=torch.bool)
    real = torch.zeros(2 * n, L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        row = torch.tensor(list(p)[:-1])
        for r in (i, n + i):
            ids[r, L - len(row):] = row
            real[r, L - len(row):] = True
        valid[i, L - len(row):] = True
        valid[n + i, L - len(row)] = True  # the unconditional row keeps only BOS visible
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return ids, valid, positions


def edit_flow_rows(prompts: Sequence[Sequence[int]], pad_id: int,
                   e: EditInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flow_rows for edit prompts: (3n, L) ids [full; image-only; unconditional], the key-validity mask
    (dropped positions hidden, as flow_rows hides an unconditional row's prompt) and RoPE positions. A
    dropped image's slots become pad, so that only the kept rows take the sources' features."""
    n = len(prompts)
    if any(len(p) < 2 for p in prompts):
        raise ValueError("a generation prompt needs at least BOS and <begin_of_image>")
    L = max(len(p) for p in prompts) - 1
    ids = torch.full((3 * n, L), pad_id, dtype=torch.long)
    valid = torch.zeros(3 * n, L, dtype=torch.bool)
    real = torch.zeros(3 * n, L, dtype=torch.bool)
    for g, (keep_text, keep_image) in enumerate(ROWS.values()):
        for i, p in enumerate(prompts):
            drop = dropped_positions(p, image_id=e.image_id, boi_id=e.boi_id, eoi_id=e.eoi_id, keep_text=keep_text,
                                     keep_image=keep_image)[:-1]
            row = torch.as_tensor(list(p)[:-1], dtype=torch.long)
            if not keep_image:
                row = torch.where(row == e.image_id, pad_id, row)
            r, k = g * n + i, L - len(row)
            ids[r, k:], valid[r, k:], real[r, k:] = row, ~drop, True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return ids, valid, positions


def check_flow_args(steps: int, cfg_weight: float | Sequence[float], n: int = 1) -> torch.Tensor:
    """Raise on bad arguments; return the CFG weight(s) as the update broadcasts them."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return cfg_weights(cfg_weight, n)[:, :, None, None]  # (n, 1, 1, 1) against (n, C, H, W)


# One integration step: (z (n, C, H, W) float32, guided velocity v, step index s, steps) -> next z.
Update = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def euler(z: torch.Tensor, v: torch.Tensor, s: int, steps: int) -> torch.Tensor:
    return z + (1.0 / steps) * v


@torch.inference_mode()
def generate_latents(model: JanusFlowModel, prompts: Sequence[Sequence[int]], latents: torch.Tensor, *,
                     steps: int, cfg_weight: float | Sequence[float], reuse_prompt_kv: bool = True,
                     progress: Callable[[int, int], None] | None = None, update: Update = euler,
                     edit: EditInputs | None = None, pad_id: int = 0, start: int = 0) -> torch.Tensor:
    """One image per prompt from initial noise `latents` (n, C, H, W) -> final latents (n, C, H, W),
    float32 (the ODE state is kept in float32 whatever the model dtype). `cfg_weight`: one weight, or
    one per prompt (with `edit`: the text weight s_txt). `update`: the integrator's step (Euler; RL's SDE
    sampler passes its own). `edit` and `start`: see the module docstring."""
    c = model.config
    n = len(prompts)
    if n == 0:
        raise ValueError("generate_latents needs at least one prompt")
    w = check_flow_args(steps, cfg_weight, n)
    w_img = None if edit is None else cfg_weights(edit.cfg_image, n)[:, :, None, None]
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < steps:
        raise ValueError(f"start must be an integer step in [0, {steps}), got {start!r}")
    if tuple(latents.shape) != (n, *c.latent_shape):
        raise ValueError(f"latents: expected shape ({n}, {', '.join(map(str, c.latent_shape))}), "
                         f"got {tuple(latents.shape)}")
    ids, valid, positions = flow_rows(prompts) if edit is None else edit_flow_rows(prompts, pad_id, edit)
    R = ids.shape[0] // n  # rows per image: 2, or 3 for an edit
    L, G = ids.shape[1], 1 + c.n_gen_tokens
    if L + G > c.llm.max_seq_len:
        raise ValueError(f"prompt is {L} tokens; with {G} generation positions that exceeds the model context "
                         f"of {c.llm.max_seq_len} tokens")
    llm = model.llm
    dtype = llm.embed_tokens.weight.dtype
    prompt_h = llm.embed_tokens(ids) if edit is None else edit_embeds(model, ids, edit)
    key_valid = torch.cat([valid, torch.ones(R * n, G, dtype=torch.bool)], dim=1)
    gen_pos = positions[:, -1:] + 1 + torch.arange(G)  # (Rn, G)
    cache = None
    if reuse_prompt_kv:
        cache = KVCache(c.llm, R * n, L + G, dtype)
        llm(prompt_h, positions, cache, 0, key_valid[:, :L])

    z = latents.float().clone()
    for s in range(start, steps):
        t = torch.full((R * n,), s / steps)
        if reuse_prompt_kv:
            # The guidance rows of an image share z and t: run the encoder once and feed it to each.
            x, skip, t_emb = (torch.cat([a] * R) for a in model.gen_inputs(z, t[:n]))
            v = model.velocity(llm(x, gen_pos, cache, L, key_valid)[:, 1:], skip, t_emb).float()
        else:
            v = row_velocities(model, prompt_h, positions, valid, torch.cat([z] * R), t)
        if edit is None:
            v = w * v[:n] - (w - 1) * v[n:]
        else:
            v = guide(v[:n], v[n:2 * n], v[2 * n:], w, w_img)
        z = update(z, v, s, steps)
        if progress is not None:
            progress(s + 1 - start, steps - start)
    return z


def row_velocities(model: JanusFlowModel, prompt_h: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                   z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The reference's per-step computation, the whole sequence at once: prompt embeddings (R, L, dim)
    with their positions and key validity (flow_rows), latents z (R, C, H, W) at times t (R,) ->
    velocities (R, C, H, W), float32."""
    R, L = valid.shape
    x, skip, t_emb = model.gen_inputs(z, t)
    G = x.shape[1]
    pos = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(G)], dim=1)
    key_valid = torch.cat([valid, torch.ones(R, G, dtype=torch.bool)], dim=1)
    hidden = model.llm(torch.cat([prompt_h, x.to(prompt_h.dtype)], dim=1), pos, None, 0, key_valid)
    return model.velocity(hidden[:, L + 1:], skip, t_emb).float()


def initial_latents(shape: tuple[int, ...], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard-normal noise (len(generators), *shape), row i from generator i alone."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])
