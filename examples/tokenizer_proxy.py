"""The tokenizer-locality study of docs/miniature-world.md: does a VQ whose tokens see only their own part of the
image let the LLM bind colour, shape and place when it draws? Each arm trains a VQ anew, then re-learns generation
from the shipped model's LLM at equal steps, and is scored by the world's judge.

    python examples/tokenizer_proxy.py vq --out runs/tok/src-G --world W                           # control
    python examples/tokenizer_proxy.py vq --out runs/tok/src-L --world W --norm position --no-attention
    python examples/tokenizer_proxy.py train --src runs/tok/src-L --out runs/tok/L --steps 1000 --world W
    januskit eval world -m runs/tok/L --world W --questions-per-type 0 --prompts-per-category 20 --images-per-prompt 2
    python examples/vq_locality.py -m runs/tok/src-L

`vq`: the shipped model with its VQ retrained from scratch (the recipe's VQ settings, on the recipe's 8,000 train
images) and its generation parts (gen_embed, gen_aligner, gen_head) re-initialised, so every arm relearns drawing
from the same start; `--norm position` (VQConfig.norm) and `--no-attention` (VQTrainConfig.attention) make the
tokens local. `train`: generation-only training with Stage II's trainable parts (cosine LR).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from januskit.checkpoint.official import load_janus, save_janus
from januskit.cli import DEFAULT_MODEL
from januskit.models.janus import JanusModel
from januskit.processing.tokenizer import TextTokenizer
from januskit.recipes.default_model import Recipe, StagePlan, _component_data, stage_config, training_init
from januskit.train.pretrain.vq import reconstruction_stats, train_vq
from januskit.train.trainer import train

GEN_PARTS = ("gen_embed.", "gen_aligner.", "gen_head.")


def new_tokenizer(a: argparse.Namespace) -> None:
    shipped = load_janus(DEFAULT_MODEL, torch.float32)
    c = dataclasses.replace(shipped.config, vq=dataclasses.replace(shipped.config.vq, norm=a.norm))
    torch.manual_seed(0)
    model = training_init(JanusModel(c), 0)  # a fresh VQ and generation parts, drawn as the recipe draws them
    fresh = model.state_dict()
    keep = {k: v for k, v in shipped.state_dict().items() if not k.startswith(("gen_vision_model.", *GEN_PARTS))}
    model.load_state_dict({**fresh, **keep})
    tok = TextTokenizer.from_file(DEFAULT_MODEL / "tokenizer.json")
    _, gen, _, _, _ = _component_data(Path(a.world), 8000, c, tok)
    cfg = dataclasses.replace(Recipe().vq, seed=0, attention=not a.no_attention, steps=a.steps)
    hist = train_vq(model.gen_vision_model, gen, cfg, progress=True)
    report = {"vq": {"last": hist[-1], "reconstruction": reconstruction_stats(model.gen_vision_model, gen[:512]),
                     "norm": a.norm, "attention": not a.no_attention}}
    print(json.dumps(report, indent=1, default=float))
    model.eval()
    save_janus(model, a.out, copy_from=DEFAULT_MODEL, overwrite=True, skip=("eval.json", "components.json"),
               files={"components.json": json.dumps(report, indent=1, default=float) + "\n"})


def generation_only(a: argparse.Namespace) -> None:
    plan = StagePlan("gen", "janus-pro/2", steps=a.steps, batch_size=32, lr=a.lr, warmup=a.warmup, ratio=(0, 0, 1),
                     schedule="cosine")
    r = dataclasses.replace(Recipe(), autocast=a.autocast)
    train(stage_config(plan, Path(a.src), Path(a.out), Path(a.world), r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("vq", "train"))
    p.add_argument("--world", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--src", help="train: the folder to start from")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's VQ steps (vq), 1000 (train)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--norm", default="group", choices=("group", "position", "branch"))
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--autocast", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    a.steps = a.steps if a.steps is not None else (Recipe().vq.steps if a.what == "vq" else 1000)
    torch.set_num_threads(a.threads)
    new_tokenizer(a) if a.what == "vq" else generation_only(a)


if __name__ == "__main__":
    main()
