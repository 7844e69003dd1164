"""The understanding proxy of docs/miniature-world.md ("Two levers"): the shipped model's LLM with a fresh
aligner (and, optionally, a newly pretrained SigLIP), trained on the world's conversations only, then scored.

    python examples/understanding_proxy.py siglip  --out runs/proxy/src-dense --steps 800 --lr 2e-3 --world W
    python examples/understanding_proxy.py siglip  --out runs/proxy/src-shipped --steps 0 --world W   # arm A
    python examples/understanding_proxy.py train   --src runs/proxy/src-dense --out runs/proxy/B3 --steps 800 --world W
    python examples/understanding_proxy.py train   --src runs/proxy/B3 --out runs/proxy/C2 --steps 400 --lr 5e-4 \\
        --warmup 10 --answer-weighting turn --world W
    januskit eval world -m runs/proxy/C2 --world W --prompts-per-category 0 --questions-per-type 100
    python examples/understanding_proxy.py where --out runs/proxy/P1    # 100 'where' questions, own check
    python examples/understanding_proxy.py fresh --out runs/proxy/src-512 --dim 512 --layers 4 --heads 8
    python examples/understanding_proxy.py train --src runs/proxy/src-512 --out runs/proxy/w512 --steps 1500 \
        --lr 1e-3 --warmup 50 --world W    # the width study: a fresh LLM around the shipped SigLIP

W is a written world (`januskit world write W`): SigLIP reads its first 8,000 train images, as the recipe does.
`--no-describe` draws conversations without the describe question (the dilution test's arm C1); `--qtypes`
names the types to draw from, repeats weighing one up, `where` (one object's cell) included.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from januskit.checkpoint.official import load_janus, save_janus
from januskit.cli import DEFAULT_MODEL
from januskit.config import preset
from januskit.processing.tokenizer import TextTokenizer
from januskit.recipes.default_model import Recipe, StagePlan, _component_data, stage_config
from januskit.train.pretrain.siglip import init_vision_tower, train_siglip
from januskit.train.trainer import train
from januskit.world.scene import PATCH_CLASSES


def new_encoder(a: argparse.Namespace) -> None:
    """The shipped model with a fresh aligner and, with --steps > 0, a SigLIP pretrained anew (sigmoid + dense)."""
    model = load_janus(DEFAULT_MODEL, torch.float32)
    if a.steps:
        tok = TextTokenizer.from_file(DEFAULT_MODEL / "tokenizer.json")
        pixels, _, caps, _, labels = _component_data(Path(a.world), 8000, preset("mini-janus-pro"), tok)
        init_vision_tower(model.vision_model, 1)
        cfg = dataclasses.replace(Recipe().siglip, seed=0, dense_classes=PATCH_CLASSES, steps=a.steps, lr=a.lr,
                                  log_every=100, pooled_dense_weight=a.pooled)
        for m in train_siglip(model.vision_model, pixels, caps, tok.pad_id, cfg, progress=False, patch_labels=labels):
            print({k: round(v, 3) for k, v in m.items()})
    g = torch.Generator().manual_seed(5)  # every arm's aligner starts the same
    with torch.no_grad():
        for name, p in model.aligner.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else torch.randn(p.shape, generator=g) * 0.02)
    save_janus(model, a.out, copy_from=DEFAULT_MODEL, overwrite=True, skip=("eval.json",))


def fresh_llm(a: argparse.Namespace) -> None:
    """The shipped model's SigLIP and VQ around a newly initialised LLM (and adaptors, heads) of another width or
    depth: the width study's starting points (every arm from the recipe's init, seed 0)."""
    from januskit.config import AlignerConfig, GenHeadConfig
    from januskit.models.janus import JanusModel
    from januskit.recipes.default_model import training_init

    base = load_janus(DEFAULT_MODEL, torch.float32)
    c = base.config
    ffn = round(a.dim * c.llm.intermediate_size / c.llm.dim / 8) * 8  # the shipped LLM's FFN ratio
    llm = dataclasses.replace(c.llm, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads,
                              intermediate_size=ffn)
    cfg = dataclasses.replace(c, llm=llm, aligner=AlignerConfig(input_dim=c.vision.width, n_embed=a.dim),
                              gen_aligner=AlignerConfig(input_dim=c.vq.codebook_dim, n_embed=a.dim),
                              gen_head=GenHeadConfig(n_embed=a.dim, image_token_embed=a.dim,
                                                     image_token_size=c.vq.codebook_size))
    model = training_init(JanusModel(cfg), 0)
    vision = load_janus(a.siglip_from, torch.float32).vision_model if a.siglip_from else base.vision_model
    model.vision_model.load_state_dict(vision.state_dict())
    model.gen_vision_model.load_state_dict(base.gen_vision_model.state_dict())
    save_janus(model, a.out, copy_from=DEFAULT_MODEL, overwrite=True, skip=("eval.json", "recipe.json", "components.json"))


def understanding_only(a: argparse.Namespace) -> None:
    if a.no_describe or a.qtypes:  # conversations drawn from other question types (text documents unchanged)
        import januskit.world.dataset as wd
        from januskit.world.questions import QTYPES

        ask, mine = wd.ask_some, tuple(a.qtypes.split(",")) if a.qtypes else QTYPES
        wd.ask_some = lambda scene, rng, k, qtypes=mine: ask(scene, rng, k, qtypes)
    plan = StagePlan("und", "janus-pro/2", steps=a.steps, batch_size=32, lr=a.lr, warmup=a.warmup, ratio=(1, 0, 0),
                     schedule="cosine")
    r = dataclasses.replace(Recipe(), autocast=a.autocast, answer_weighting=a.answer_weighting)
    train(stage_config(plan, Path(a.src), Path(a.out), Path(a.world), r))


def where_accuracy(a: argparse.Namespace) -> None:
    """A trained run's answers to 100 `where` questions about random scenes (greedy, exact match)."""
    import numpy as np

    import januskit
    from januskit.world.questions import ask
    from januskit.world.render import render
    from januskit.world.scene import random_scene

    pipe, rng, ok, n = januskit.load(a.out), np.random.default_rng(123), 0, 0
    while n < 100:
        s = random_scene(rng)
        q = ask(s, "where", rng)
        if q is not None:
            ok += pipe.chat(q.question, images=[render(s)], max_new_tokens=8).strip().rstrip(".") == q.answer
            n += 1
    print(f"{a.out}: where accuracy {ok / n:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("siglip", "train", "where", "fresh"))
    p.add_argument("--world", help="siglip, train: a written world")
    p.add_argument("--out", required=True)
    p.add_argument("--src", help="train: the folder to start from")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 (siglip), 1e-3 (train)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--answer-weighting", default="token", choices=("token", "turn"))
    p.add_argument("--no-describe", action="store_true")
    p.add_argument("--qtypes", help="conversations' question types, comma-separated, repeats weigh a type up "
                   "(e.g. colour,shape,count,position,position,pope,describe,where)")
    p.add_argument("--dim", type=int, default=256, help="fresh: the LLM's width")
    p.add_argument("--layers", type=int, default=4, help="fresh: the LLM's depth")
    p.add_argument("--heads", type=int, default=4, help="fresh: attention heads")
    p.add_argument("--pooled", type=float, default=0.0, help="siglip: SigLIPTrainConfig.pooled_dense_weight")
    p.add_argument("--siglip-from", help="fresh: take the SigLIP of this folder instead of the shipped model's")
    p.add_argument("--autocast", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.what in ("siglip", "train") and not a.world:
        p.error(f"{a.what} needs --world")
    a.lr = a.lr if a.lr is not None else (2e-3 if a.what == "siglip" else 1e-3)
    torch.set_num_threads(a.threads)
    {"siglip": new_encoder, "train": understanding_only, "where": where_accuracy, "fresh": fresh_llm}[a.what](a)


if __name__ == "__main__":
    main()
