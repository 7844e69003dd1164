"""GRPO for autoregressive image generation (Janus, Janus-Pro).

One step: for each of P prompts sample a group of G images exactly as inference does (CFG on the image
head's logits, temperature, one generator per image), score them with the reward, and normalise the
rewards within each group: A_i = (r_i - mean_group) / (std_group + eps). Then update the policy on the
same tokens, teacher-forced (no second sampling), with the clipped surrogate and a KL penalty to a frozen
reference model, per image token t of image i:

    ratio = exp(logp(t) - logp_old(t))
    loss_t = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) + beta * KL_t
    KL_t = exp(logp_ref(t) - logp(t)) - (logp_ref(t) - logp(t)) - 1      (the k3 estimator, >= 0)

averaged over an image's tokens, then over images. logp_old is the policy's own log-prob before this
rollout's first update (equal to logp on the first inner step, so the ratio only departs from 1 when
`inner_steps` > 1); logp_ref comes from the frozen reference on the same tokens.

What is the log-probability of a CFG-sampled token? The token was drawn from softmax((u + w (c - u)) / T)
(u, c: unconditional and conditional logits), so two readings exist, and `logprob` chooses:
- "cfg": the log-prob under that guided distribution, i.e. the distribution that actually sampled it
  (the update is then exact policy gradient for the sampler as deployed; both CFG rows get gradients);
- "cond": the log-prob under the conditional distribution softmax(c / T) alone (the policy is the
  conditional model, guidance is an inference-time trick; half the backward cost, one row per image).

Edits (`edit`: the prompts are edit prompts with their sources, processing.edit): the rollout samples with
the two-condition guidance of inference; "cfg" is then the log-prob under the guided three-row logits
u + s_img (i - u) + s_txt (c - i), "cond" under the full row's (text and sources) alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...models.janus import JanusModel
from ...processing.edit import EditInputs, guide
from ...sampling.image_ar import cfg_rows, cfg_weights, edit_embeds, edit_rows, generate_image_tokens

LOGPROBS = ("cfg", "cond")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(P * G,) rewards, groups consecutive -> (P * G,) float32 advantages normalised within each group.
    A group whose images all scored alike carries no signal: its advantages are exactly 0."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected a flat tensor of groups of {group_size}, got shape {tuple(rewards.shape)}")
    r = rewards.double().view(-1, group_size)
    std = r.std(-1, unbiased=False, keepdim=True)
    adv = (r - r.mean(-1, keepdim=True)) / (std + eps)
    return torch.where(std > 0, adv, torch.zeros_like(adv)).view(-1).float()


def rollout_tokens(model: JanusModel, prompt_ids: Sequence[Sequence[int]], *, pad_id: int, cfg_weight: float,
                   temperature: float, generators: Sequence[torch.Generator], edit: EditInputs | None = None
                   ) -> torch.Tensor:
    """(n, n_tokens) VQ ids, one image per prompt row, sampled as at inference (a normal tensor, not an
    inference-mode one: the update feeds it back through autograd)."""
    return generate_image_tokens(model, prompt_ids, pad_id=pad_id, cfg_weight=cfg_weight, temperature=temperature,
                                 generators=generators, edit=edit).clone()


def image_token_logits(model: JanusModel, prompt_ids: Sequence[Sequence[int]], tokens: torch.Tensor, *,
                       pad_id: int, cfg_weight: float, mode: str, edit: EditInputs | None = None) -> torch.Tensor:
    """Teacher-forced float32 logits (n, n_tokens, codebook) that token t of each image was drawn from
    (before temperature): the guided u + w (c - u) ("cfg") or the conditional c ("cond"). The rows, padding
    and RoPE positions are the sampler's (cfg_rows, or edit_rows with `edit`), so with CFG these are the
    sampler's own logits."""
    if mode not in LOGPROBS:
        raise ValueError(f"logprob must be one of {', '.join(LOGPROBS)}, got {mode!r}")
    n = len(prompt_ids)
    ids, valid = cfg_rows(prompt_ids, pad_id) if edit is None else edit_rows(prompt_ids, pad_id, edit)  # (2n or 3n, L)
    if mode == "cond":
        ids, valid = ids[:n], (None if valid is None else valid[:n])
    rows, L = ids.shape
    T = tokens.shape[1]
    text = model.text_embeds(ids) if edit is None else edit_embeds(model, ids, edit, groups=min(2, rows // n))
    img = model.gen_embeds(tokens[:, :-1]).to(text.dtype)  # the image's own tokens feed the next positions
    h = torch.cat([text, img.repeat(rows // n, 1, 1)], 1)
    if valid is None:
        positions, key_valid = torch.arange(L + T - 1).expand(rows, -1), None
    else:
        key_valid = torch.cat([valid, torch.ones(rows, T - 1, dtype=torch.bool)], 1)
        positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.llm(h, positions, None, 0, key_valid)[:, L - 1:]  # (rows, T, dim): slot L-1+t predicts token t
    logits = model.image_logits(hidden).float()
    if mode == "cfg":
        w = cfg_weights(cfg_weight, n)[:, :, None]
        if edit is not None:
            return guide(logits[:n], logits[n:2 * n], logits[2 * n:], w, cfg_weights(edit.cfg_image, n)[:, :, None])
        logits = logits[n:] + w * (logits[:n] - logits[n:])
    return logits


def image_token_logprobs(model: JanusModel, prompt_ids: Sequence[Sequence[int]], tokens: torch.Tensor, *,
                         pad_id: int, cfg_weight: float, temperature: float, mode: str,
                         edit: EditInputs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (n, n_tokens) of `tokens` under `mode`'s distribution at `temperature` (see the
    module doc), and that distribution's entropy (n, n_tokens)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature!r}")
    logits = image_token_logits(model, prompt_ids, tokens, pad_id=pad_id, cfg_weight=cfg_weight, mode=mode, edit=edit)
    logp = (logits / temperature).log_softmax(-1)
    lp = logp.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


@dataclass(frozen=True)
class GRPOLoss:
    clip: float = 0.2  # clip range eps of the ratio
    kl_weight: float = 0.04  # beta

    def __call__(self, lp: torch.Tensor, old_lp: torch.Tensor, ref_lp: torch.Tensor, adv: torch.Tensor,
                 kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-image losses (n,) (means over the image's actions: tokens, or SDE steps) and per-image statistics
        (n,): kl, clipped (share of actions). `kl`: per-action KL when known exactly (Flow-GRPO), else the k3
        estimate from the reference's log-probs."""
        ratio = (lp - old_lp).exp()
        a = adv[:, None]
        surrogate = torch.minimum(ratio * a, ratio.clamp(1 - self.clip, 1 + self.clip) * a)
        if kl is None:
            d = ref_lp - lp
            kl = d.exp() - d - 1
        per_token = -surrogate + self.kl_weight * kl
        clipped = ((ratio - 1).abs() > self.clip) & ((ratio - 1) * a > 0)  # where the clip removes the gradient
        return per_token.mean(-1), {"kl": kl.detach().mean(-1), "clipped": clipped.float().mean(-1)}


class GRPOObjective(nn.Module):
    """The policy (`model`, what checkpoints hold) and the GRPO loss on one micro-batch of a rollout; a
    module so that DDP can wrap it like the supervised LossForward."""

    repa_head = None  # the trainer's set_trainable asks

    def __init__(self, model: JanusModel, loss: GRPOLoss, *, pad_id: int, cfg_weight: float, temperature: float,
                 mode: str) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.pad_id, self.cfg_weight, self.temperature, self.mode = pad_id, cfg_weight, temperature, mode

    def logprobs(self, prompt_ids: Sequence[Sequence[int]], tokens: torch.Tensor, model: JanusModel | None = None,
                 edit: EditInputs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return image_token_logprobs(model if model is not None else self.model, prompt_ids, tokens, pad_id=self.pad_id,
                                    cfg_weight=self.cfg_weight, temperature=self.temperature, mode=self.mode, edit=edit)

    def forward(self, prompt_ids: Sequence[Sequence[int]], tokens: torch.Tensor, adv: torch.Tensor,
                old_lp: torch.Tensor | None, ref: tuple[torch.Tensor, torch.Tensor], edit: EditInputs | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(per-image losses, this forward's log-probs detached, stats incl. entropy). old_lp None = this is the
        rollout's first update: the old policy is the current one. `ref`: the reference's `logprobs` output.
        `edit`: the rows' sources when the prompts are edit prompts."""
        lp, entropy = self.logprobs(prompt_ids, tokens, edit=edit)
        old = lp.detach() if old_lp is None else old_lp
        per_image, stats = self.loss(lp, old, ref[0], adv)
        stats["entropy"] = entropy.detach().mean(-1)
        return per_image, lp.detach(), stats
