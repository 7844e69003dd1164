"""`januskit finetune` (januskit/train/finetune.py): the plan's defaults, the holdout split, a real fine-tune of
the bundled model on a few steps of a tiny pattern data set (stripes and checkers, not the shapes world), resume,
and the error messages."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from januskit.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from patterns import draw, write_patterns  # noqa: E402  (the worked example's data, docs/finetune.md)
from januskit.train import trainer
from januskit.train.config import DataContext
from januskit.train.finetune import (DEFAULT_MODEL, REPORT, FinetuneOptions, SplitSource, build_data, finetune,
                                     holdout_indices, make_plan, mix_ratio, run_config, tier_for)

@pytest.fixture(scope="module")
def patterns(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_patterns(tmp_path_factory.mktemp("patterns"), n_und=10, n_gen=10, n_text=4, n_edit=4)


def test_plan_defaults(patterns: Path, tmp_path: Path) -> None:
    # only understanding and generation: text and edit get weight 0, no error for the missing kinds
    opts = FinetuneOptions(out=str(tmp_path / "o"), sources={"understanding": [str(patterns / "understanding.jsonl")],
                                                            "generation": [str(patterns / "generation.jsonl")]})
    plan = make_plan(opts)
    assert plan.base_model == str(DEFAULT_MODEL)
    assert plan.arch == "janus" and plan.tier == "miniature" and plan.stage == "janus-pro/3"
    assert plan.records == {"understanding": 10, "generation": 10}
    assert plan.holdout_records == {"understanding": 1, "generation": 1}
    assert plan.train_records == {"understanding": 9, "generation": 9}
    assert plan.ratio == [1, 0, 1, 0]
    # seq_len: the longest sample, rounded up to 64. Understanding: BOS + the rendered turn with 64 image slots
    # between <begin_of_image> and <end_of_image>; generation: its prompt + 64 VQ ids + <end_of_image>
    assert 64 < plan.longest <= 128 and plan.seq_len == 128
    assert plan.longest_key.rsplit(":", 1)[0].endswith(".jsonl")
    # the default recipe's numbers for a miniature model; steps = ceil(3 epochs x 18 records / 32)
    assert (plan.batch_size, plan.lr, plan.micro_batch_size) == (32, 5e-4, 32)
    assert plan.steps == 2 and plan.epochs == pytest.approx(2 * 32 / 18, abs=1e-3)
    # the folder form, with a text file too; overrides win
    plan = make_plan(FinetuneOptions(out="x", data=str(patterns), epochs=10, batch_size=8, lr=1e-3, seq_len=256))
    assert plan.records == {"understanding": 10, "text": 4, "generation": 10, "edit": 4}
    assert plan.holdout_records == {"understanding": 1, "text": 1, "generation": 1, "edit": 1}  # at least one
    assert plan.ratio == [3, 1, 3, 1]  # 9 : 3 : 9 : 3 training records (3 is under 10% of 24: raised to 3)
    assert plan.steps == 30 and (plan.batch_size, plan.lr, plan.seq_len) == (8, 1e-3, 256)  # ceil(10 x 24 / 8)
    assert make_plan(FinetuneOptions(out="x", data=str(patterns), steps=5)).steps == 5
    # LoRA: the adapters' higher LR, and [lora] in the run config
    plan = make_plan(FinetuneOptions(out="x", data=str(patterns), lora=True))
    assert plan.lr == 2e-3 and run_config(plan, "o").lora.enabled
    assert not run_config(make_plan(FinetuneOptions(out="x", data=str(patterns))), "o").lora.enabled


def test_size_tiers() -> None:
    assert tier_for(8_000_000).name == "miniature"
    big = tier_for(1_500_000_000)
    assert big.name == "billion-scale" and big.suggest_lora and big.lr < 1e-4 < big.lora_lr


def test_janusflow_finetune(patterns: Path, tmp_path: Path) -> None:
    """A random tiny JanusFlow (with its VAE): its own stage row, no REPA, and the loop through to the figures."""
    assert main(["init", str(tmp_path / "flow"), "--arch", "janusflow"]) == 0
    opts = FinetuneOptions(out=str(tmp_path / "out"), model=str(tmp_path / "flow"), data=str(patterns), steps=1,
                           batch_size=2, time_steps=0)
    report = finetune(opts, echo=lambda _: None)
    assert report["plan"]["arch"] == "janusflow" and report["plan"]["stage"] == "janusflow/3"
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["flow"]["repa_weight"] == 0.0
    for side in ("before", "after"):  # loss_gen: the rectified-flow loss at each sample's fixed t and noise
        assert report[side]["loss_gen"] > 0 and "und_accuracy" in report[side]


def test_tokenizer_first_then_finetune(patterns: Path, tmp_path: Path) -> None:
    """--train-tokenizer: the VQ is retrained on the images into OUT-tokenizer/, the fine-tune starts from
    that folder and keeps its VQ (the stage freezes it), provenance chains both steps; a rerun reuses it."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    argv = ["finetune", "--data", str(patterns), "--out", str(out), "--steps", "1", "--batch-size", "2",
            "--time-steps", "0", "--eval-max", "2", "--train-tokenizer", str(patterns / "images"),
            "--tokenizer-steps", "2"]
    assert main(argv) == 0
    tok = tmp_path / "run-tokenizer"
    assert json.loads((out / REPORT).read_text())["base_model"] == str(tok)
    record = json.loads((tok / "provenance.json").read_text())["image_tokenizer"]
    assert record["settings"]["steps"] == 2
    chain = json.loads((out / "provenance.json").read_text())
    assert chain["base_model_path"] == str(tok.resolve()) and "image_tokenizer" in chain["base_provenance"]
    vq = lambda d: {k: v for k, v in load_file(str(d / "model.safetensors")).items() if k.startswith("gen_vision_model.")}  # noqa: E731
    base, retrained, tuned = vq(DEFAULT_MODEL), vq(tok), vq(out)
    assert any(not torch.equal(base[k], retrained[k]) for k in base)  # the step retrained it...
    assert all(torch.equal(retrained[k], tuned[k]) for k in retrained)  # ...and the fine-tune kept it
    shutil.rmtree(out)  # a rerun (e.g. after a kill during the fine-tune) reuses the retrained folder
    lines: list[str] = []
    finetune(FinetuneOptions(out=str(out), data=str(patterns), steps=1, batch_size=2, time_steps=0, evaluate=False,
                             tokenizer_images=str(patterns / "images")), echo=lines.append)
    assert lines[0] == f"image tokenizer: reusing {tok} (retrained by an earlier run)"


