"""Small shared helpers for the training tests (imported by tests and by the torchrun worker)."""
from __future__ import annotations

from pathlib import Path

from januskit.train.config import RunConfig

PRESET = "tiny-janus-pro"


def run_config(out: str | Path, *, stage: str = "janus-pro/3", steps: int = 4, batch_size: int = 4,
               micro_batch_size: int = 1, seq_len: int = 192, lr: float = 1e-3, warmup: int = 1,
               parallel: str = "auto", save_every: int = 2, keep_last: int = 2, log_every: int = 1,
               export_dtype: str = "float32", seed: int = 0, **train: object) -> RunConfig:
    """A tiny run on SyntheticData: 4 rows of 192 slots per step by default."""
    return RunConfig.from_dict({
        "model": {"source": PRESET, "seed": 0},
        "stage": {"name": stage, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup},
        "train": {"out": str(out), "micro_batch_size": micro_batch_size, "seq_len": seq_len, "parallel": parallel,
                  "save_every": save_every, "keep_last": keep_last, "log_every": log_every,
                  "export_dtype": export_dtype, "seed": seed, "progress": False, **train},
        "data": {"builder": "januskit.train.synthetic:build", "text_len": [4, 16]},
    })
