"""Janus Table 5 in miniature: one encoder or two, one task or both, at the same budget.

    A  shared VQ encoder (Chameleon-style): understanding images enter the LLM as VQ-token embeddings
       (VQ encoder -> gen_embed -> gen_aligner), the same inputs generation uses; und + gen
    B  decoupled encoders (Janus): SigLIP -> aligner for understanding, VQ for generation; und + gen
    C  understanding only (SigLIP), as many understanding samples as B saw
    D  generation only (VQ), as many generation samples as B saw

All four start from the default recipe's components (trained SigLIP and VQ, world tokenizer) and its
text-pretrained LLM, then run one unified stage (Janus-Pro Stage II's trainable parts: LLM + adaptors
+ heads; its data ratio und:text:gen 2:3:5). Single-task runs drop the other task's data and run
proportionally fewer steps, so each task's part sees the same samples: the paper's protocol.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path


from ..models.janus import JanusModel
from .default_model import Recipe, StagePlan, build, stage_config, text_start

log = logging.getLogger("januskit.world")


def share_vq_encoder(model: JanusModel) -> JanusModel:
    """Rewire understanding through the generation tokenizer: pixels -> VQ ids -> gen_embed ->
    gen_aligner. Understanding and VQ pixels are both [-1, 1] at the same side in the world, so the
    understanding transform's output goes straight in. The state dict is unchanged (SigLIP and its
    aligner are simply unused), so the result saves and loads as an ordinary checkpoint."""
    if model.config.vision.image_size != model.config.vq.image_size:
        raise ValueError("share_vq_encoder needs the same image side for understanding and generation")

    model.und_encoder = "vq"
    return model


@dataclass(frozen=True)
class Experiment:
    key: str
    title: str
    ratio: tuple[float, float, float]
    shared_vq: bool = False
    und: bool = True
    gen: bool = True


EXPERIMENTS = (
    Experiment("A", "shared VQ encoder (Chameleon-style), und + gen", (2, 3, 5), shared_vq=True),
    Experiment("B", "SigLIP (und) + VQ (gen), und + gen (Janus)", (2, 3, 5)),
    Experiment("C", "SigLIP, und only", (2, 3, 0), gen=False),
    Experiment("D", "VQ, gen only", (0, 3, 5), und=False),
)
# The unified runs' budget (the table in docs/miniature-world.md): Stage II's LR and warm-up, then a cosine
# to zero so that each run ends converged at its budget rather than mid-plateau.
STEPS, BATCH, LR, WARMUP = 1500, 32, 2e-3, 50


def steps_for(e: Experiment, steps: int = STEPS) -> int:
    """Same samples per task as the unified run: steps scaled by (unified share / own share)."""
    base = (2, 3, 5)
    k = 0 if e.und else 2
    if e.und and e.gen:
        return steps
    own = e.ratio[k] / sum(e.ratio)
    return round(steps * (base[k] / sum(base)) / own)


def run_ablation(work: str | Path, *, only: list[str] | None = None, smoke: bool = False, threads: int = 1,
                 recipe: Recipe | None = None, base: str | Path | None = None, steps: int | None = None) -> str:
    """Run (or continue) the experiments; returns the markdown table (also written to work/table.md).
    `base`: a `januskit world build` work folder to take the world, components and text-pretrained
    LLM from (default: built under work/base). `steps`: the unified runs' optimiser steps."""
    from ..eval.world import EvalSettings, evaluate
    from ..train.trainer import train
    import januskit

    work = Path(work)
    recipe = recipe or Recipe(threads=threads)
    if smoke:
        recipe = recipe.smoke()
    base = Path(base) if base is not None else work / "base"
    # The shared starting point: world, components and the text-pretrained LLM (`Recipe.text_plan`).
    if not (base / recipe.text_plan.name / "RECIPE_DONE").is_file():
        build(base / "model", base, text_start(recipe), evaluate_model=False)
    steps = 2 if smoke else steps or STEPS
    settings = EvalSettings(images_per_prompt=1 if smoke else 2, prompts_per_category=2 if smoke else None,
                            questions_per_type=4 if smoke else None)
    results = {}
    for e in EXPERIMENTS:
        if only and e.key not in only:
            continue
        dst = work / e.key
        res_file = dst / "result.json"
        if not res_file.is_file():
            if dst.exists():
                shutil.rmtree(dst)
            plan = StagePlan(e.key, "janus-pro/2", steps=steps_for(e, steps), batch_size=8 if smoke else BATCH,
                             lr=LR, warmup=0 if smoke else WARMUP, ratio=e.ratio, schedule="cosine")
            prepare = share_vq_encoder if e.shared_vq else None
            train(stage_config(plan, base / recipe.text_plan.name, dst, base / "world", recipe), prepare=prepare)
            shutil.rmtree(dst / "checkpoints", ignore_errors=True)
            pipe = januskit.load(dst)
            if prepare:
                prepare(pipe.model)
            rep = evaluate(pipe, base / "world", settings, generation=e.gen, understanding=e.und)
            res_file.write_text(json.dumps({"experiment": dataclasses.asdict(e), "steps": plan.steps,
                                            **{k: {a: b for a, b in v.items() if a != "records"}
                                               for k, v in rep.to_json().items()}}, indent=1) + "\n")
        results[e.key] = json.loads(res_file.read_text())
    table = format_table(results, work)
    (work / "table.md").write_text(table + "\n")
    return table


def final_losses(run: Path, window: int = 150) -> dict[str, float]:
    """Mean per-task training loss over the run's last `window` steps (metrics.jsonl): a finer signal
    than accuracies where a budget is too small to ground answers. At the default budget every run
    stays within one epoch of the world's training split (9.6K of 12K understanding items, 24K of 24K
    generation items), so these samples are new to the model and the loss tracks held-out loss."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return {}
    tail = [r for r in rows if r["step"] > rows[-1]["step"] - window]
    out = {}
    for key in ("loss_und", "loss_gen"):
        v = [r[key] for r in tail if r.get(key) is not None]
        if v:
            out[key] = sum(v) / len(v)
    return out


def format_table(results: dict[str, dict], work: Path | None = None) -> str:
    rows = ["| Exp | Encoder(s) and tasks | steps | und loss | POPE acc | QA acc | colour | shape | count | position | "
            "describe | gen loss | GenEval overall | single | position | colour attr |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for k, r in results.items():
        u, g = r.get("understanding") or {}, r.get("generation") or {}
        t, cats = u.get("types", {}), g.get("categories", {})
        loss = final_losses(work / k) if work is not None else {}
        rows.append(f"| {k} | {r['experiment']['title']} | {r['steps']} | {f(loss.get('loss_und'))} | {f(t.get('pope'))} | "
                    f"{f(u.get('accuracy'))} | {f(t.get('colour'))} | {f(t.get('shape'))} | {f(t.get('count'))} | "
                    f"{f(t.get('position'))} | {f(t.get('describe'))} | {f(loss.get('loss_gen'))} | {f(g.get('overall'))} | "
                    f"{f(cats.get('single_object'))} | {f(cats.get('position'))} | {f(cats.get('color_attr'))} |")
    return "\n".join(rows)