def test_tensorboard_has_the_training_curves_and_the_figures_before_and_after(patterns: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    report = finetune(FinetuneOptions(out=str(out), data=str(patterns), steps=2, batch_size=2, time_steps=0,
                                      eval_max=2, tensorboard=True), echo=lambda _: None)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    ev = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in ev["loss/loss"]] == [m["step"] for m in lines] == [1, 2]
    assert [v for _, v in ev["loss/loss"]] == pytest.approx([m["loss"] for m in lines])
    for k in ("und_accuracy", "loss_und", "loss_gen"):
        assert ev[f"eval/{k}"] == [(0, pytest.approx(report["before"][k])), (2, pytest.approx(report["after"][k]))]


def test_mix_ratio() -> None:
    assert mix_ratio({"understanding": 180, "generation": 180}) == [1, 0, 1, 0]
    assert mix_ratio({"understanding": 500, "text": 10, "generation": 490}) == [50, 10, 49, 0]  # text 10 -> 100 (10% of 1000)
    assert mix_ratio({"edit": 7}) == [0, 0, 0, 1]


def test_holdout_never_trained(patterns: Path) -> None:
    files = {"understanding": [str(patterns / "understanding.jsonl")], "generation": [str(patterns / "generation.jsonl")]}
    held = {k: holdout_indices(10, 0.2, 0, k) for k in files}
    assert all(len(v) == 2 for v in held.values())
    assert list(held["understanding"]) != list(held["generation"])  # seeded per kind
    held_keys = {f"{Path(files[k][0]).resolve()}:{i + 1}" for k, v in held.items() for i in v}  # one record per line
    plan = make_plan(FinetuneOptions(out="x", sources=files, holdout=0.2))
    cfg = run_config(plan, "unused")
    import januskit

    model = januskit.load(DEFAULT_MODEL).model
    ctx = DataContext(ratio=tuple(plan.ratio), batch_size=8, grad_accum=1, micro_batch_size=8, seq_len=plan.seq_len,
                      seed=0, rank=0, world=1, model_config=model.config, source=plan.base_model, model=model)
    data = build_data(ctx, **cfg.data.options)
    try:
        seen = [s.key for _ in range(6) for s in next(data.mixer)]  # 48 samples: > 2 epochs of each 8-record side
    finally:
        data.close()
    assert len(set(seen)) == 16 and not set(seen) & held_keys
    # the evaluation's side is exactly the held-out lines
    src = SplitSource(files["understanding"], kind="understanding", part="holdout", holdout=0.2, holdout_seed=0,
                      shuffle=False, epochs=1)
    assert set(src.keys()) == {k for k in held_keys if "understanding" in k}


