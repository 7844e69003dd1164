"""The default-model recipe from scratch at smoke size (CI's whole-chain test), the world
evaluation on its output, and the Table 5 ablation's shared-encoder rewiring."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import januskit
from januskit.checkpoint.official import load_janus
from januskit.cli import main
from januskit.eval.world import EvalSettings, evaluate, format_report
from januskit.recipes.ablation import EXPERIMENTS, share_vq_encoder, steps_for
from januskit.recipes.default_model import Recipe, build
from reference_helpers import check_world_figures, greedy_answer

SMALL_EVAL = EvalSettings(images_per_prompt=1, prompts_per_category=1, questions_per_type=2)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("recipe")
    out = build(root / "out", root / "work", Recipe().smoke(), eval_settings=SMALL_EVAL)
    return out, root / "work"


@pytest.fixture(scope="module")
def flow_smoke(smoke) -> tuple[Path, Path, Path]:
    from januskit.recipes.janusflow import FlowRecipe, build_flow

    _, work = smoke
    out = build_flow(work.parent / "flow-out", work, FlowRecipe().smoke(), eval_settings=SMALL_EVAL)
    off = build_flow(work.parent / "flow-off", work, FlowRecipe().smoke(), repa=False, evaluate_model=False)
    return out, off, work


def test_flow_smoke_chain_reuses_the_shared_steps_and_evaluates(flow_smoke):
    """The miniature JanusFlow: VAE trained, SigLIP and the LLM copied from the Janus-Pro chain's
    text stage, three stages, an evaluated folder that generates; the REPA-off branch shares flow1."""
    out, off, work = flow_smoke
    for f in ("config.json", "model.safetensors", "tokenizer.json", "eval.json", "recipe.json", "vae/config.json"):
        assert (out / f).is_file(), f
    ev = json.loads((out / "eval.json").read_text())
    assert ev["settings"]["arch"] == "janusflow" and ev["settings"]["cfg"] == 2.0
    assert "vq" in ev["generation"]["judge"]  # the judge's ceiling through the VAE
    pipe = januskit.load(out)
    assert pipe.arch == "janusflow" and pipe.config.latent_shape == (4, 16, 16)
    assert pipe.generate_images("a red circle", steps=2).images[0].size == (64, 64)
    from januskit.checkpoint.official import load_official

    text, init = load_janus(work / "text"), load_official(work / "flow-init")
    assert all(torch.equal(a, b) for a, b in zip(text.vision_model.state_dict().values(),
                                                 init.vision_und_enc_model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(text.language_model.state_dict().values(),
                                                 init.language_model.state_dict().values()))
    f1 = load_official(work / "flow1")
    assert all(torch.equal(a, b) for a, b in zip(init.language_model.parameters(), f1.language_model.parameters()))
    assert (work / "flow2-norepa" / "RECIPE_DONE").is_file() and not (work / "flow1-norepa").exists()
    assert json.loads((off / "recipe.json").read_text())["repa"] is False
    on = json.loads((work / "flow2" / "metrics.jsonl").read_text().splitlines()[-1])
    no = json.loads((work / "flow2-norepa" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_repa" in on and "loss_repa" not in no


def _params(model, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_smoke_chain_writes_a_loadable_evaluated_model(smoke):
    out, work = smoke
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "eval.json",
              "recipe.json", "components.json"):
        assert (out / f).is_file(), f
    proc = json.loads((out / "processor_config.json").read_text())
    assert proc["system_prompt"] == "" and proc["image_placement"] == "after"  # question first, as it learnt
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["generation"]["categories"]) == {"single_object", "two_object", "counting", "colors", "position",
                                                  "color_attr"}
    assert ev["understanding"]["questions"] == 12 and "pope" in ev["understanding"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert [s["name"] for s in recipe["stages"]] == ["stage1", "stage2", "stage3"]  # no text stage
    assert recipe["question_first"] is True and recipe["turns"] == 1
    assert recipe["rl"]["steps"] == 2 and recipe["rl"]["logprob"] == "cond"
    # GRPO samples at the weight chosen for Stage III's model; the weight chosen again after it is the folder's,
    # and the one its evaluation used.
    first = json.loads((work / "cfg-choice.json").read_text())["chosen"]
    assert json.loads((work / "rl" / "run_config.json").read_text())["rl"]["cfg_weight"] == first
    choice = json.loads((work / "cfg-choice-rl.json").read_text())
    assert set(choice["val_geneval"]) == {str(float(w)) for w in Recipe().cfg_candidates}
    best = max(choice["val_geneval"].values())
    assert choice["val_geneval"][str(choice["chosen"])] == best
    assert json.loads((out / "generation_config.json").read_text()) == {"guidance_scale": choice["chosen"]}
    assert ev["settings"]["cfg"] == choice["chosen"]
    pipe = januskit.load(out)
    assert pipe.default_cfg_weight == choice["chosen"]
    assert pipe.dtype == torch.float32 and pipe.config.vq.image_size == 64
    img = pipe.generate_images("a red circle", n=1, seed=0).images[0]
    assert img.size == (64, 64)
    q = "What is in this image?"
    assert pipe.chat(q, images=[img], max_new_tokens=4) == greedy_answer(pipe, q, 4, [img])


def test_each_stage_trains_exactly_its_parts(smoke):
    """VQ: trained in the components step, frozen after. SigLIP: frozen until Stage III. LLM: frozen
    in Stage I. Adaptors: trained from Stage I."""
    _, work = smoke
    m = {s: load_janus(work / s, torch.float32) for s in ("components", "stage1", "stage2", "stage3")}
    same = lambda a, b, p: all(torch.equal(x, y) for x, y in zip(_params(m[a], p).values(), _params(m[b], p).values()))  # noqa: E731
    assert all(same("components", s, "gen_vision_model.") for s in ("stage1", "stage2", "stage3"))
    assert same("components", "stage2", "vision_model.") and not same("stage2", "stage3", "vision_model.")
    # the LLM starts untrained at Stage I (no text stage) and stays frozen in it
    assert same("components", "stage1", "language_model.") and not same("stage1", "stage2", "language_model.")
    assert not same("components", "stage1", "gen_head.") and not same("components", "stage1", "aligner.")
    # Each stage folder keeps its own run records (an export once copied the source stage's over them).
    for s, name in (("stage1", "janus-pro/1"), ("stage2", "janus-pro/2"), ("stage3", "janus-pro/3")):
        assert json.loads((work / s / "run_config.json").read_text())["stage"]["name"] == name
        rows = [json.loads(x) for x in (work / s / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2]  # smoke stages: 2 steps, logged every 10 and at the end
        assert (rows[-1]["loss_text"] is None) == (s == "stage1") and rows[-1]["loss_gen"] is not None
    # The GRPO step: 2 steps of 2 prompts x 2 images, rewarded by the world's judge, on the drawing parts only
    # (the understanding side and the text head stay Stage III's).
    rl = load_janus(work / "rl", torch.float32)
    assert json.loads((work / "rl" / "run_config.json").read_text())["stage"]["name"] == "janus-pro/rl"
    rows = [json.loads(x) for x in (work / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["images"] == 4 and "reward_world" in r for r in rows)
    for p in ("vision_model.", "aligner.", "gen_vision_model.", "language_model.lm_head."):
        assert all(torch.equal(x, y) for x, y in zip(_params(m["stage3"], p).values(), _params(rl, p).values())), p
    assert not (work / "rl" / "checkpoints").exists() and (work / "rl" / "RECIPE_DONE").is_file()


def test_rerun_continues_and_is_deterministic(smoke, tmp_path):
    out, work = smoke
    again = build(tmp_path / "again", work, Recipe().smoke(), evaluate_model=False)  # every step is done: reuse
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # a continued build reports the time each step took when it ran (kept in its RECIPE_DONE), not ~0
    first, second = (json.loads((d / "recipe.json").read_text())["seconds"] for d in (out, again))
    for step in ("world", "components", "stage1", "stage2", "stage3", "rl"):
        assert second[step] == first[step] > 0, step
    # the exported model's layout is the recipe's, whatever the reused components' file says
    other = build(tmp_path / "other", work, dataclasses.replace(Recipe().smoke(), question_first=False),
                  evaluate_model=False)
    assert "image_placement" not in json.loads((other / "processor_config.json").read_text())
    assert json.loads((work / "components" / "processor_config.json").read_text())["image_placement"] == "after"


def test_an_interrupted_stage_continues_from_its_checkpoint(smoke, tmp_path, monkeypatch, caplog):
    """A build killed in the middle of a stage goes on from the stage's newest checkpoint (not from its step 0),
    and ends with the same weights as the build that was never interrupted; a checkpoint from another run
    config is not mixed in."""
    import shutil

    import januskit.recipes.default_model as dm
    import januskit.train.trainer as trainer
    from januskit.recipes.chain import resumable

    out, work = smoke
    mine = tmp_path / "work"
    for step in ("world", "components", "stage1"):
        shutil.copytree(work / step, mine / step)
    shutil.copy(work / "autocast.json", mine / "autocast.json")

    plain_config = dm.stage_config

    def every_step(*a, **k):
        cfg = plain_config(*a, **k)
        cfg.train.save_every = 1
        return cfg

    class Killed(Exception):
        pass

    plain_save = trainer.save_checkpoint

    def save_then_die(root, step, *a, **k):
        plain_save(root, step, *a, **k)
        if root.parent.name == "stage2" and step == 1:
            raise Killed

    monkeypatch.setattr(dm, "stage_config", every_step)
    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        build(tmp_path / "out", mine, Recipe().smoke(), evaluate_model=False)
    stage2 = mine / "stage2"
    assert not (stage2 / "RECIPE_DONE").exists() and (stage2 / "checkpoints" / "step-00000001").is_dir()

    recipe = Recipe().smoke()
    plan = next(p for p in recipe.stages if p.name == "stage2")
    cfg = every_step(plan, mine / "stage1", stage2, mine / "world", recipe)
    assert resumable(stage2, cfg) == 1
    other = every_step(dataclasses.replace(plan, lr=plan.lr / 2), mine / "stage1", stage2, mine / "world", recipe)
    with caplog.at_level("WARNING", logger="januskit.world"):
        assert resumable(stage2, other) == 0
    assert "holds checkpoints up to step 1 from another run config; the stage restarts" in caplog.text

    monkeypatch.setattr(trainer, "save_checkpoint", plain_save)
    with caplog.at_level("INFO", logger="januskit.train"):
        again = build(tmp_path / "out", mine, recipe, evaluate_model=False)
    assert "stage janus-pro/2: 2 steps from step 1;" in caplog.text
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_the_vq_decoder_step_changes_only_the_decoder(smoke, tmp_path):
    """Recipe.vq_decoder_steps > 0: after the LLM stages, the VQ's decoder side (post_quant_conv, decoder) trains
    on the VQ's images with empty canvases mixed in; every other weight is Stage III's, so every image keeps
    its ids. The step has its folder and report, the exported components.json carries the report, and bad
    settings are refused before anything runs."""
    import shutil

    from januskit.recipes.default_model import decoder_images

    _, work = smoke
    mine = tmp_path / "work"
    for step in ("world", "components", "stage1", "stage2", "stage3"):
        shutil.copytree(work / step, mine / step)
    shutil.copy(work / "autocast.json", mine / "autocast.json")
    recipe = dataclasses.replace(Recipe(vq_decoder_steps=3, vq_decoder_empty=0.5).smoke(), rl=None, cfg_candidates=())
    assert recipe.vq_decoder_steps == 2  # smoke size
    out = build(tmp_path / "out", mine, recipe, evaluate_model=False)
    step = mine / "vq-decoder"
    assert (step / "RECIPE_DONE").is_file() and not (step / "metrics.jsonl").exists()
    report = json.loads((step / "vq_decoder.json").read_text())
    assert report["last"]["step"] == 2 and set(report["empty_canvas"]) == {"before", "after"}
    assert json.loads((out / "components.json").read_text())["vq_decoder"] == report
    a, b = load_janus(mine / "stage3", torch.float32).state_dict(), load_janus(step, torch.float32).state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(("gen_vision_model.decoder.", "gen_vision_model.post_quant_conv."))
                           for k in changed)
    assert json.loads((out / "recipe.json").read_text())["vq_decoder_steps"] == 2
    # its images: the VQ's own, with the share of empty canvases the recipe asks for
    images = decoder_images(mine / "world", recipe)
    blank = (images == 1).flatten(1).all(1)
    assert images.shape[1:] == (3, 64, 64) and 0 < len(images) <= recipe.component_images
    assert 0.3 < blank.float().mean() < 0.7
    for bad, msg in ((dict(vq_decoder_steps=-1), "vq_decoder_steps must be >= 0"),
                     (dict(vq_decoder_empty=1.5), r"vq_decoder_empty in \[0, 1\] \(got 1.5\)")):
        with pytest.raises(ValueError, match=msg):
            build(tmp_path / "bad", tmp_path / "bad-work", dataclasses.replace(recipe, **bad), evaluate_model=False)
    assert not (tmp_path / "bad-work").exists()


def test_from_scratch_elsewhere_is_bit_identical(smoke, tmp_path):
    """The whole chain again, in another folder: same weights, byte for byte (no per-sample choice
    may depend on where the dataset lives)."""
    out, _ = smoke
    again = build(tmp_path / "out", tmp_path / "work", Recipe().smoke(), evaluate_model=False)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_eval_world_cli_json(smoke, capsys):
    out, _ = smoke
    assert main(["eval", "world", "--model", str(out), "--json", "--images-per-prompt", "1",
                 "--prompts-per-category", "1", "--questions-per-type", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["generation"]["images"] == 6 and len(rep["generation"]["records"]) == 6
    assert rep["understanding"]["questions"] == 6
    g = rep["generation"]
    check_world_figures(g, rep["understanding"])
    # build() evaluated the same folder with the same generation settings (SMALL_EVAL): the same images, scores
    ev = json.loads((out / "eval.json").read_text())["generation"]
    assert len(g["categories"]) == 6 and (g["categories"], g["overall"]) == (ev["categories"], ev["overall"])
    # After 2 steps a stage the smoke model draws no recognisable scene and answers no question right (its
    # answers are its stop token or runs of a word or two: "", "left left ...", "blue left blue ...").
    assert g["overall"] == 0.0 and rep["understanding"]["accuracy"] == 0.0
    assert all(len(set(r["model"].split())) <= 2 for r in rep["understanding"]["records"])
    assert main(["eval", "world", "--model", str(out), "--world", str(out / "nowhere")]) == 2
    assert "nowhere/test/prompts.jsonl: missing" in capsys.readouterr().err


def test_eval_subsets_are_prefixes_of_the_full_run(smoke):
    """Image j of prompt i depends only on (seed, i, j): a subset scores the same images."""
    out, work = smoke
    pipe = januskit.load(out)
    a = evaluate(pipe, work / "world", EvalSettings(images_per_prompt=2, prompts_per_category=1, batch=1),
                 understanding=False)
    b = evaluate(pipe, work / "world", EvalSettings(images_per_prompt=2, prompts_per_category=1, batch=5),
                 understanding=False)
    assert a.generation["records"] == b.generation["records"]
    assert "overall" in format_report(a)


def test_shared_vq_encoder_feeds_vq_token_embeddings(smoke):
    out, _ = smoke
    pipe = januskit.load(out)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    model = share_vq_encoder(pipe.model)
    with torch.no_grad():
        want = model.gen_embeds(model.gen_vision_model.encode(x))
        assert torch.equal(model.image_embeds(x), want)
        # What the LLM sees (training's splice and mixed_embeds, chat's splice): the VQ-token embeddings at
        # the placeholders, not SigLIP's features, and the text embeddings elsewhere.
        ids = torch.randint(0, 100, (2, 70))
        und = torch.zeros(2, 70, dtype=torch.bool)
        und[:, 3:67] = True
        none = torch.zeros_like(und)
        for h in (model.splice(ids, und, x), model.mixed_embeds(ids, und, x, none, ids)):
            assert torch.equal(h[und].view(want.shape), want)
            assert torch.equal(h[~und], model.text_embeds(ids)[~und])
        assert not torch.allclose(model.aligner(model.vision_model(x)), want)  # SigLIP's would differ
    assert want.shape == (2, 64, pipe.config.llm.dim)


def test_ablation_budgets_match_per_task_samples():
    by = {e.key: e for e in EXPERIMENTS}
    assert steps_for(by["A"], 400) == steps_for(by["B"], 400) == 400
    assert steps_for(by["C"], 400) == 200  # und share 2/5 instead of 2/10: half the steps, same und samples
    assert steps_for(by["D"], 400) == 320  # gen share 5/8 instead of 5/10


def test_cosine_plan_on_a_stage_with_a_long_horizon_decays_over_its_own_steps(tmp_path):
    """janus-pro/2 carries the paper's 360K-step horizon; a plan with a cosine of its own must reach
    zero at its own last step (the ablation's runs), not stay flat."""
    from januskit.train.stages import lr_multiplier
    from januskit.recipes.default_model import StagePlan, stage_config

    plan = StagePlan("A", "janus-pro/2", steps=1500, batch_size=32, lr=2e-3, warmup=50, schedule="cosine")
    stage = stage_config(plan, tmp_path / "s", tmp_path / "o", tmp_path / "w", Recipe()).resolved_stage()
    assert stage.horizon == 1500
    assert lr_multiplier(775, stage) == pytest.approx(0.5, abs=1e-3)  # half-way through the decay
    assert lr_multiplier(1499, stage) == pytest.approx(0.0, abs=1e-5)


def test_ablation_table_reads_final_losses(tmp_path):
    from januskit.recipes.ablation import final_losses, format_table

    run = tmp_path / "B"
    run.mkdir()
    rows = [{"step": s, "loss_und": 1.0 if s <= 100 else 0.5, "loss_gen": 3.0 if s <= 100 else 2.0}
            for s in range(10, 260, 10)]  # the window is steps 110..250: only the later values count
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loss = final_losses(run)
    assert loss["loss_und"] == pytest.approx(0.5) and loss["loss_gen"] == pytest.approx(2.0)
    res = {"experiment": {"title": "decoupled"}, "steps": 250,
           "understanding": {"accuracy": 0.5, "types": {"pope": 0.6, "colour": 0.7}},
           "generation": {"overall": 0.25, "categories": {"position": 0.1}}}
    table = format_table({"B": res}, tmp_path).splitlines()
    assert table[2] == ("| B | decoupled | 250 | 0.500 | 0.600 | 0.500 | 0.700 | – | – | – | – | 2.000 | 0.250 | – | "
                        "0.100 | – |")


def test_stage_plans_reach_the_trainer_config(tmp_path):
    """The recipe's schedule and autocast choices land in the run config the trainer reads, and the
    default recipe's LLM stages keep the paper's Stage II : III LR ratio (1e-4 : 4e-5)."""
    from januskit.train.stages import lr_multiplier
    from januskit.train.trainer import fastest_autocast
    from januskit.recipes.default_model import StagePlan, stage_config

    r = Recipe()
    last = stage_config(r.stages[-1], tmp_path / "src", tmp_path / "out", tmp_path / "world", r)
    stage = last.resolved_stage()
    assert (stage.name, stage.schedule, stage.min_lr_ratio, stage.steps) == ("janus-pro/3", "cosine", 0.0, 4800)
    assert last.train.autocast == fastest_autocast() and last.train.threads == 2 and last.train.attention == "segments"
    # Fresh scenes with the v3 captions and one question a conversation, asked before the image; or the written
    # split's files.
    assert last.data.builder == "januskit.train.data.fresh:build"
    assert {k: last.data.options[k] for k in ("captions", "turns", "seed", "question_first")} == \
        {"captions": "v3", "turns": 1, "seed": 0, "question_first": True}
    files = stage_config(r.stages[-1], tmp_path, tmp_path / "o", tmp_path / "world",
                         dataclasses.replace(r, data="files", question_first=False)).data
    assert files.builder == "januskit.train.data.loader:build"
    assert files.options["generation"] == str(tmp_path / "world" / "train" / "generation-vq.jsonl")
    with pytest.raises(ValueError, match="Recipe.data: 'cached'"):
        stage_config(r.stages[-1], tmp_path, tmp_path / "o", tmp_path, dataclasses.replace(r, data="cached"))
    # question_first reaches the fresh builder only when on (image-first builds' configs as they were)
    if_ = dataclasses.replace(r, question_first=False)
    assert "question_first" not in stage_config(r.stages[-1], tmp_path, tmp_path / "o", tmp_path, if_).data.options
    qf = r
    with pytest.raises(ValueError, match="question_first needs data 'fresh'"):
        stage_config(r.stages[-1], tmp_path, tmp_path / "o", tmp_path, dataclasses.replace(qf, data="files"))
    assert lr_multiplier(stage.steps - 1, stage) == pytest.approx(0.0, abs=1e-5)  # annealed to 0
    by = {p.name: p for p in r.stages}
    assert by["stage2"].lr / by["stage3"].lr == pytest.approx(1e-4 / 4e-5)
    plain = stage_config(StagePlan("x", "janus-pro/2", steps=5, batch_size=4, lr=1e-3), tmp_path, tmp_path / "o",
                         tmp_path, r).resolved_stage()
    assert plain.schedule == "constant"  # no schedule given: the stage's own


def test_build_pins_its_autocast_so_a_resume_elsewhere_goes_on_alike(tmp_path, monkeypatch, caplog):
    """"auto" is resolved once per build (bf16 where the CPU has it natively) and kept in work/autocast.json:
    a resume on a CPU that would choose otherwise keeps the first choice, and says so; an explicit dtype is
    never overridden by an old record of "auto"."""
    from januskit.recipes import default_model as dm

    record = tmp_path / "autocast.json"
    monkeypatch.setattr(dm, "fastest_autocast", lambda: "bfloat16")
    assert dm.pin_autocast(Recipe(), record).autocast == "bfloat16"
    assert json.loads(record.read_text()) == {"asked": "auto", "autocast": "bfloat16"}
    monkeypatch.setattr(dm, "fastest_autocast", lambda: "none")  # resumed on an AVX2-only CPU
    with caplog.at_level("WARNING"):
        assert dm.pin_autocast(Recipe(), record).autocast == "bfloat16"
    assert "began with autocast 'bfloat16'" in caplog.text and "would choose 'none'" in caplog.text
    assert dm.pin_autocast(dataclasses.replace(Recipe(), autocast="none"), record).autocast == "none"
    assert json.loads(record.read_text()) == {"asked": "none", "autocast": "none"}
    assert dm.resolve_autocast("auto") == "none" and dm.resolve_autocast("bfloat16") == "bfloat16"


def test_siglip_variant_groups_are_minimal_contrasts_of_train_scenes(smoke):
    """Recipe.siglip_variants: SigLIP's data as groups of a train scene and its variants (rendered, described),
    group ids consecutive, at most k + 1 a group, every caption of a group distinct; the VQ's images unchanged."""
    from januskit.config import preset
    from januskit.processing.tokenizer import TextTokenizer
    from januskit.recipes.default_model import _component_data

    _, work = smoke
    c, tok = preset("mini-janus-pro"), TextTokenizer.from_file(work / "components" / "tokenizer.json")
    plain = _component_data(work / "world", 20, c, tok)
    pixels, gen, captions, groups, _ = _component_data(work / "world", 20, c, tok, 3, 0)
    assert plain[3] is None and len(pixels) == len(captions) == len(groups) == 20
    assert torch.equal(gen, plain[1]) and torch.equal(pixels[0], plain[0][0])  # a group starts with the scene
    assert groups == sorted(groups) and max(groups.count(g) for g in groups) <= 4 and groups[:4] == [0, 0, 0, 0]
    for g in set(groups):
        caps = [tuple(captions[i]) for i in range(20) if groups[i] == g]
        assert len(set(caps)) == len(caps)
    assert _component_data(work / "world", 20, c, tok, 3, 0)[2] == captions  # seeded


def test_cfg_choice_after_grpo_keeps_the_rollout_weight_unless_beaten_beyond_noise(tmp_path, monkeypatch):
    """Val scores over 60 prompts x 2 images move by ~0.045 by chance: the weight GRPO was trained at stays
    unless another beats it by more than that; without a weight to keep the best score wins."""
    import januskit.eval.world as ew
    from januskit.recipes.default_model import choose_cfg_weight

    world = tmp_path / "world"
    (world / "val").mkdir(parents=True)
    row = {"category": "single_object", "text": "a red circle", "items": [["red", "circle"]]}
    (world / "val" / "prompts.jsonl").write_text("\n".join(json.dumps(row) for _ in range(60)) + "\n")
    scores = {1.0: 0.542, 2.0: 0.592, 5.0: 0.608}
    monkeypatch.setattr(januskit, "load", lambda source: None)
    monkeypatch.setattr(ew, "eval_generation", lambda pipe, prompts, s: {"overall": scores[s.cfg_weight]})
    cands = (1.0, 2.0, 5.0)
    assert choose_cfg_weight(tmp_path, world, cands, tmp_path / "a.json") == 5.0
    assert choose_cfg_weight(tmp_path, world, cands, tmp_path / "b.json", keep=2.0) == 2.0
    assert json.loads((tmp_path / "b.json").read_text())["chosen"] == 2.0
    scores[5.0] = 0.70  # 0.108 better: beyond one standard error (0.045), so it wins
    assert choose_cfg_weight(tmp_path, world, cands, tmp_path / "c.json", keep=2.0) == 5.0


def test_recipe_vq_norm_builds_a_local_vq_that_loads_and_refuses_hf_conversion(smoke, tmp_path, capsys):
    """Recipe.vq_norm = "branch" with vq.attention = False (the tokenizer study's arm B): the components folder's
    config names the norm, the attention blocks stay at the identity (zero output projections), the folder loads
    back with it and encodes, and the HF conversion refuses it by name."""
    from januskit.recipes.default_model import build_components

    _, work = smoke
    r = Recipe().smoke()
    r = dataclasses.replace(r, vq_norm="branch", vq=dataclasses.replace(r.vq, attention=False))
    out = build_components(work / "world", tmp_path / "components", r)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["gen_vision_config"]["params"]["norm"] == "branch"
    model = load_janus(out, torch.float32)
    assert model.config.vq.norm == "branch"
    vq = model.gen_vision_model
    projs = [m.proj_out.weight for m in vq.modules() if hasattr(m, "proj_out")]
    assert projs and all(float(w.abs().max()) == 0 for w in projs)
    ids = vq.encode(torch.zeros(1, 3, model.config.vq.image_size, model.config.vq.image_size))
    assert ids.ndim == 2 and ids.shape[0] == 1 and 0 <= int(ids.min()) <= int(ids.max()) < model.config.vq.codebook_size
    assert main(["convert", "--to", "hf", str(out), str(tmp_path / "hf")]) != 0
    assert "norm" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_recipe_overrides_set_nested_fields_and_refuse_wrong_paths_and_types(tmp_path, capsys):
    """`januskit world build --set`: dotted paths into nested settings, JSON values cast to the field's kind,
    wrong fields and types refused by name, before anything is built."""
    from januskit.recipes.default_model import with_overrides

    r = with_overrides(Recipe(), ["vq_norm=branch", "vq.attention=false", "siglip.steps=800", "siglip.lr=2e-3",
                                  "siglip_dense=true", "cfg_candidates=[1, 2]", "rl.steps=10"])
    assert (r.vq_norm, r.vq.attention, r.siglip.steps, r.siglip.lr, r.siglip_dense) == \
        ("branch", False, 800, 2e-3, True)
    assert r.cfg_candidates == (1, 2) and r.rl.steps == 10 and r.vq.steps == Recipe().vq.steps
    assert with_overrides(Recipe(), ["siglip.lr=1"]).siglip.lr == 1.0  # an int where a float goes
    for bad, msg in [("vq_nrom=branch", "Recipe has no field 'vq_nrom'"), ("siglip.steps=many", "expected a int"),
                     ("vq=1", "a group of settings"), ("seed.x=1", "'seed' is a int"), ("threads", "FIELD=VALUE"),
                     ("siglip_dense=1", "expected a bool")]:
        with pytest.raises(ValueError, match=msg):
            with_overrides(Recipe(), [bad])
    # a stage of the chain by its folder name: a field set, or the stage dropped (the others kept in order)
    r = with_overrides(Recipe(), ["stages.stage2.steps=3000", "stages.stage1=null", "stages.stage3.lr=1e-3"])
    assert [p.name for p in r.stages] == ["stage2", "stage3"]
    assert (r.stages[0].steps, r.stages[1].lr, r.stages[0].lr) == (3000, 1e-3, Recipe().stages[1].lr)
    for bad, msg in [("stages.stage9.steps=1", r"no stage 'stage9' \(stages: stage1, stage2, stage3\)"),
                     ("stages.stage2=1", "a stage; set its fields"), ("stages.stage2.stpes=1", "no field 'stpes'")]:
        with pytest.raises(ValueError, match=msg):
            with_overrides(Recipe(), [bad])
    one = dataclasses.replace(Recipe(), stages=Recipe().stages[:1])
    with pytest.raises(ValueError, match="the only stage"):
        with_overrides(one, ["stages.stage1=null"])
    assert main(["world", "build", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"),
                 "--set", "vq.nope=1"]) != 0
    assert "VQTrainConfig has no field 'nope'" in capsys.readouterr().err and not (tmp_path / "w").exists()
