"""The edit model's recipe (januskit.recipes.edit_model, `januskit world edit-model`) at smoke size, from the
bundled default model: an edit stage with the sources after the instruction, GRPO on the edit judge, an
evaluated folder that samples edits in the layout it was trained in."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import januskit
from januskit.checkpoint.official import load_janus
from januskit.cli import DEFAULT_MODEL, main
from januskit.eval.world import EvalSettings
from januskit.recipes.edit_model import EDIT_STAGE, EditRecipe, build_edit

TINY_EVAL = EvalSettings(images_per_prompt=1, prompts_per_category=1, questions_per_type=1, edits_per_task=1)


@pytest.fixture(scope="module")
def edit_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit-recipe")
    out = build_edit(root / "out", root / "work", DEFAULT_MODEL, EditRecipe().smoke(), eval_settings=TINY_EVAL)
    return out, root / "work"


def test_the_edit_recipe_trains_from_the_default_model_and_scores_edits(edit_build):
    out, work = edit_build
    for step in ("edit-sft", "edit-rl"):
        assert (work / step / "RECIPE_DONE").is_file(), step
    # The edit stage: the default model's data kinds plus edits, 2:1:2:5, the sources after the instruction.
    run = json.loads((work / "edit-sft" / "run_config.json").read_text())
    assert run["stage"]["ratio"] == [2, 1, 2, 5] and run["model"]["source"] == str(DEFAULT_MODEL)
    assert run["data"]["kinds"] == ["understanding", "text", "generation", "edit"]
    assert run["data"]["edit_layout"] == "sources_last"
    # GRPO ran on the edit tasks with the partial edit reward, from the edit stage's model.
    rl = json.loads((work / "edit-rl" / "run_config.json").read_text())
    assert rl["rl"]["prompts"] == "world_edit" and rl["rl"]["rewards"] == {"world_edit_partial": 1.0}
    assert rl["model"]["source"] == str(work / "edit-sft")
    # The folder samples edits as it was trained (layout) at the default model's CFG weight.
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"guidance_scale": 2.0, "edit_layout": "sources_last"}
    pipe = januskit.load(out)
    assert pipe.processor.edit_sources_last
    history = json.loads((out / "recipe.json").read_text())["edit_recipe"]
    assert history["source"] == str(DEFAULT_MODEL) and history["edit_layout"] == "sources_last"
    assert history["stage"]["steps"] == 2 and history["rl"]["steps"] == 2
    assert set(history["seconds"]) == {"edit-sft", "edit-rl"}
    assert (out / "components.json").read_text() == (DEFAULT_MODEL / "components.json").read_text()
    # Trained: the LLM moved; the VQ (its ids) did not.
    a, b = load_janus(DEFAULT_MODEL), load_janus(out)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a.language_model.state_dict()[q].float(), b.language_model.state_dict()[q].float())
    assert all(torch.equal(x.float(), y.float()) for x, y in zip(a.gen_vision_model.parameters(),
                                                                  b.gen_vision_model.parameters()))
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["edits"]["tasks"]) == {"recolour", "move", "add", "remove", "swap", "reshape"}
    assert ev["edits"]["edits"] == 6 and ev["edits"]["images"] == 6 and "ceiling" in ev["edits"]
    assert ev["generation"]["images"] == 6 and ev["understanding"]["questions"] == 6


def test_a_rerun_continues_instead_of_retraining(edit_build, tmp_path):
    out, work = edit_build
    weights = work / "edit-sft" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = build_edit(tmp_path / "again", work, DEFAULT_MODEL, EditRecipe().smoke(), evaluate_model=False)
    assert weights.stat().st_mtime_ns == before
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_edit_recipe_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"edit model: .*nowhere is not a model folder \(no config.json\)"):
        build_edit(tmp_path / "o", tmp_path / "w", tmp_path / "nowhere", EditRecipe().smoke())
    with pytest.raises(ValueError, match=r"EditRecipe.stage.ratio must have an edit weight \(4 entries\), got \(2, 1, 2\)"):
        EditRecipe(stage=dataclasses.replace(EDIT_STAGE, ratio=(2, 1, 2)))
    with pytest.raises(ValueError, match=r"EditRecipe.base.data must be 'fresh' .*got 'files'"):
        EditRecipe(base=dataclasses.replace(EditRecipe().base, data="files"))
    assert not (tmp_path / "o").exists()


def test_cli_edit_model_no_rl(tmp_path, capsys):
    """`januskit world edit-model --smoke --no-rl --no-eval`: the edit stage only."""
    assert main(["world", "edit-model", "--smoke", "--no-rl", "--no-eval", "--out", str(tmp_path / "o"),
                 "--work", str(tmp_path / "w")]) == 0
    assert f"miniature edit model written to {tmp_path / 'o'}" in capsys.readouterr().out
    assert (tmp_path / "w" / "edit-sft" / "RECIPE_DONE").is_file() and not (tmp_path / "w" / "edit-rl").exists()
    assert json.loads((tmp_path / "o" / "recipe.json").read_text())["edit_recipe"]["rl"] is None


def test_the_full_size_edit_stage_is_the_documented_training_command(tmp_path):
    """docs/editing.md measures the branch's stage as `januskit train configs/world-edit.toml --set
    data.edit_layout=sources_last --set stage.steps=3000 --set stage.horizon=3000`: the two must be one run."""
    from pathlib import Path

    from januskit.recipes.edit_model import edit_stage_config
    from januskit.train.config import load_run_config

    root = Path(__file__).resolve().parents[1]
    branch = edit_stage_config(DEFAULT_MODEL, tmp_path / "run", tmp_path / "world", EditRecipe()).to_dict()
    doc = load_run_config(root / "configs" / "world-edit.toml", [
        "data.edit_layout=sources_last", "stage.steps=3000", "stage.horizon=3000", f"train.out={tmp_path / 'run'}",
        f"model.source={DEFAULT_MODEL}"]).to_dict()
    assert branch["stage"] == doc["stage"] and branch["stage"]["steps"] == 3000
    assert branch["stage"]["ratio"] == [2, 1, 2, 5] and branch["data"]["edit_layout"] == "sources_last"
    for key in ("train", "lora", "flow", "rl", "model"):
        assert branch[key] == doc[key], key
    # The data tables differ only where the toml spells out a default (the seed, InstructPix2Pix's drop rates).
    diff = {k for k in set(branch["data"]) | set(doc["data"]) if branch["data"].get(k) != doc["data"].get(k)}
    assert diff <= {"seed", "edit_drop_text", "edit_drop_image", "edit_drop_both"}, diff
