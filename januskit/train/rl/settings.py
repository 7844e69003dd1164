"""[rl]: online reinforcement learning for image generation (januskit.train.rl). With `algorithm` set, the
stage's batch size counts prompts per optimiser step (each gets `group_size` images) and [data] is unused.

    [stage]
    name = "janus-pro/rl"      # trainable parts: LLM, generation adaptor and image head
    steps = 200
    batch_size = 8             # prompts (groups) per step, over all ranks
    lr = 1e-5

    [rl]
    algorithm = "grpo"
    group_size = 8
    kl_weight = 0.04
    clip = 0.2
    prompts = "world"          # or a .txt / .jsonl file
    rewards = {world = 1.0}    # januskit.train.rl.rewards
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ALGORITHMS = ("none", "grpo", "flow_grpo", "dpo")
LOGPROB_MODES = ("cfg", "cond")


@dataclass(frozen=True, kw_only=True)
class RLSettings:
    algorithm: str = "none"  # "grpo" (Janus / Janus-Pro), "flow_grpo" (JanusFlow), "dpo" (Janus, offline
    # preference pairs; januskit.train.rl.dpo); "none" = supervised training
    group_size: int = 8  # images per prompt; advantages are normalised within a group
    kl_weight: float = 0.04  # beta of the KL penalty to the frozen reference (the initial model)
    clip: float = 0.2  # clip range of the probability ratio
    inner_steps: int = 1  # optimiser steps on each rollout (> 1 makes the ratio and its clip matter)
    rewards: dict[str, Any] = field(default_factory=lambda: {"world": 1.0})  # name or import path -> weight / table
    prompts: str = "world"  # "world" (the miniature world's training prompts), "world_edit" (its edit tasks) or
    # a .txt / .jsonl file
    prompt_categories: list[str] | None = None  # "world": categories to draw (None = all six); "world_edit": tasks
    cfg_weight: float | None = None  # CFG while sampling; None = the model folder's guidance_scale, else 5
    temperature: float = 1.0  # sampling temperature (> 0: log-probabilities need a distribution)
    cfg_image: float | None = None  # edit prompts: the image guidance weight while sampling (None: 1.5)
    logprob: str = "cfg"  # log-prob of a CFG-sampled token: "cfg" (the guided distribution) or "cond" (grpo.py)
    adv_eps: float = 1e-4  # added to the group's reward std
    sde_steps: int = 10  # flow_grpo: SDE steps per rollout (Flow-GRPO collects with 10, samples with 40)
    noise_level: float = 0.7  # flow_grpo: a in g_s^2 = a^2 (1 - s) / s (Flow-GRPO's default)
    pairs: str | None = None  # dpo: the preference manifest (JSONL, kind "preference"); batch_size counts pairs
    pairs_root: str | None = None  # dpo: folder the pairs' image paths are relative to (default: the manifest's)
    dpo_beta: float = 0.1  # dpo: beta of the loss

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.logprob not in LOGPROB_MODES:
            raise ValueError(f"logprob must be one of {', '.join(LOGPROB_MODES)}, got {self.logprob!r}")
        for name, low in (("group_size", 2), ("inner_steps", 1), ("sde_steps", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("kl_weight", "clip", "temperature", "adv_eps", "noise_level", "dpo_beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.noise_level == 0:
            raise ValueError("noise_level must be > 0 (an SDE step without noise has no log-probability)")
        if self.temperature == 0:
            raise ValueError("temperature must be > 0 (GRPO needs the sampling distribution's log-probabilities)")
        if self.cfg_image is not None and (isinstance(self.cfg_image, bool) or not isinstance(self.cfg_image, (int, float))
                                           or not math.isfinite(self.cfg_image)):
            raise ValueError(f"cfg_image must be a finite number or unset, got {self.cfg_image!r}")
        if self.cfg_weight is not None and (isinstance(self.cfg_weight, bool) or not isinstance(self.cfg_weight, (int, float))
                                            or not math.isfinite(self.cfg_weight)):
            raise ValueError(f"cfg_weight must be a finite number or unset, got {self.cfg_weight!r}")
        if not isinstance(self.rewards, dict) or not self.rewards:
            raise ValueError(f"rewards must be a non-empty table {{name = weight}}, got {self.rewards!r}")

    @property
    def enabled(self) -> bool:
        return self.algorithm != "none"
