"""GRPO on edits (januskit.train.rl with `prompts = "world_edit"`): the teacher-forced edit log-probs against
the edit sampler, the world's edit prompts and rewards, and the stage end to end with exact resume."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import januskit
from januskit.processing.edit import EditInputs
from januskit.processing.image import load_image
from januskit.sampling.image_ar import generate_image_tokens
from januskit.sampling.logits import row_generator
from januskit.train.rl.grpo import image_token_logits, image_token_logprobs
from januskit.train.rl.prompts import WorldEditPrompts, prompt_source
from januskit.train.rl.rewards import RewardPrompt, make_reward
from januskit.train.trainer import train
from januskit.world.edits import Edit, held_out_edits, scene_key
from januskit.world.judge import detect
from januskit.world.render import render

from train_helpers import PRESET, rl_config

DEFAULT_MODEL = Path(januskit.__file__).parent / "assets" / "default-model"
pytestmark = pytest.mark.filterwarnings("ignore:.*preset with RANDOM weights")


@pytest.fixture(scope="module")
def pipe():
    return januskit.load(PRESET, seed=3)


def _edit_rows(pipe, prompts: list[RewardPrompt], cfg_image: float) -> tuple[list[list[int]], EditInputs]:
    proc, tok = pipe.processor, pipe.processor.tokenizer
    ids = [proc.edit_prompt(p, 1) for p in prompts]
    srcs = [torch.stack([pipe.source_pixels(im) for im in p.meta["images"]]) for p in prompts]
    return ids, EditInputs(srcs, cfg_image, tok.image_id, tok.boi_id, tok.eoi_id)


def test_teacher_forced_edit_logits_are_the_edit_samplers(pipe):
    """Greedy two-condition decoding of two edits of different lengths: the guided teacher-forced logits pick
    every token the sampler picked; with both weights 1 the guided logits are the full row's ("cond"); a row's
    log-probs do not depend on its batch."""
    m, proc = pipe.model, pipe.processor
    src = WorldEditPrompts(seed=0)
    prompts = [src(0), src(3)]
    ids, e = _edit_rows(pipe, prompts, cfg_image=1.7)
    assert len(ids[0]) != len(ids[1])
    toks = generate_image_tokens(m, ids, pad_id=proc.pad_id, cfg_weight=3.0, temperature=0, edit=e)
    with torch.no_grad():
        guided = image_token_logits(m, ids, toks, pad_id=proc.pad_id, cfg_weight=3.0, mode="cfg", edit=e)
        assert guided.shape == (2, m.config.vq.n_tokens, m.config.vq.codebook_size)
        assert torch.equal(guided.argmax(-1), toks)
        ones = EditInputs(e.sources, 1.0, e.image_id, e.boi_id, e.eoi_id)
        g1 = image_token_logits(m, ids, toks, pad_id=proc.pad_id, cfg_weight=1.0, mode="cfg", edit=ones)
        full = image_token_logits(m, ids, toks, pad_id=proc.pad_id, cfg_weight=1.0, mode="cond", edit=ones)
        assert torch.allclose(g1, full, atol=1e-4)
        # the sources matter: the same rows without them are another distribution
        plain = image_token_logits(m, ids, toks, pad_id=proc.pad_id, cfg_weight=3.0, mode="cond")
        assert not torch.allclose(full, plain, atol=1e-3)
        gens = [row_generator(0, i) for i in range(2)]
        toks = generate_image_tokens(m, ids, pad_id=proc.pad_id, cfg_weight=3.0, temperature=0.8, generators=gens,
                                     edit=e)
        for mode in ("cfg", "cond"):
            both, _ = image_token_logprobs(m, ids, toks, pad_id=proc.pad_id, cfg_weight=3.0, temperature=0.8,
                                           mode=mode, edit=e)
            one_e = EditInputs(e.sources[1:], 1.7, e.image_id, e.boi_id, e.eoi_id)
            one, _ = image_token_logprobs(m, ids[1:], toks[1:], pad_id=proc.pad_id, cfg_weight=3.0,
                                          temperature=0.8, mode=mode, edit=one_e)
            assert torch.allclose(both[1], one[0], atol=1e-4), mode


def test_world_edit_prompts_and_rewards():
    src = WorldEditPrompts(seed=0)
    drawn = [src(i) for i in range(120)]
    assert [str(p) for p in drawn[:10]] == [str(src(i)) for i in range(10)]  # a pure function of the index
    edits = [Edit.from_json(p.meta["edit"]) for p in drawn]
    assert {e.task for e in edits} == {"recolour", "move", "add", "remove", "swap", "reshape"}
    held = held_out_edits()
    assert not any(e.combination in held[e.task] for e in edits)  # training combinations only
    assert all(str(p) == e.instruction for p, e in zip(drawn, edits))
    # the source image is the source scene, as the judge reads it
    assert all(scene_key(detect(p.meta["images"][0])) == scene_key(e.source) for p, e in zip(drawn[:30], edits))
    only = WorldEditPrompts(seed=0, tasks=["move", "swap"])
    assert {only(i).meta["edit"]["task"] for i in range(40)} == {"move", "swap"}
    assert isinstance(prompt_source("world_edit", 0, ["add"]), WorldEditPrompts)
    with pytest.raises(ValueError, match=r"\['paint'\] for prompts = \"world_edit\": the edit tasks are recolour"):
        prompt_source("world_edit", 0, ["paint"])
    exact, partial = make_reward("world_edit"), make_reward("world_edit_partial")
    for p, e in list(zip(drawn, edits))[:24]:
        assert exact(p, render(e.target)) == 1.0 and partial(p, render(e.target)) == 1.0
        assert exact(p, render(e.source)) == 0.0
        want, got = Counter(scene_key(e.target)), Counter(scene_key(e.source))
        share = sum((want & got).values()) / max(sum(want.values()), sum(got.values()))
        assert partial(p, render(e.source)) == pytest.approx(0.5 * share)
    move = next(p for p, e in zip(drawn, edits) if e.task == "move" and len(e.source) == 2)
    assert partial(move, move.meta["images"][0]) == pytest.approx(0.25)  # one of two objects where it should be
    for name in ("world_edit", "world_edit_partial"):
        with pytest.raises(ValueError, match=rf"reward '{name}' needs the miniature world's edit .*world_edit"):
            make_reward(name)(RewardPrompt("make it blue"), render(edits[0].target))


def test_edit_grpo_stage_runs_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """GRPO on the world's edit prompts (two-condition rollouts): metrics every step, the image head moves, and
    a run killed after step 2 of 4 resumes to the same weights and metrics."""
    from januskit.train.rl import loop

    rl = {"prompts": "world_edit", "rewards": {"world_edit_partial": 1.0, "train_helpers:brightness": 0.1},
          "cfg_image": 1.3, "logprob": "cfg"}
    full = train(rl_config(tmp_path / "full", steps=4, save_every=2, rl=rl))
    lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(0 <= m["reward_world_edit_partial"] <= 1 for m in lines) and lines[-1]["kl"] > 0
    key = "gen_head.output_mlp_projector.weight"
    trained, start = januskit.load(full).model.state_dict(), januskit.load(PRESET, seed=0).model.state_dict()
    assert not torch.equal(trained[key], start[key])

    real = loop.optimizer_step
    calls = {"n": 0}

    def killed(cfg, t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(cfg, t)
    monkeypatch.setattr(loop, "optimizer_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train(rl_config(tmp_path / "resumed", steps=4, save_every=2, rl=rl))
    monkeypatch.setattr(loop, "optimizer_step", real)
    out = train(rl_config(tmp_path / "resumed", steps=4, save_every=2, rl=rl), resume=True)
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(full / "metrics.jsonl") == strip(out / "metrics.jsonl")


def test_edit_prompts_are_refused_where_they_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="cfg_image must be a finite number"):
        rl_config(tmp_path / "x", rl={"cfg_image": float("nan")})
    from januskit.train.rl.loop import Collector, edit_inputs

    texts = [RewardPrompt("a red circle"), WorldEditPrompts(0)(0)]
    c = Collector(None, None, None, lambda ims: torch.zeros(len(ims), 3, 8, 8))
    with pytest.raises(ValueError, match="mixes edit prompts .* and text prompts"):
        edit_inputs(texts, 2, januskit.load(PRESET, seed=0).processor, c, None, "grpo")
    with pytest.raises(ValueError, match="'flow_grpo' does not take edit prompts"):
        edit_inputs(texts[1:], 2, januskit.load(PRESET, seed=0).processor, Collector(None, None, None), None,
                    "flow_grpo")


def test_world_rl_recipe_on_edits(tmp_path):
    """`januskit world rl --edits` in miniature on the shipped model: the val curve is edit accuracy, the report
    holds the test split's edits by task (with held-out against seen) and both edit grids."""
    from januskit.eval.world import EvalSettings
    from januskit.recipes.rl_world import RLPlan, rl_run_config, run

    plan = RLPlan(steps=1, prompts_per_step=2, group_size=2, eval_every=1, threads=1, prompts="world_edit",
                  rewards=(("world_edit_partial", 1.0),), categories=("recolour", "move"), cfg_image=1.2)
    cfg = rl_run_config(plan, DEFAULT_MODEL, tmp_path / "x")
    assert (cfg.rl.prompts, cfg.rl.cfg_image, cfg.rl.prompt_categories) == ("world_edit", 1.2, ["recolour", "move"])
    small = EvalSettings(images_per_prompt=1, prompts_per_category=1, questions_per_type=1, edits_per_task=1)
    rep = run(DEFAULT_MODEL, tmp_path, plan, eval_settings=small)
    curve = [json.loads(x) for x in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [0, 1] and all(0 <= c["val_edits"] <= 1 and "val_geneval" not in c
                                                        for c in curve)
    for side in ("before", "after"):
        e = rep[side]["edits"]
        assert e["edits"] == 6 and set(e["tasks"]) == {"recolour", "move", "add", "remove", "swap", "reshape"}
        assert "records" not in e and set(e["held_out_vs_seen"]) <= {"held_out", "seen"}
        assert (tmp_path / f"grid-edits-{side}.png").is_file()


def test_rl_builds_edit_prompts_as_the_folder_model_reads_them(tmp_path):
    """The RL loop's processor follows the folder's generation_config.json (edit_layout, edit_source), as
    januskit.load does: a model trained with its sources last is rolled out with its sources last."""
    import shutil

    from januskit.train.rl.loop import _processor

    for name, settings in (("last", {"edit_layout": "sources_last"}), ("vq", {"edit_source": "vq"})):
        folder = tmp_path / name
        shutil.copytree(DEFAULT_MODEL, folder)
        (folder / "generation_config.json").write_text(json.dumps({"guidance_scale": 2.0, **settings}))
        pipe = januskit.load(folder)
        proc = _processor(str(folder), pipe.model)
        assert proc.edit_prompt("make the red circle blue", 1) == pipe.processor.edit_prompt("make the red circle blue", 1)
        assert (proc.edit_sources_last, proc.edit_source) == ((True, "understanding") if name == "last" else
                                                              (False, "vq"))
    plain = _processor(str(DEFAULT_MODEL), pipe.model)
    assert not plain.edit_sources_last and plain.edit_source == "understanding"


def test_a_prompts_file_can_hold_edits(tmp_path, pipe):
    """A .jsonl prompts file whose lines carry meta.images (paths relative to the file) gives edit prompts; the
    loop turns them into the sampler's sources; a missing or malformed source is named with its line."""
    from januskit.train.rl.loop import Collector, edit_inputs
    from januskit.train.rl.prompts import FilePrompts

    (tmp_path / "img").mkdir()
    src = WorldEditPrompts(0)(0)
    src.meta["images"][0].save(tmp_path / "img" / "a.png")
    f = tmp_path / "edits.jsonl"
    f.write_text(json.dumps({"prompt": str(src), "meta": {"images": ["img/a.png"]}}) + "\n")
    p = FilePrompts(f)(0)
    assert str(p) == str(src) and p.meta["images"] == [str(tmp_path / "img" / "a.png")]
    c = Collector(None, None, None, lambda ims: torch.stack([pipe.source_pixels(load_image(im)) for im in ims]))
    e = edit_inputs([p], 3, pipe.processor, c, 1.2, "grpo")
    want = pipe.source_pixels(src.meta["images"][0].convert("RGB"))
    assert len(e.sources) == 3 and e.sources[0] is e.sources[2] and torch.equal(e.sources[0][0], want)
    assert e.cfg_image == 1.2
    f.write_text('{"prompt": "x", "meta": {"images": ["img/a.png"]}}\n{"prompt": "y", "meta": {"images": ["nope.png"]}}\n')
    with pytest.raises(FileNotFoundError, match=r"edits.jsonl:2: source image .*nope.png: no such file"):
        FilePrompts(f)
    f.write_text('{"prompt": "x", "meta": {"images": "img/a.png"}}\n')
    with pytest.raises(ValueError, match=r"edits.jsonl:1: \"meta\".\"images\" must be a non-empty list"):
        FilePrompts(f)


def test_checkpoints_from_before_cfg_image_still_resume(tmp_path):
    """[rl] cfg_image unset is left out of the settings a checkpoint records (those written before the key
    existed match); set, it is recorded and a change refuses the resume. prompt_categories on a file is named."""
    from januskit.train.rl.loop import StepPosition

    old = {"algorithm": "grpo", "group_size": 8}
    assert StepPosition(old | {"cfg_image": None}).state_dict() == StepPosition(old).state_dict()
    StepPosition(old | {"cfg_image": None}).load_state_dict(StepPosition(old).state_dict())
    with pytest.raises(ValueError, match="cannot resume: the checkpoint's \\[rl\\] settings"):
        StepPosition(old | {"cfg_image": 2.0}).load_state_dict(StepPosition(old).state_dict())
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match='prompt_categories is for prompts = "world" or "world_edit"'):
        prompt_source(str(tmp_path / "p.txt"), 0, ["add"])
