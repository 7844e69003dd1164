"""GRPO on the miniature world: the default model rewarded by the world's judge, on training prompts only
(held-out combinations are never asked), scored on the test split before and after.

    januskit world rl --work runs/rl                 # from the bundled default model
    januskit world rl --model M --work W --steps 300 --lr 3e-5 --logprob cond

The work folder holds the run (`rl/`, resumable: a rerun continues it), `curve.jsonl` (GenEval-style on
the val split at every kept checkpoint, for the reward-and-GenEval-against-steps plot `curve.png`),
`report.json` (test split before / after: GenEval-style by category, held-out vs seen, QA, POPE; the
README prompt's 4 images; diversity: distinct images per prompt and the mean share of tokens in which two
images of one prompt differ) and `grid-before.png` / `grid-after.png` (the same prompts and seeds).

With `prompts = "world_edit"` (`januskit world rl --edits`) the run is GRPO on the world's edit tasks
(training combinations only), rewarded by `world_edit` (the exact target scene) unless told otherwise; the
curve is then the val split's edit accuracy, and the report adds the test split's edits (all 300, by task,
held-out against seen) and `grid-edits-before.png` / `grid-edits-after.png`.
"""
from __future__ import annotations

import itertools
import json
import logging
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..checkpoint.official_config import detect_arch, read_config_json
from ..eval.grid import edit_grid, verdict_grid
from ..eval.world import EvalSettings, eval_edits, eval_generation, evaluate, test_split
from ..train.checkpoints import list_checkpoints
from ..train.config import RunConfig
from ..train.plot import plot_panels, read_metrics
from ..train.trainer import fastest_autocast, train
from ..world.dataset import read_prompts
from ..world.judge import detect, score
from ..world.prompts import Prompt

log = logging.getLogger("januskit.world")

README_PROMPT = Prompt("color_position", "a red circle to the left of a blue square",
                       (("red", "circle"), ("blue", "square")), relation="left of")


@dataclass(frozen=True)
class RLPlan:
    steps: int = 200
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 2e-5
    kl_weight: float = 0.04
    clip: float = 0.2
    logprob: str = "cfg"
    rewards: tuple[tuple[str, float], ...] = (("world", 1.0),)
    prompts: str = "world"  # or "world_edit": the world's edit tasks (then `categories` names tasks)
    cfg_image: float | None = None  # edits: the image guidance weight of the rollouts (None: 1.5)
    # prompt categories drawn from, uniformly over this list (a name twice is drawn twice as often); None = all six
    categories: tuple[str, ...] | None = None
    cfg_weight: float | None = None  # CFG of the rollouts; None = the source model's guidance_scale
    sde_steps: int = 10  # JanusFlow only (Flow-GRPO): SDE steps per rollout
    noise_level: float = 0.7  # JanusFlow only: the SDE's noise level a
    temperature: float = 1.0
    eval_every: int = 50  # steps between val-split GenEval points of the curve (checkpoints kept for it)
    val_prompts_per_category: int | None = None  # the curve's val subset (None: all 10 a category, 2 images each)
    micro_batch_size: int = 32
    threads: int = 2
    autocast: str = "auto"  # bf16 where the CPU has it natively
    seed: int = 0


