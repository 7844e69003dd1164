"""What the recipes share: a chain of training stages, each in its own work folder and skipped once
done (so an interrupted build continues where it stopped), and the final export and evaluation."""
from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.official import load_official_with_extras, save_janus
from ..train.checkpoints import PROVENANCE, list_checkpoints
from ..train.config import RunConfig

log = logging.getLogger("januskit.world")

DONE = "RECIPE_DONE"  # written last into a finished step's folder


def done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def mark_done(folder: Path, seconds: float | None = None) -> None:
    """Mark a step finished; `seconds` (the time it took) is kept in the marker for a resumed build's record."""
    (folder / DONE).write_text("" if seconds is None else json.dumps({"seconds": round(seconds, 1)}) + "\n")


def step_seconds(folder: Path, measured: float) -> float:
    """The time a finished step took when it ran (from its marker), else `measured` (this run's)."""
    try:
        return float(json.loads((folder / DONE).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return measured


def resumable(dst: Path, cfg: RunConfig) -> int:
    """The step an interrupted stage in `dst` can continue from: its newest complete checkpoint, if the run
    there was started with this very config (else 0: a changed recipe must not mix into old optimiser state)."""
    ckpts = list_checkpoints(dst / "checkpoints")
    if not ckpts:
        return 0
    try:
        # read back as a RunConfig, so a setting added since (at its default) does not count as a change
        old = RunConfig.from_dict(json.loads((dst / "run_config.json").read_text()))
        same = json.loads(json.dumps(old.to_dict())) == json.loads(json.dumps(cfg.to_dict()))
    except (OSError, ValueError, TypeError):
        same = False
    if not same:
        log.warning("%s: holds checkpoints up to step %d from another run config; the stage restarts", dst,
                    ckpts[-1][0])
        return 0
    return ckpts[-1][0]


def run_stages(work: Path, source: Path, stages: Iterable[tuple[str, Callable[[Path, Path], RunConfig]]],
               times: dict[str, float], ranks: int = 1) -> Path:
    """Train each (name, config) in turn into work/name, from the previous stage's output (the first
    from `source`); config(source, out) gives the run. A finished folder is kept; an unfinished one
    continues from its newest complete checkpoint when it was started with the same run config, else
    restarts. Each stage's seconds go into `times` (a continued stage: this run's part); returns the last
    folder. `ranks` > 1: each stage runs as that many data-parallel processes (train.parallel.spawn)."""
    from ..train import parallel
    from ..train.trainer import train

    for name, config in stages:
        dst = work / name
        t = time.perf_counter()
        if not done(dst):
            cfg = config(source, dst)
            resume = resumable(dst, cfg)
            if dst.exists() and not resume:
                shutil.rmtree(dst)
            s = cfg.resolved_stage()
            log.info("recipe: %s (%s, %d steps x %d samples, lr %g)%s", name, s.name, s.steps, s.batch_size, s.lr,
                     f", continued from step {resume}" if resume else "")
            if ranks > 1:
                parallel.spawn(functools.partial(train, resume=bool(resume)), ranks, cfg)
            else:
                train(cfg, resume=bool(resume))
            shutil.rmtree(dst / "checkpoints", ignore_errors=True)  # optimiser states: not needed downstream
            mark_done(dst, time.perf_counter() - t)
        times[name] = step_seconds(dst, time.perf_counter() - t)
        source = dst
    return source


def export_and_evaluate(source: Path, out: Path, world: Path | None, recipe_json: dict[str, Any], *,
                        dtype: torch.dtype = torch.float32, evaluate_model: bool = True, eval_settings: Any = None,
                        label: str = "recipe", files: dict[str, str] | None = None) -> Path:
    """The last stage's model in `dtype` into `out`, with its side files (tokenizer, processor
    configs, ...), its unused official entries, recipe.json and `files` (name -> text); then, with `evaluate_model`, the
    world evaluation (eval.json, and logged; `world` None: the default world's test split). Returns `out`."""
    model, extras = load_official_with_extras(source, torch.float32)
    # recipe.json is the history of this folder: the last stage's provenance.json (a work folder) stays behind
    save_janus(model.to(dtype), out, copy_from=source, extras=extras, overwrite=True, skip=(PROVENANCE,),
               files={"recipe.json": json.dumps(recipe_json, indent=1, default=str) + "\n", **(files or {})})
    if evaluate_model:
        import januskit
        from ..eval.world import EvalSettings, evaluate, format_report

        rep = evaluate(januskit.load(out), world, eval_settings or EvalSettings(), progress=True)
        (out / "eval.json").write_text(json.dumps(_summary(rep), indent=1) + "\n")
        log.info("%s: evaluation\n%s", label, format_report(rep))
    return out


def _summary(rep) -> dict[str, Any]:
    """The report without per-item records (those go to the eval command's --json)."""
    d = rep.to_json()
    for k in ("generation", "understanding", "edits"):
        if k in d:
            d[k] = {a: b for a, b in d[k].items() if a != "records"}
    return d
