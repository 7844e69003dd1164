"""Worker for tests/test_train_distributed.py, launched by torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_train.py --parallel ddp --out DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_train.py --config RUN.toml

Trains the tiny preset on SyntheticData (rank r takes micro-batches r, r+2, ...), so the global batch
of every step is the same as in a single process with the same `batch_size`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import DIST_LORA, run_config  # noqa: E402

from januskit.train.trainer import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", help="train this run file (`januskit train CONFIG`) instead of the synthetic run")
    ap.add_argument("--parallel", choices=["none", "ddp", "fsdp"])
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--stage", default="janus-pro/3")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--autocast", default="none", choices=["none", "bfloat16"])
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters (train_helpers.DIST_LORA)")
    ap.add_argument("--fsdp-param-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", default="none", choices=["none", "layers"], help="[train] compile")
    ap.add_argument("--async-checkpoint", action="store_true", help="[train] async_checkpoint")
    ap.add_argument("--ce-chunks", action="store_true",
                    help="force the heads' chunked cross-entropy at the tiny sizes (models.layers.CE_CHUNK_LOGITS)")
    ap.add_argument("--crash-after", type=int, default=None, help="raise after this many steps (simulated kill)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.ce_chunks:  # the text head's 1024 outputs in chunks of 128 or more, the image head's rows 16 a chunk
        import januskit.models.layers as L

        L.CE_CHUNK_LOGITS, L.MIN_CE_COLUMNS = 8192, 128
    if args.config:
        from januskit.cli import main as cli

        raise SystemExit(cli(["train", args.config]))
    cfg = run_config(args.out, stage=args.stage, steps=args.steps, parallel=args.parallel, save_every=2,
                     gradient_checkpointing=args.gradient_checkpointing, autocast=args.autocast,
                     lora=DIST_LORA if args.lora else None, fsdp_param_dtype=args.fsdp_param_dtype,
                     async_checkpoint=args.async_checkpoint, compile=args.compile)
    if args.crash_after is not None:
        import januskit.train.trainer as T

        real, n = T.train_step, [0]

        def crashing(*a, **k):
            if n[0] == args.crash_after:
                raise SystemExit(3)
            n[0] += 1
            return real(*a, **k)

        T.train_step = crashing
    train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
