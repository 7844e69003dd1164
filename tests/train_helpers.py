"""Small shared helpers for the training tests (imported by tests and by the torchrun worker)."""
from __future__ import annotations

from pathlib import Path

import torch

from januskit.train.data.batch import IGNORE, TrainBatch
from januskit.train.config import RunConfig

PRESET = "tiny-janus-pro"
# A small [lora] table: rank 4 on the LLM, the aligners and the gen head, with dropout (so RNG matters).
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1, "include_aligners": True, "include_gen_head": True}
# Dropout masks come from per-rank RNG streams, so only dropout-free runs match across world sizes.
DIST_LORA = {**LORA, "dropout": 0.0}


def run_config(out: str | Path, *, stage: str = "janus-pro/3", steps: int = 4, batch_size: int = 4,
               micro_batch_size: int = 1, seq_len: int = 192, lr: float = 1e-3, warmup: int = 1,
               parallel: str = "auto", save_every: int = 2, keep_last: int = 2, log_every: int = 1,
               export_dtype: str = "float32", seed: int = 0, lora: dict | None = None, **train: object) -> RunConfig:
    """A tiny run on SyntheticData: 4 rows of 192 slots per step by default; `lora`: a [lora] table."""
    return RunConfig.from_dict({**({"lora": lora} if lora else {}),
        "model": {"source": PRESET, "seed": 0},
        "stage": {"name": stage, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup},
        "train": {"out": str(out), "micro_batch_size": micro_batch_size, "seq_len": seq_len, "parallel": parallel,
                  "save_every": save_every, "keep_last": keep_last, "log_every": log_every,
                  "export_dtype": export_dtype, "seed": seed, "progress": False, **train},
        "data": {"builder": "januskit.train.data.synthetic:build", "text_len": [4, 16]},
    })


def pack_by_hand(samples: list[list[dict]], T: int) -> TrainBatch:
    """Rows of samples -> TrainBatch. A sample is {"ids": [...], "und": [slot, ...] (image slots),
    "pixels": tensor or None, "gen": {slot: vq id}, "text": {slot: label}, "image": {slot: label}, "kind": k}."""
    B = len(samples)
    z = lambda v: torch.full((B, T), v, dtype=torch.long)  # noqa: E731
    ids, pos, doc, kinds, gen_ids, tl, il = z(0), z(0), z(-1), z(-1), z(0), z(IGNORE), z(IGNORE)
    und = torch.zeros(B, T, dtype=torch.bool)
    gen = torch.zeros(B, T, dtype=torch.bool)
    pixels = []
    for r, row in enumerate(samples):
        t = 0
        for d, s in enumerate(row):
            n = len(s["ids"])
            ids[r, t:t + n] = torch.tensor(s["ids"])
            pos[r, t:t + n] = torch.arange(n)
            doc[r, t:t + n] = d
            kinds[r, t:t + n] = s["kind"]
            for j in s.get("und", []):
                und[r, t + j] = True
            for j, v in s.get("gen", {}).items():
                gen[r, t + j], gen_ids[r, t + j] = True, v
            for j, v in s.get("text", {}).items():
                tl[r, t + j] = v
            for j, v in s.get("image", {}).items():
                il[r, t + j] = v
            if s.get("pixels") is not None:
                pixels.append(s["pixels"])
            t += n
    return TrainBatch(input_ids=ids, positions=pos, doc_ids=doc, und_mask=und,
                      pixel_values=torch.stack(pixels) if pixels else None, gen_mask=gen, gen_ids=gen_ids,
                      text_labels=tl, image_labels=il, kinds=kinds)


class Repeat:
    """The same batch forever (nothing to resume)."""

    def __init__(self, batch: TrainBatch) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def crash_after(monkeypatch, n_steps: int) -> None:
    """Make the trainer die (as if killed) when it starts step n_steps + 1."""
    from januskit.train import trainer

    real, calls = trainer.train_step, [0]

    def step(*a, **k):
        if calls[0] == n_steps:
            raise KeyboardInterrupt("simulated kill")
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_step", step)


def brightness(prompt, image) -> float:
    """A toy RL reward: the image's mean brightness in [0, 1] (any model can learn to raise it)."""
    import numpy as np

    return float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0)


def rl_config(out: str | Path, *, steps: int = 4, prompts_per_step: int = 2, group_size: int = 4,
              lr: float = 1e-3, save_every: int = 2, rl: dict | None = None, lora: dict | None = None,
              **train: object) -> RunConfig:
    """A tiny GRPO run on the tiny preset, rewarded by brightness (`rl` overrides [rl] keys)."""
    return RunConfig.from_dict({**({"lora": lora} if lora else {}),
        "model": {"source": PRESET, "seed": 0},
        "stage": {"name": "janus-pro/rl", "steps": steps, "batch_size": prompts_per_step, "lr": lr},
        "train": {"out": str(out), "micro_batch_size": 4, "save_every": save_every, "keep_last": 2,
                  "log_every": 1, "export_dtype": "float32", "seed": 0, "progress": False, "plot": False,
                  "parallel": "none", **train},
        "rl": {"algorithm": "grpo", "group_size": group_size, "prompts": "world", "cfg_weight": 3.0,
               "rewards": {"train_helpers:brightness": 1.0}, **(rl or {})},
    })
