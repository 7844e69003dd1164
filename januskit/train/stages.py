"""The three training stages of Janus (paper Table 1), Janus-Pro (paper Table 2) and JanusFlow (paper
Table 1), as data.

A stage is a row: which top-level parts train, the optimiser and schedule numbers, the step and batch
counts and the data ratio (understanding : pure text : generation, optionally : edit; the papers' rows
have no edit data, a run adds it with a four-weight `ratio` override). `apply_stage` sets
`requires_grad` by prefix; `lr_multiplier` is the schedule as a pure function of the step.
Batch sizes are per optimiser step over all ranks: a per-step data source (the mixer) reads them as
samples, and with a micro-batch source the trainer reads them as packed rows.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from .optim import lr_at

log = logging.getLogger("januskit.train")

# Top-level parts of JanusModel, in checkpoint order (counts are reported per part).
PARTS = ("vision_model", "aligner", "gen_vision_model", "gen_aligner", "gen_head", "gen_embed", "language_model")
ALWAYS_FROZEN = ("gen_vision_model",)  # the VQ tokenizer is frozen in every stage of both papers

# Stage I = "adaptors and image head". gen_embed is the learned 16384x8 table in front of gen_aligner
# (official code: prepare_gen_img_embeds = gen_aligner(gen_embed(ids)); not the VQ codebook), i.e. the
# first half of the generation adaptor, so it trains with it. It is also tiny (0.13M params).
ADAPTORS = ("aligner", "gen_aligner", "gen_head", "gen_embed")
WITH_LLM = ADAPTORS + ("language_model",)  # Stage II: + LLM (embeddings, decoder, lm_head)
ALL_BUT_VQ = WITH_LLM + ("vision_model",)  # Stage III: + the understanding encoder (SigLIP)
GEN_WITH_LLM = ("gen_aligner", "gen_head", "gen_embed", "language_model.model")  # RL: what draws (no text head)

# JanusFlow: stage 1 adapts the randomly initialised parts (linear aligners, the generation encoder and
# decoder, the REPA projector h_phi), stage 2 adds the LLM, stage 3 the understanding encoder. The VAE
# is outside the model and never trains. beg_of_und_embed is never trainable: its only path into the
# LLM is detached in the reference (so it could get no gradient, and no optimiser state to resume).
FLOW_NEW = ("vision_und_enc_aligner", "vision_gen_enc_model", "vision_gen_enc_aligner",
            "vision_gen_dec_model", "vision_gen_dec_aligner_norm", "vision_gen_dec_aligner", "repa_head")
OPTIONAL = ("repa_head",)  # only present while training with REPA (it belongs to the loss, not the model)
FLOW_WITH_LLM = FLOW_NEW + ("language_model",)
FLOW_ALL = FLOW_WITH_LLM + ("vision_und_enc_model",)
# RL for JanusFlow's generation: its encoder, decoder and their aligners, and the decoder body of the LLM.
FLOW_GEN_WITH_LLM = ("vision_gen_enc_model", "vision_gen_enc_aligner", "vision_gen_dec_model",
                     "vision_gen_dec_aligner_norm", "vision_gen_dec_aligner", "language_model.model")
SCHEDULES = ("constant", "cosine")  # after the linear warm-up


@dataclass(frozen=True, kw_only=True)
class Stage:
    name: str
    trainable: tuple[str, ...]  # parameter-name prefixes that get requires_grad=True
    lr: float  # peak learning rate
    schedule: str  # "constant" or "cosine" (after the linear warm-up)
    weight_decay: float  # AdamW decoupled decay, applied to matrices and embeddings only
    warmup: int  # optimiser steps of linear warm-up from 0
    steps: int  # optimiser steps to run
    batch_size: int  # per optimiser step, all ranks: samples for a per-step data source, else packed rows
    ratio: tuple[float, ...]  # data mixture understanding : pure text : generation (: edit; 3 weights = no edit)
    horizon: int | None = None  # schedule length if not `steps` (a cosine planned longer than it ran)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW, both papers
    grad_clip: float = 1.0  # global grad-norm clip, both papers
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr (the papers do not state one)
    source: str = ""  # where the numbers come from

    def scaled(self, scale: float) -> "Stage":
        """A proportionally smaller run: steps, warm-up, horizon and batch size times `scale`
        (steps and batch at least 1). LR, decay and ratios are kept: with the batch scaled by the
        same factor the per-sample statistics stay comparable, which is the point of a small run."""
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        if scale == 1:
            return self
        return dataclasses.replace(
            self, steps=max(1, round(self.steps * scale)), warmup=round(self.warmup * scale),
            horizon=None if self.horizon is None else max(1, round(self.horizon * scale)),
            batch_size=max(1, round(self.batch_size * scale)))


_J = "Janus paper Table 1"
_P = "Janus-Pro paper Table 2"
_F = "JanusFlow paper Table 1"
STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage(name="janus/1", trainable=ADAPTORS, lr=1e-3, schedule="cosine", weight_decay=0.0, warmup=300,
          steps=10_000, batch_size=256, ratio=(1, 0, 1), source=_J),
    Stage(name="janus/2", trainable=WITH_LLM, lr=1e-4, schedule="constant", weight_decay=0.0, warmup=5000,
          steps=180_000, batch_size=512, ratio=(2, 3, 5), source=_J),
    Stage(name="janus/3", trainable=ALL_BUT_VQ, lr=2e-5, schedule="constant", weight_decay=0.1, warmup=0,
          steps=24_000, batch_size=256, ratio=(7, 3, 10), source=_J),
    Stage(name="janus-pro/1", trainable=ADAPTORS, lr=1e-3, schedule="constant", weight_decay=0.0, warmup=600,
          steps=20_000, batch_size=256, ratio=(1, 0, 3), source=_P),
    # Planned 360K steps, early-stopped at 270K (Janus-Pro report); constant LR, so the plan changes nothing else.
    Stage(name="janus-pro/2", trainable=WITH_LLM, lr=1e-4, schedule="constant", weight_decay=0.0, warmup=5000,
          steps=270_000, horizon=360_000, batch_size=512, ratio=(2, 3, 5), source=_P + " (early stop 270K of 360K)"),
    Stage(name="janus-pro/3", trainable=ALL_BUT_VQ, lr=4e-5, schedule="constant", weight_decay=0.0, warmup=0,
          steps=80_000, batch_size=128, ratio=(5, 1, 4), source=_P + " (1B)"),
    Stage(name="janus-pro-7b/3", trainable=ALL_BUT_VQ, lr=4e-5, schedule="constant", weight_decay=0.0, warmup=0,
          steps=40_000, batch_size=128, ratio=(5, 1, 4), source=_P + " (7B)"),
    # Online RL for generation (januskit.train.rl, not in the papers): the parts that draw an image (LLM,
    # generation adaptor and embedding, image head); batch_size counts prompts, each with [rl] group_size images.
    Stage(name="janus-pro/rl", trainable=GEN_WITH_LLM, lr=1e-5, schedule="constant", weight_decay=0.0, warmup=0,
          steps=1000, batch_size=16, ratio=(0, 0, 1), source="januskit (RL stage; T2I-R1 / Flow-GRPO-style GRPO)"),
    # JanusFlow's table orders the ratio understanding : generation : text; ours is und : text : gen.
    Stage(name="janusflow/1", trainable=FLOW_NEW, lr=1e-4, schedule="constant", weight_decay=0.0, warmup=2000,
          steps=10_000, batch_size=512, ratio=(50, 0, 50), source=_F),
    # The paper starts stage 2 at 30:50:20 (und:gen:text) for its first 10K steps, then 14:80:6; one
    # stage row has one ratio, so that opening phase is a separate 10K-step run of "janusflow/2-early".
    Stage(name="janusflow/rl", trainable=FLOW_GEN_WITH_LLM, lr=1e-5, schedule="constant", weight_decay=0.0, warmup=0,
          steps=1000, batch_size=16, ratio=(0, 0, 1), source="januskit (RL stage; Flow-GRPO)"),
    Stage(name="janusflow/2-early", trainable=FLOW_WITH_LLM, lr=1e-4, schedule="constant", weight_decay=0.0,
          warmup=2000, steps=10_000, batch_size=512, ratio=(30, 20, 50), source=_F + " (stage 2, first 10K steps)"),
    Stage(name="janusflow/2", trainable=FLOW_WITH_LLM, lr=1e-4, schedule="constant", weight_decay=0.0, warmup=2000,
          steps=390_000, batch_size=512, ratio=(14, 6, 80), source=_F),
    Stage(name="janusflow/3", trainable=FLOW_ALL, lr=2e-5, schedule="constant", weight_decay=0.0, warmup=1000,
          steps=26_000, batch_size=256, ratio=(21, 9, 70), source=_F),
]}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    return STAGES[name]


def lr_multiplier(step: int, stage: Stage) -> float:
    """LR factor for optimiser step `step` (0-based): linear warm-up to 1 over `warmup` steps, then
    1 (constant) or a half cosine down to `min_lr_ratio` at the end of the horizon."""
    if step >= stage.warmup and stage.schedule not in SCHEDULES:
        raise ValueError(f"stage {stage.name}: unknown schedule {stage.schedule!r} (constant or cosine)")
    return lr_at(step + 1, peak=1.0, warmup=stage.warmup, horizon=stage.horizon or stage.steps,
                 floor=stage.min_lr_ratio, cosine=stage.schedule == "cosine", decay_from_step_start=True)


def _part(name: str) -> str:
    return name.split(".", 1)[0]


def apply_stage(model: nn.Module, stage: Stage, extra: Mapping[str, nn.Module] | None = None
                ) -> dict[str, tuple[int, int]]:
    """Set requires_grad by prefix (the VQ tokenizer stays frozen whatever the stage says) and return
    {part: (trainable params, total params)}, also logged. `extra`: parts that train alongside the
    model without being in it, by name (the loss's REPA head, "repa_head")."""
    bad = [p for p in stage.trainable if any(p == f or p.startswith(f + ".") for f in ALWAYS_FROZEN)]
    if bad:
        raise ValueError(f"stage {stage.name}: {bad} must stay frozen (the VQ tokenizer is never trained)")
    counts: dict[str, list[int]] = {}
    matched = set()
    named = itertools.chain(model.named_parameters(), *(m.named_parameters(prefix=k) for k, m in (extra or {}).items()))
    for name, p in named:
        hit = [t for t in stage.trainable if name == t or name.startswith(t + ".")]
        matched.update(hit)
        p.requires_grad_(bool(hit))
        c = counts.setdefault(_part(name), [0, 0])
        c[0] += p.numel() if hit else 0
        c[1] += p.numel()
    unknown = set(stage.trainable) - matched - set(OPTIONAL)
    if unknown:
        raise ValueError(f"stage {stage.name}: trainable prefixes {sorted(unknown)} match no parameter "
                         f"(parts: {', '.join(PARTS)})")
    out = {k: (v[0], v[1]) for k, v in counts.items()}
    total = sum(v[0] for v in out.values())
    log.info("stage %s: %s trainable parameters", stage.name, f"{total:,}")
    for k, (t, n) in out.items():
        log.info("  %-18s %14s / %14s %s", k, f"{t:,}", f"{n:,}", "train" if t else "frozen")
    return out
