"""The miniature world's edit model: the default model fine-tuned on the world's six edit tasks mixed with its
other data, then GRPO with the edit judge as the reward, then evaluated on all 300 test edits (docs/editing.md).
`januskit world edit-model` runs it.

Editing is a branch of the recipe, from the finished default model, not a kind mixed into the main chain: in
Stage III of a whole build (und:text:gen:edit 5:1:4:2) it reached 0.067 (docs/editing.md, "The rebuild"),
against 0.165 for this fine-tune of a model that already reads its pictures, and the default model stays the
one the main chain makes. The settings are the measured ones: `configs/world-edit.toml` with the sources after
the instruction (`edit_layout = "sources_last"`) and twice its steps (3,000: 0.240 against 1,500's 0.165), then
the edit GRPO run of docs/editing.md.

Every step has its own folder under `work/` (edit-sft, edit-rl) and is skipped when finished, so an interrupted
run continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..train.config import RunConfig
from .chain import export_and_evaluate, run_stages, step_seconds
from .default_model import Recipe, StagePlan, _recipe_json, pin_autocast, run_rl, stage_config
from .rl_world import RLPlan

# configs/world-edit.toml's stage at twice its steps: its edit loss was still falling at 1,500 (docs/editing.md).
EDIT_STAGE = StagePlan("edit-sft", "janus-pro/3", steps=3000, batch_size=32, lr=5e-4, warmup=50, ratio=(2, 1, 2, 5),
                       schedule="cosine", min_lr_ratio=0.1)
# docs/editing.md, "GRPO on edits": 150 steps of 8 edits x 8 images at LR 1e-4 took the test split from 0.154 to
# 0.179; the partial reward (the share of the target's objects right) gives groups something to rank.
EDIT_RL = RLPlan(steps=150, prompts_per_step=8, group_size=8, lr=1e-4, kl_weight=0.04, logprob="cond",
                 prompts="world_edit", rewards=(("world_edit_partial", 1.0),))


@dataclass(frozen=True)
class EditRecipe:
    # The main chain's settings the edit stage shares (threads, autocast, batches, captions, question layout, seed).
    base: Recipe = field(default_factory=Recipe)
    stage: StagePlan = EDIT_STAGE
    edit_layout: str = "sources_last"  # [data] edit_layout: the sources after the instruction
    rl: RLPlan | None = field(default_factory=lambda: EDIT_RL)

    def __post_init__(self) -> None:
        if len(self.stage.ratio or ()) != 4:
            raise ValueError(f"EditRecipe.stage.ratio must have an edit weight (4 entries), got {self.stage.ratio!r}")
        if self.base.data != "fresh":
            raise ValueError(f"EditRecipe.base.data must be 'fresh' (edits are drawn from fresh scenes), "
                             f"got {self.base.data!r}")

    def smoke(self) -> "EditRecipe":
        """Tiny budgets (tests, CI): the same steps."""
        return dataclasses.replace(
            self, base=self.base.smoke(),
            stage=dataclasses.replace(self.stage, steps=2, batch_size=8, warmup=0),
            rl=None if self.rl is None else dataclasses.replace(self.rl, steps=2, prompts_per_step=2, group_size=2,
                                                                 eval_every=1, micro_batch_size=8))


def edit_stage_config(source: Path, out: Path, world: Path, r: EditRecipe) -> RunConfig:
    """The main chain's stage config for the edit stage, with the edit layout."""
    cfg = stage_config(r.stage, source, out, world, r.base)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, options=cfg.data.options
                                                             | {"edit_layout": r.edit_layout}))


def build_edit(out: str | Path, work: str | Path, source: str | Path, recipe: EditRecipe = EditRecipe(), *,
               evaluate_model: bool = True, eval_settings: Any = None) -> Path:
    """The edit model from `source` (a default model folder) into `out`, its steps in `work`; with
    `evaluate_model`, eval.json scores all test edits as well as text-to-image and questions."""
    out, work, source = Path(out), Path(work), Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"edit model: {source} is not a model folder (no config.json)")
    work.mkdir(parents=True, exist_ok=True)
    base = pin_autocast(recipe.base, work / "autocast.json")
    recipe = dataclasses.replace(recipe, base=base)
    torch.set_num_threads(base.threads)
    world = work / "world"  # unused: fresh scenes need no written split (the evaluation reads the default world's)
    times: dict[str, float] = {}
    result = run_stages(work, source, [(recipe.stage.name, lambda s, d: edit_stage_config(s, d, world, recipe))],
                        times)
    if recipe.rl is not None:  # the main chain's GRPO step with the edit plan; rollouts at the model's own CFG
        t = time.perf_counter()
        result = run_rl(result, work / "edit-rl", dataclasses.replace(base, rl=recipe.rl), None)
        times["edit-rl"] = step_seconds(result, time.perf_counter() - t)
    if eval_settings is None:
        from ..eval.world import EvalSettings

        eval_settings = EvalSettings(edits_per_task=None)
    history = {"source": str(source), "edit_layout": recipe.edit_layout,
               "stage": dataclasses.asdict(recipe.stage), "rl": None if recipe.rl is None else dataclasses.asdict(recipe.rl),
               "base": _recipe_json(base, {}), "seconds": {k: round(v, 1) for k, v in times.items()}}
    files = {name: (source / name).read_text(encoding="utf-8") for name in ("components.json",)
             if (source / name).is_file()}
    return export_and_evaluate(result, out, None, {"edit_recipe": history},
                               dtype=getattr(torch, base.export_dtype), evaluate_model=evaluate_model,
                               eval_settings=eval_settings, label="edit model", files=files)