def rl_run_config(plan: RLPlan, source: Path, out: Path, autocast: str | None = None) -> RunConfig:
    """`autocast`: as given (a build's pinned choice); None = the plan's ("auto": this CPU's fastest)."""
    if autocast is None:
        autocast = fastest_autocast() if plan.autocast == "auto" else plan.autocast
    flow = detect_arch(read_config_json(source / "config.json"), str(source / "config.json")) == "janusflow"
    algorithm = {"algorithm": "flow_grpo", "sde_steps": plan.sde_steps, "noise_level": plan.noise_level} if flow \
        else {"algorithm": "grpo", "logprob": plan.logprob, "temperature": plan.temperature}
    return RunConfig.from_dict({
        "model": {"source": str(source)},
        "stage": {"name": "janusflow/rl" if flow else "janus-pro/rl", "steps": plan.steps,
                  "batch_size": plan.prompts_per_step, "lr": plan.lr},
        "train": {"out": str(out), "micro_batch_size": plan.micro_batch_size, "threads": plan.threads,
                  "autocast": autocast, "seed": plan.seed,
                  "log_every": 1, "save_every": plan.eval_every, "keep_last": plan.steps // plan.eval_every + 1,
                  "export_dtype": "float32", "progress": True},
        "rl": {**algorithm, "group_size": plan.group_size, "kl_weight": plan.kl_weight, "clip": plan.clip,
               "prompts": plan.prompts,
               **({} if plan.cfg_image is None else {"cfg_image": plan.cfg_image}),
               "rewards": dict(plan.rewards),
               **({} if plan.categories is None else {"prompt_categories": list(plan.categories)}),
               **({} if plan.cfg_weight is None else {"cfg_weight": plan.cfg_weight})},
    }, where="recipe rl")


def _at_checkpoint(source: Path, ckpt: Path):
    """The source model's pipeline with a checkpoint's weights (the checkpoint folder has no tokenizer)."""
    import januskit

    pipe = januskit.load(source)
    pipe.model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    return pipe


def val_geneval(pipe, per_category: int | None = None) -> float:
    prompts = read_prompts(test_split(None, "val") / "prompts.jsonl")
    if per_category is not None:
        prompts = [p for cat in dict.fromkeys(q.category for q, _ in prompts)
                   for p in [x for x in prompts if x[0].category == cat][:per_category]]
    return eval_generation(pipe, prompts, EvalSettings(images_per_prompt=2))["overall"]


def val_edits(pipe, images_per_edit: int = 4, cfg_image: float | None = None) -> float:
    """Edit accuracy on the val split's edits (5 per task), the curve's figure for an edit run."""
    split = test_split(None, "val")
    rows = [json.loads(x) for x in (split / "edits.jsonl").read_text().splitlines() if x.strip()]
    s = EvalSettings(images_per_prompt=images_per_edit, cfg_image=cfg_image)
    return eval_edits(pipe, split, rows, s)["overall"]


def diversity(pipe, prompts: list[Prompt], n: int = 4, seed: int = 0) -> dict[str, float]:
    """Over `prompts`, n images each from seeds (seed, i): the share of distinct images and the mean share of
    image tokens (Janus; JanusFlow: of pixels, by more than 16 levels in a channel) in which two images of one
    prompt differ (0 = collapsed to one image)."""
    distinct, differ = [], []
    for p in prompts:
        out = pipe.generate_images(p.text, n=n, seed=seed)
        tokens = getattr(out, "tokens", None)
        if tokens is not None:
            xs = [t for t in tokens]
            diff = lambda a, b: float((a != b).float().mean())  # noqa: E731
        else:
            xs = [torch.from_numpy(np.asarray(im, dtype=np.int16)) for im in out.images]
            diff = lambda a, b: float(((a - b).abs() > 16).any(-1).float().mean())  # noqa: E731
        distinct.append(len({x.numpy().tobytes() for x in xs}) / n)
        differ += [diff(xs[a], xs[b]) for a, b in itertools.combinations(range(n), 2)]
    return {"distinct_images": float(np.mean(distinct)), "token_difference": float(np.mean(differ))}


def readme_command(pipe) -> list[bool]:
    """The README's main command (4 images, seed 0) judged."""
    imgs = pipe.generate_images(README_PROMPT.text, n=4, seed=0).images
    return [bool(score(README_PROMPT, detect(np.asarray(im)))) for im in imgs]


