"""Speculative Jacobi decoding (SJD) of Janus image tokens: several VQ tokens per LLM forward, and the
same distribution as ordinary sampling. Training-free: the drafts come from the model itself.

SJD (Teng et al., arXiv 2410.01699). Each image keeps its accepted tokens x_0..x_{a-1} and drafts
d_a..d_{a+W-2}, each drawn from a recorded proposal q_j. One forward of [x_{a-1}, d_a, .., d_{a+W-2}]
(both CFG rows) gives the CFG-combined, temperature / top-k / top-p distribution p_j at the W positions
a..a+W-1. Left to right, draft d_j is kept with probability min(1, p_j(d_j) / q_j(d_j)); at the first
rejection that position is drawn from the residual norm(max(0, p_j - q_j)) and the round stops; when every
draft passes, the last position is drawn from its p directly. p_a is conditioned on accepted tokens only,
and p_j is exact whenever d_a..d_{j-1} were all kept, so each token is distributed as ordinary sampling
would draw it (speculative sampling's argument, position by position) and a forward yields 1..W tokens.
The positions after the stop were conditioned on drafts, so their p only serve as the next proposals:
their new drafts are drawn from them (the Jacobi update). MC-SJD (arXiv 2510.24211) draws each new draft
by maximal coupling with the old one instead (keep the old token with probability
min(1, p_new(x_old) / q_old(x_old)), else draw from norm(max(0, p_new - q_old))): the same marginal p_new,
but drafts that the update barely changed survive, so more of them match the next verification.

Choices (docs/speculative-decoding.md has the measurements behind them):
- Fresh positions at the window's far end are drafted from the last distribution the forward computed
  (the nearest position's, a spatial prior), not uniformly: any proposal keeps the output exact, and
  this one is accepted more often.
- The prompt's prefill draws token 0 as ordinary sampling does and drafts the first window from it, so
  with `window=1` (no drafts) every round is one ordinary step: the same tokens, draw for draw.
- temperature 0 makes every p one-hot: a draft stays only if it is the argmax (Jacobi decoding), and the
  tokens are ordinary greedy decoding's.
- Images advance independently, not by the batch's minimum. Rows are as in image_ar.py: an image's
  conditional and unconditional row, all conditional rows first. Every forward writes all images'
  windows to the same cache slots s..s+S; an image whose round stopped early marks its unused slots
  invalid (`key_valid`, as for left padding), a hole its later queries never see, and s moves on by the
  longest round. Keys carry their RoPE position, so only their order and validity matter: when the holes
  fill the cache, `_compact` squeezes them out. An image's tokens thus depend on its own generator and
  nothing else in the batch (each round draws a fixed amount from it), as with image_ar.py.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.janus import JanusModel
from ..models.llama import KVCache
from .image_ar import cfg_rows, cfg_weights
from .logits import check_filters, check_temperature, filter_logits

MODES = ("sjd", "mc-sjd")  # ordinary SJD, and SJD with MC-SJD's coupled draft refresh
DEFAULT_WINDOW = 16


@dataclass
class SpeculativeTokens:
    tokens: torch.Tensor  # (n, n_tokens) VQ ids
    forwards: torch.Tensor  # (n,) LLM forward passes each image took, its prefill included (ordinary sampling: n_tokens)
    batch_forwards: int  # forward passes of the batch: the slowest image's


def check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the tokens verified per LLM forward), got {window!r}")
    return window


@torch.inference_mode()
def speculative_image_tokens(model: JanusModel, prompts: Sequence[Sequence[int]], *, pad_id: int,
                             cfg_weight: float | Sequence[float], temperature: float = 1.0,
                             top_k: int | None = None, top_p: float | None = None,
                             generators: Sequence[torch.Generator | None] | None = None,
                             window: int = DEFAULT_WINDOW, coupling: bool = False,
                             progress: Callable[[int, int], None] | None = None,
                             slack: int | None = None) -> SpeculativeTokens:
    """One image per prompt, as image_ar.generate_image_tokens (same arguments and distribution), by SJD
    with `window` tokens per forward; `coupling`: MC-SJD's draft refresh. `progress(done, n_tokens)`
    counts the tokens of the slowest image. `slack`: cache slots beyond prompt + n_tokens + window before
    holes are compacted (default n_tokens)."""
    llm, c = model.llm, model.config
    n, T, V = len(prompts), c.vq.n_tokens, c.gen_head.image_token_size
    if n == 0:
        raise ValueError("speculative_image_tokens needs at least one prompt")
    check_temperature(temperature)
    check_filters(top_k, top_p)
    W = min(check_window(window), T)
    w = cfg_weights(cfg_weight, n)[:, :, None]  # (n, 1, 1)
    gens = [None] * n if generators is None else list(generators)
    if len(gens) != n:
        raise ValueError(f"{len(gens)} generators for {n} prompts")
    ids, prompt_valid = cfg_rows(prompts, pad_id)
    L = ids.shape[1]
    if L + T > c.llm.max_seq_len:
        raise ValueError(f"prompt is {L} tokens; with {T} image tokens that exceeds the model context "
                         f"of {c.llm.max_seq_len} tokens")

    def probs(hidden: torch.Tensor) -> torch.Tensor:
        """(2n, S, dim) hidden states -> (n, S, V) CFG-combined, filtered distributions (float32), computed as
        logits.sample computes them; temperature 0 gives a one-hot on the argmax (Jacobi decoding)."""
        logits = model.image_logits(hidden).float()
        g = logits[n:] + w * (logits[:n] - logits[n:])
        if temperature == 0:
            return F.one_hot(g.argmax(-1), V).float()
        return filter_logits(g / temperature, top_k, top_p).softmax(-1)

    # The cache: the prompt, then every round's window at slots s..s+S; `valid` marks what a query may see.
    cap = L + T + W + (T if slack is None else slack)
    cache = KVCache(c.llm, 2 * n, cap, llm.embed_tokens.weight.dtype)
    valid = torch.zeros(2 * n, cap, dtype=torch.bool)
    valid[:, :L] = True if prompt_valid is None else prompt_valid
    first_pos = valid[:, :L].sum(1)  # (2n,) RoPE position of image token 0
    positions = (valid[:, :L].long().cumsum(-1) - 1).clamp(min=0)
    p = probs(llm(llm.embed_tokens(ids), positions, cache, 0, prompt_valid)[:, -1:])  # (n, 1, V): token 0's

    out = torch.zeros(n, T, dtype=torch.long)
    a = torch.zeros(n, dtype=torch.long)  # accepted tokens per image
    drafts = torch.zeros(n, W - 1, dtype=torch.long)  # for positions a..a+W-2
    q = torch.zeros(n, W - 1, V)  # the distribution each draft was drawn from
    forwards = torch.ones(n, dtype=torch.long)  # the prefill
    rows = torch.arange(n)
    s = L  # the first cache slot of the next window
    first = True  # the prefill's round: token 0 alone, no drafts yet, no window in the cache
    batch_forwards = 1
    while True:
        # -- verify: p holds the distributions of positions a..a+S-1 of every active image ---------------
        active = a < T
        S = p.shape[1]
        noise, u = _draws(gens, active, W, V)
        n_verify = torch.zeros_like(a) if first else torch.where(active, (T - a).clamp(max=S) - 1, 0)
        k, tok = _verify(p, q, drafts, n_verify, u[:, :W - 1], noise[:, 0])
        m = torch.where(active, k + 1, 0)  # tokens this round gives each image: k kept drafts, then tok
        got = torch.cat([drafts, tok[:, None]], 1).scatter(1, k[:, None], tok[:, None])
        take = torch.arange(W) < m[:, None]
        out[rows[:, None].expand(-1, W)[take], (a[:, None] + torch.arange(W))[take]] = got[take]
        if not first:  # of the window's slots, those of x_{a-1} and the kept drafts hold the right keys
            valid[:, s:s + S] = (torch.arange(S) < m[:, None]).repeat(2, 1)
            s += int(m.max())
        new, q = _redraft(p, k, noise[:, 1:], (drafts, q, u[:, W - 1:]) if coupling and not first else None)
        drafts = torch.where(active[:, None], new, drafts)
        a += m
        first = False
        if progress is not None:
            progress(int(a.min()), T)
        if bool((a >= T).all()):
            return SpeculativeTokens(tokens=out, forwards=forwards, batch_forwards=batch_forwards)

        # -- one forward of [x_{a-1}, drafts] for every image (finished ones feed anything; nothing reads it)
        active = a < T
        S = int((T - a[active]).clamp(max=W).max())
        if s + S > cap:
            s = _compact(cache, valid, s)
        x = torch.cat([out[rows, (a - 1).clamp(max=T - 1)][:, None], drafts[:, :S - 1]], 1)  # (n, S)
        pos = (first_pos + (a - 1).repeat(2))[:, None] + torch.arange(S)
        valid[:, s:s + S] = True  # causal within the window; what is not kept is masked after the round
        key_valid = None if bool(valid[:, :s + S].all()) else valid[:, :s + S]
        p = probs(llm(model.gen_embeds(torch.cat([x, x])), pos, cache, s, key_valid))
        forwards += active.long()
        batch_forwards += 1


def _verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, n_verify: torch.Tensor, u: torch.Tensor,
            noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One round's verification, left to right. p: (n, S, V) this forward's distributions at window
    positions 0..S-1; drafts (n, W-1) drawn from q (n, W-1, V); only the first n_verify (n,) drafts count
    (the rest lie past the image's end, or there are none yet). Returns k (n,): the drafts kept before
    the first rejection, and the token at window position k: from the residual if a draft was rejected
    there, else (all drafts kept) straight from p."""
    S, rows = p.shape[1], torch.arange(p.shape[0])
    keep = _keep(p[:, :S - 1], q[:, :S - 1], drafts[:, :S - 1], u[:, :S - 1])
    keep &= torch.arange(S - 1) < n_verify[:, None]
    k = keep.long().cumprod(1).sum(1)
    pk = p[rows, k]
    if q.shape[1] == 0:  # window 1: no drafts, ordinary sampling
        return k, _race(pk, noise)
    rejected = (k < n_verify)[:, None]
    return k, _race(torch.where(rejected, _residual(pk, q[rows, k.clamp(max=q.shape[1] - 1)]), pk), noise)


