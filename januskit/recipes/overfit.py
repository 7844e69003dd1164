"""Can the stack learn binding at all? Train a model on a handful of world scenes until it has
memorised them, then score those same training prompts and questions with the judge.

A model that drives its training loss to near zero must draw what its training captions say and
answer its training questions. If it does not, the fault is in the plumbing (data encoding, masks,
CFG rows, positions, sampling), not in the budget: that is what this study separates.

    januskit world overfit --scenes 256 --steps 600 --out runs/overfit
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.official import load_janus
from ..eval.world import EvalSettings, eval_generation, eval_understanding
from ..train.config import RunConfig
from ..train.trainer import fastest_autocast
from ..train.data.vq_cache import cache_vq_ids
from ..world.dataset import conversation, held_out, training_pair, training_scene
from ..world.prompts import Prompt
from ..world.questions import ask_some
from ..world.render import render

log = logging.getLogger("januskit.world")


@dataclass(frozen=True)
class OverfitPlan:
    scenes: int = 256  # generation pairs, and as many understanding images with `turns` questions each
    turns: int = 3
    # each question also trained alone, as a first turn (the evaluation asks it so); without it a question
    # memorised at turn 2 or 3 is asked in a context it was never trained in (0.93 instead of >= 0.95)
    alone: bool = True
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 20
    ratio: tuple[float, float, float] = (1.0, 0.0, 1.0)  # und : text : gen
    stage: str = "janus-pro/2"  # trainable parts: LLM, adaptors, heads
    micro_batch_size: int = 8
    seq_len: int = 512
    autocast: str = field(default_factory=fastest_autocast)  # bf16 only where the CPU has it natively
    threads: int = 1
    seed: int = 0
    images_per_prompt: int = 2
    temperature: float = 1.0
    cfg_weights: tuple[float, ...] = (1.0, 5.0)  # generation is scored at each (1 = no guidance)


def write_subset(root: Path, plan: OverfitPlan) -> tuple[list[Prompt], list[dict]]:
    """The training subset (generation.jsonl, understanding.jsonl, img/) under `root`, drawn like the
    world's train split (held-out combinations excluded); returns its prompts and its questions."""
    rng = np.random.default_rng([plan.seed, 7])
    held = held_out()
    (root / "img").mkdir(parents=True, exist_ok=True)
    prompts, gen, und, questions = [], [], [], []
    for i in range(plan.scenes):
        p, scene = training_pair(rng, held)
        name = f"img/g{i:05d}.png"
        render(scene).save(root / name, compress_level=1)
        prompts.append(p)
        gen.append({"kind": "generation", "caption": p.text, "image": name})
    for i in range(plan.scenes):
        scene = training_scene(rng, held)
        name = f"img/u{i:05d}.png"
        render(scene).save(root / name, compress_level=1)
        qs = ask_some(scene, rng, plan.turns)
        und.append(conversation(qs, name))
        if plan.alone and len(qs) > 1:
            und += [conversation([q], name) for q in qs]
        questions += [q.to_json() | {"image": name} for q in qs]
    for fname, rows in (("generation.jsonl", gen), ("understanding.jsonl", und)):
        (root / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prompts, questions


def run_config(source: Path, data: Path, out: Path, plan: OverfitPlan) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"source": str(source)},
        "stage": {"name": plan.stage, "steps": plan.steps, "batch_size": plan.batch_size, "lr": plan.lr,
                  "warmup": plan.warmup, "ratio": list(plan.ratio)},
        "train": {"out": str(out), "micro_batch_size": plan.micro_batch_size, "seq_len": plan.seq_len,
                  "threads": plan.threads, "autocast": plan.autocast, "seed": plan.seed, "log_every": 10,
                  "save_every": 10**9, "keep_last": 1, "export_dtype": "float32", "progress": False},
        "data": {"builder": "januskit.train.data.loader:build", "understanding": str(data / "understanding.jsonl"),
                 "generation": str(data / "generation-vq.jsonl"), "prefetch": 1},
    }, where="overfit study")


def memorised_fraction(pipe, manifest: Path, batch: int = 64) -> float:
    """Fraction of the training pairs whose image tokens greedy decoding without guidance reproduces
    exactly: the direct check that the model has learnt what each caption's image is."""
    from ..sampling.logits import row_generator

    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    hits = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        ids = [pipe.processor.generation_prompt(r["caption"]) for r in chunk]
        out = pipe.generate_batch(ids, generators=[row_generator(0, i) for i in range(len(chunk))], cfg_weight=1.0,
                                  temperature=0.0)
        want = torch.tensor([r["vq_ids"] for r in chunk]).reshape(len(chunk), -1)
        hits += int((out.tokens == want).all(dim=1).sum())
    return hits / len(rows)


def overfit(source: str | Path, work: str | Path, plan: OverfitPlan = OverfitPlan()) -> dict[str, Any]:
    """Train `source` on the subset into work/model, score the training prompts and questions;
    returns (and writes to work/overfit.json) the figures, the final losses and the times."""
    import januskit
    from ..train.trainer import train

    source, work = Path(source), Path(work)
    torch.set_num_threads(plan.threads)
    data = work / "data"
    t0 = time.perf_counter()
    prompts, questions = write_subset(data, plan)
    cache_vq_ids(data, load_janus(source, torch.float32), data / "generation-vq.jsonl",
                 manifests=[data / "generation.jsonl"], batch_size=64)
    t1 = time.perf_counter()
    train(run_config(source, data, work / "model", plan))
    t2 = time.perf_counter()
    pipe = januskit.load(work / "model")
    gen = {}
    for w in plan.cfg_weights:
        settings = EvalSettings(images_per_prompt=plan.images_per_prompt, seed=plan.seed, cfg_weight=w,
                                temperature=plan.temperature)
        rep = eval_generation(pipe, [(p, False) for p in prompts], settings)
        gen[f"cfg_weight={w:g}"] = {k: v for k, v in rep.items() if k != "records"}
    gen["memorised"] = memorised_fraction(pipe, data / "generation-vq.jsonl")
    und = eval_understanding(pipe, data, questions)
    metrics = [json.loads(x) for x in (work / "model" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = metrics[-1] if metrics else {}
    report = {
        "plan": asdict(plan), "source": str(source),
        "generation": gen,
        "understanding": {k: v for k, v in und.items() if k != "records"},
        "final_losses": {k: last[k] for k in ("loss_und", "loss_gen", "loss") if k in last},
        "seconds": {"data": round(t1 - t0, 1), "train": round(t2 - t1, 1), "eval": round(time.perf_counter() - t2, 1)},
    }
    (work / "overfit.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
