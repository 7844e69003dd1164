"""The optional TensorBoard logger ([train] tensorboard = true): the events under <out>/tensorboard/ hold the
numbers of metrics.jsonl (the source of truth), grouped by kind, each step once even across a kill and resume;
asking for it without the package fails at once, naming the extra."""
from __future__ import annotations

import json
import math
import shutil
import sys

import pytest

from januskit.train import loggers
from januskit.train.trainer import train
from train_helpers import crash_after, run_config

pytest.importorskip("tensorboard")


def _events(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _lines(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_match_metrics_jsonl_across_a_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = run_config(out, steps=5, save_every=2, parallel="none", tensorboard=True, plot=False)
    crash_after(monkeypatch, 3)  # steps 1-3 logged, the checkpoint at step 2: step 3 is logged again on resume
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    train(cfg, resume=True)

    lines = _lines(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    ev = _events(out / "tensorboard")
    assert {"loss/loss", "loss/loss_gen", "loss/loss_und", "optim/lr", "optim/grad_norm",
            "throughput/tok_per_s"} <= set(ev)
    for key, tag in (("loss", "loss/loss"), ("loss_gen", "loss/loss_gen"), ("lr", "optim/lr"),
                     ("tok_per_s", "throughput/tok_per_s")):
        got = ev[tag]
        assert [s for s, _ in got] == [1, 2, 3, 4, 5], (tag, got)  # each step once: the killed run's 3 is purged
        for (s, v), m in zip(got, lines):
            assert math.isclose(v, m[key], rel_tol=1e-6), (tag, s, v, m[key])  # float32 in the event file

    # A fresh run in the same folder replaces the events, as it replaces metrics.jsonl.
    shutil.rmtree(out / "checkpoints")
    train(run_config(out, steps=2, parallel="none", tensorboard=True, plot=False))
    assert [s for s, _ in _events(out / "tensorboard")["loss/loss"]] == [1, 2]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_tags_group_fields_by_kind():
    line = {"step": 3, "loss": 1.0, "loss_edit": None, "lr": 1e-3, "tok_per_s": 10.0, "val_geneval": 0.5,
            "reward": 0.2, "flag": True, "name": "x", "nan": float("nan")}
    assert loggers.scalars(line, rl=True) == {"loss/loss": 1.0, "optim/lr": 1e-3, "throughput/tok_per_s": 10.0,
                                              "eval/val_geneval": 0.5, "rl/reward": 0.2}


def test_enabled_without_the_package_fails_before_building(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    out = tmp_path / "run"
    with pytest.raises(ImportError, match=r"tensorboard = true.*januskit\[tensorboard\]"):
        train(run_config(out, steps=1, parallel="none", tensorboard=True, plot=False))
    assert not (out / "metrics.jsonl").exists()
    # Off (the default), nothing is imported and the run goes on.
    train(run_config(out, steps=1, parallel="none", plot=False))
    assert (out / "metrics.jsonl").is_file() and not (out / "tensorboard").exists()


def test_an_rl_stage_logs_its_fields_too(tmp_path):
    from train_helpers import rl_config

    out = tmp_path / "rl"
    train(rl_config(out, steps=2, tensorboard=True))
    lines = _lines(out)
    ev = _events(out / "tensorboard")
    for key, tag in (("reward", "rl/reward"), ("kl", "rl/kl"), ("lr", "optim/lr")):
        assert [s for s, _ in ev[tag]] == [m["step"] for m in lines], tag
        assert all(math.isclose(v, m[key], rel_tol=1e-6, abs_tol=1e-9) for (_, v), m in zip(ev[tag], lines)), tag