def _redraft(p: torch.Tensor, k: torch.Tensor, noise: torch.Tensor,
             old: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts and their proposals for the W-1 positions after the round's last token, window positions
    k+1..k+W-1: drawn from the p this forward computed there (the Jacobi update), or from its last p past
    the window's end. `old` = (drafts, q, u) of this round: MC-SJD's maximal coupling keeps the old draft
    at a position with probability min(1, p(x_old) / q_old(x_old)) and otherwise draws from the residual,
    which is still a draw from p, so the new q is p either way."""
    n, S, V = p.shape
    at = k[:, None] + 1 + torch.arange(noise.shape[1])  # (n, W-1) window positions of the new drafts
    new_q = p.gather(1, at.clamp(max=S - 1)[..., None].expand(-1, -1, V))
    if old is None:
        return _race(new_q, noise), new_q
    drafts, q, u = old
    had = at < drafts.shape[1]  # the old window drafted that position too
    i = at.clamp(max=max(drafts.shape[1] - 1, 0))
    x_old, q_old = drafts.gather(1, i), q.gather(1, i[..., None].expand(-1, -1, V))
    stay = had & _keep(new_q, q_old, x_old, u)
    moved = _race(torch.where(had[..., None], _residual(new_q, q_old), new_q), noise)
    return torch.where(stay, x_old, moved), new_q


def _draws(gens: Sequence[torch.Generator | None], active: torch.Tensor, W: int, V: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A round's randomness, a fixed amount per active image from its own generator: (n, W, V) Exp(1) noise
    (row 0 for the round's last token, the rest for new drafts) and (n, 2(W-1)) uniforms (acceptance, then
    coupling). With W = 1 that is one (V,) draw, exactly what logits.sample draws for a token."""
    noise = torch.ones(len(gens), W, V)
    u = torch.zeros(len(gens), 2 * (W - 1))
    for i in active.nonzero().flatten().tolist():
        noise[i].exponential_(generator=gens[i])
        if W > 1:
            u[i].uniform_(generator=gens[i])
    return noise, u


def _keep(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Speculative sampling's test for draws x ~ q against target p: keep x with probability
    min(1, p(x) / q(x)), i.e. when u * q(x) < p(x) for u ~ U[0, 1). p, q: (..., V); x, u: (...)."""
    px = p.gather(-1, x[..., None])[..., 0]
    qx = q.gather(-1, x[..., None])[..., 0]
    return u * qx < px


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p - q) (unnormalised: _race takes weights): where a draw from q was rejected, drawing from it
    makes the position's token distributed as p. p == q leaves nothing, and nothing is ever rejected then;
    rounding can still empty it, so fall back to p."""
    r = (p - q).clamp(min=0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, p)


def _race(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(weights / Exp(1) noise): a draw from weights / sum(weights), as logits.sample draws."""
    return (weights / noise.clamp(min=torch.finfo(noise.dtype).tiny)).argmax(-1)


def _compact(cache: KVCache, valid: torch.Tensor, end: int) -> int:
    """Squeeze the holes out of slots 0..end: every row's visible slots move, in order, to the end of slots
    0..c (c = the most any row has; rows with fewer start with masked slots, like left padding) and c is
    returned as the next free slot. A key carries its RoPE position, so moving it changes nothing."""
    v = valid[:, :end]
    count = v.sum(1)
    c = int(count.max())
    order = torch.sort(v.to(torch.uint8), dim=1, stable=True).indices[:, end - c:]  # masked first, then visible
    for buf in (*cache.k, *cache.v):
        _, h, _, d = buf.shape
        buf[:, :, :c] = buf[:, :, :end].gather(2, order[:, None, :, None].expand(-1, h, -1, d))
    valid[:, :c] = torch.arange(c) >= (c - count)[:, None]
    valid[:, c:] = False
    return c