def report_for(pipe, work: Path, name: str, settings: EvalSettings = EvalSettings()) -> dict[str, Any]:
    """Test split (`settings`: all of it by default), README command, diversity on the first 5 test prompts of
    each category, a grid."""
    images = work / f"images-{name}"
    shutil.rmtree(images, ignore_errors=True)
    rep = evaluate(pipe, None, settings, save_dir=images).to_json()
    verdict_grid(rep["generation"]["records"], images, settings.images_per_prompt, work / f"grid-{name}.png")
    prompts = read_prompts(test_split(None) / "prompts.jsonl")
    firsts = [p for cat in dict.fromkeys(q.category for q, _ in prompts)
              for p in [q for q, _ in prompts if q.category == cat][:5]]
    g = rep["generation"]
    out = {"geneval": g["overall"], "categories": g["categories"], "held_out_vs_seen": g["position_color_attr"],
           "qa": rep["understanding"]["accuracy"], "qa_types": rep["understanding"].get("types"),
           "pope": rep["understanding"].get("pope"), "readme": readme_command(pipe),
           "diversity": diversity(pipe, firsts)}
    if "edits" in rep:
        e = rep["edits"]
        edit_grid(e["records"], images / "edits", test_split(None), settings.images_per_prompt,
                  work / f"grid-edits-{name}.png")
        out["edits"] = {k: v for k, v in e.items() if k != "records"}
    return out


def run(source: str | Path, work: str | Path, plan: RLPlan = RLPlan(), *, evaluate_model: bool = True,
        eval_settings: EvalSettings = EvalSettings()) -> dict[str, Any]:
    import januskit

    source, work = Path(source), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(json.dumps(asdict(plan), indent=1) + "\n")
    out = work / "rl"
    cfg = rl_run_config(plan, source, out)
    if not (out / "model.safetensors").is_file():
        train(cfg, resume=bool(list_checkpoints(out / "checkpoints")))
    if not evaluate_model:
        return {}
    edits = plan.prompts == "world_edit"
    if edits and eval_settings.edits_per_task == 0:  # an edit run is scored on all the test split's edits
        eval_settings = replace(eval_settings, edits_per_task=None, cfg_image=plan.cfg_image)
    torch.set_num_threads(plan.threads)
    curve_path = work / "curve.jsonl"
    curve = {row["step"]: row for row in read_metrics(curve_path)}
    for step, ckpt in [(0, None)] + list_checkpoints(out / "checkpoints"):
        if step not in curve:
            pipe = januskit.load(source) if ckpt is None else _at_checkpoint(source, ckpt)
            if edits:
                curve[step] = {"step": step, "val_edits": val_edits(pipe, cfg_image=plan.cfg_image)}
            else:
                curve[step] = {"step": step, "val_geneval": val_geneval(pipe, plan.val_prompts_per_category)}
            log.info("rl: step %d: %s", step, json.dumps(curve[step]))
            with curve_path.open("a") as f:
                f.write(json.dumps(curve[step]) + "\n")
    metrics = read_metrics(out / "metrics.jsonl")
    window = 10  # the reward is noisy per step: a running mean over 10 steps
    reward = [(m["step"], float(np.mean([x["reward"] for x in metrics[max(0, i - window + 1):i + 1]])))
              for i, m in enumerate(metrics)]
    plot_panels([("train reward (10-step mean)", {"reward": reward}),
                 ("val edit accuracy", {"edits": [(s, r["val_edits"]) for s, r in sorted(curve.items())]}) if edits
                 else ("val GenEval-style", {"GenEval": [(s, r["val_geneval"]) for s, r in sorted(curve.items())]}),
                 ("KL to the reference", {"kl": [(m["step"], m["kl"]) for m in metrics]})],
                work / "curve.png", xlabel="RL step")
    path = work / "report.json"
    rep = json.loads(path.read_text()) if path.is_file() else {}
    for name, folder in (("before", source), ("after", out)):
        if name not in rep:
            rep[name] = report_for(januskit.load(folder), work, name, eval_settings)
            path.write_text(json.dumps(rep, indent=1) + "\n")
    return rep