def test_finetune_and_resume(patterns: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ft"
    opts = FinetuneOptions(out=str(out), data=str(patterns), steps=4, batch_size=4, save_every=1, time_steps=2)
    real_step, calls = trainer.train_step, {"n": 0}

    def interrupted(*a, **kw):  # the run dies after its second training step (checkpoints at 1 and 2)
        calls["n"] += 1
        if calls["n"] > 2 + opts.time_steps:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        finetune(opts, echo=lines.append)
    text = "\n".join(lines)
    for word in ("samples per step", "steps", "epochs", "ratio", "lr", "seq_len", "dtype", "measured"):
        assert word in text
    report = json.loads((out / REPORT).read_text())
    assert report["status"] == "training" and "before" in report and report["plan"]["seconds_per_step"] > 0
    assert not (out / "config.json").exists()
    monkeypatch.setattr(trainer, "train_step", real_step)
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(opts, echo=lines.append)

    report = finetune(FinetuneOptions(out=str(out), resume=True), echo=lines.append)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # steps 1-2 before the interruption, 3-4 resumed
    assert report["status"] == "done" and report["base_model"] == str(DEFAULT_MODEL)
    for side in ("before", "after"):
        r = report[side]
        assert 0 <= r["und_accuracy"] <= 1 and r["n_und"] == 1 and r["n_gen"] == 1
        assert r["loss_gen"] > 0 and r["loss_und"] > 0 and r["loss_text"] > 0 and r["loss_edit"] > 0
    assert report["after"]["loss_gen"] != report["before"]["loss_gen"]  # it trained
    assert json.loads((out / REPORT).read_text()) == report
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "run_config.json", "metrics.jsonl", REPORT} <= names
    assert not names & {"eval.json", "recipe.json", "components.json", "checkpoints"}
    assert json.loads((out / "run_config.json").read_text())["data"]["builder"] == "januskit.train.finetune:build_data"
    import januskit

    assert januskit.load(out).chat("What pattern is this?", images=[draw("checkers", "red")], max_new_tokens=4) != ""
    # a finished run resumes to its report
    assert finetune(FinetuneOptions(out=str(out), resume=True), echo=lines.append)["after"] == report["after"]


def test_errors(patterns: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def error(*argv: str) -> str:
        assert main(["finetune", *argv]) == 2
        return capsys.readouterr().err

    out = str(tmp_path / "o")
    assert "--understanding nope.jsonl: no such file" in error("--understanding", "nope.jsonl", "--out", out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert f"--generation {empty}: no records" in error("--generation", str(empty), "--out", out)
    assert "no training data" in error("--out", out)
    assert f"--data {tmp_path}: holds none of" in error("--data", str(tmp_path), "--out", out)
    assert f"{tmp_path}: not a checkpoint folder (no config.json)" in error(str(tmp_path), "--data", str(patterns),
                                                                           "--out", out)
    assert "no such model folder" in error(str(tmp_path / "missing"), "--data", str(patterns), "--out", out)
    assert "--seq-len 64 is shorter than the longest training sample" in error("--data", str(patterns), "--seq-len",
                                                                               "64", "--out", out)
    assert "--resume: " in (msg := error("--resume", "--out", out)) and "finetune.json not found" in msg
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "generation.jsonl").write_text(json.dumps({"kind": "generation", "caption": "x", "image": "no.png"}) + "\n")
    assert f"{bad / 'generation.jsonl'}:1: image 'no.png' not found" in error("--data", str(bad), "--out", out)
    assert not Path(out).exists()  # nothing was written by a refused command
