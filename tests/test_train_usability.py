"""What a new user meets fine-tuning a model on their own data (issue 19): the start log line says what a
step is, the exported folder says what it was trained from (and not how its base scored), a relative path
that only exists beside the config file is named with both folders, a ratio without a source says how to
drop the kind, and metrics.jsonl carries a loss per kind."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from PIL import Image

import januskit
from januskit.checkpoint.init import init_checkpoint
from januskit.train.checkpoints import BASE_RECORDS, PROVENANCE
from januskit.train.config import RunConfig, describe_step, load_run_config
from januskit.train.data.mixing import Mixer
from januskit.train.data.records import open_source
from januskit.train.losses import progress_postfix
from januskit.train.plot import read_metrics
from januskit.train.trainer import train

from train_helpers import PRESET, run_config

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def _dataset(root: Path) -> dict[str, str]:
    """Three JSONL manifests (understanding, text, generation) with their images; kind -> manifest path."""
    (root / "img").mkdir(parents=True)
    rows: dict[str, list[dict]] = {"understanding": [], "text": [], "generation": []}
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (48, 32), rgb).save(root / "img" / f"{name}.png")
        rows["understanding"].append({"kind": "understanding", "images": [f"img/{name}.png"],
                                      "messages": [{"role": "user", "content": "What colour is this?"},
                                                   {"role": "assistant", "content": f"It is {name}."}]})
        rows["text"].append({"kind": "text", "text": f"The colour {name} is number {i}."})
        rows["generation"].append({"kind": "generation", "caption": f"a {name} square", "image": f"img/{name}.png"})
    paths = {}
    for kind, lines in rows.items():
        paths[kind] = str(root / f"{kind}.jsonl")
        Path(paths[kind]).write_text("".join(json.dumps(r) + "\n" for r in lines))
    return paths


def _loader_config(out: Path, source: str, data: dict[str, str], ratio: list[int] | None, steps: int = 2) -> RunConfig:
    stage = {"name": "janus-pro/3", "steps": steps, "warmup": 0, "batch_size": 4, "lr": 1e-3}
    if ratio is not None:
        stage["ratio"] = ratio
    return RunConfig.from_dict({
        "model": {"source": source},
        "stage": stage,
        "train": {"out": str(out), "micro_batch_size": 2, "seq_len": 256, "threads": 1, "log_every": 1,
                  "save_every": steps, "export_dtype": "float32", "plot": False, "progress": False},
        "data": {"builder": "januskit.train.data.loader:build", "prefetch": 0, **data},
    })


def _start_line(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records
             if r.name == "januskit.train" and " steps from step " in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


def test_real_loader_run_logs_samples_per_step_and_writes_a_loss_per_kind(tmp_path, caplog):
    """With the file loader [stage] batch_size counts samples, packed into rows afterwards; every
    metrics line has a finite loss for each kind the step drew (ratio 1:1:2 of 4 samples: all three)."""
    data = _dataset(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="januskit.train"):
        out = train(_loader_config(tmp_path / "out", PRESET, data, ratio=[1, 1, 2]))
    assert _start_line(caplog) == (
        "stage janus-pro/3: 2 steps from step 0; 4 samples per optimiser step (1 rank x 4), packed into rows of "
        "256 tokens, micro-batches of 2 rows, gradient accumulation over as many micro-batches as the step's rows fill")
    lines = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for k in ("loss", "loss_und", "loss_text", "loss_gen"):
            assert isinstance(m[k], float) and math.isfinite(m[k]) and m[k] > 0, (k, m)
        assert m["loss_edit"] is None  # no edit samples: null, not 0
        assert m["loss_tokens"] > 0 and m["tokens"] >= m["loss_tokens"] and 0 < m["packing"] <= 1
        # the mean is over tokens: it lies between the per-kind means
        kinds = [m["loss_und"], m["loss_text"], m["loss_gen"]]
        assert min(kinds) - 1e-6 <= m["loss"] <= max(kinds) + 1e-6
    bar = progress_postfix(lines[-1])
    assert list(bar) == ["loss", "und", "text", "gen", "lr"]  # no "edit": the step had none
    assert bar["gen"] == f"{lines[-1]['loss_gen']:.3f}" and bar["lr"] == f"{lines[-1]['lr']:.2e}"


def test_synthetic_run_logs_packed_rows_per_step_and_names_its_preset(tmp_path, caplog):
    """A micro-batch source (synthetic data) yields ready-packed rows: batch_size 4 = 2 accumulation
    steps of 2 rows; the exported folder's provenance names the preset it started from."""
    with caplog.at_level(logging.INFO, logger="januskit.train"):
        out = train(run_config(tmp_path / "out", steps=1, batch_size=4, micro_batch_size=2, plot=False))
    assert _start_line(caplog) == (
        "stage janus-pro/3: 1 steps from step 0; 4 packed rows of 192 tokens per optimiser step (1 rank x 2 "
        "gradient accumulation steps x micro-batches of 2 rows)")
    assert json.loads((out / PROVENANCE).read_text()) == {"base_model": PRESET, "preset": True, "seed": 0}


def test_describe_step_counts_every_rank():
    assert describe_step(64, 4, 1, 8, 4096, per_step=True).startswith(
        "64 samples per optimiser step (4 ranks x 16), packed into rows of 4096 tokens, micro-batches of 8 rows")
    assert describe_step(64, 4, 2, 8, 4096, per_step=False) == (
        "64 packed rows of 4096 tokens per optimiser step (4 ranks x 2 gradient accumulation steps x "
        "micro-batches of 8 rows)")


def test_fine_tune_leaves_the_base_records_behind_and_names_its_base(tmp_path):
    """eval.json, recipe.json and components.json describe how the base was made and scored, not the
    fine-tuned model: the export drops them and writes provenance.json; what the model needs to run comes along."""
    base = init_checkpoint(tmp_path / "base", preset_name=PRESET, seed=0)
    (base / "eval.json").write_text('{"qa": 0.63}\n')
    (base / "recipe.json").write_text('{"stages": []}\n')
    (base / "components.json").write_text('{"vq": {}}\n')
    (base / "finetune.json").write_text('{"plan": {}}\n')  # januskit finetune's report of the base's own run
    (base / "generation_config.json").write_text('{"guidance_scale": 3.0}\n')
    (base / PROVENANCE).write_text(json.dumps({"base_model": "older"}) + "\n")  # the base was fine-tuned itself
    cfg = run_config(tmp_path / "out", steps=1, batch_size=2, plot=False).to_dict()
    out = train(RunConfig.from_dict({**cfg, "model": {"source": str(base)}}))
    for name in ("eval.json", "recipe.json", "components.json", "finetune.json"):
        assert not (out / name).exists(), name
    assert json.loads((out / PROVENANCE).read_text()) == {
        "base_model": str(base), "base_model_path": str(base.resolve()), "base_provenance": {"base_model": "older"}}
    for name in ("tokenizer.json", "processor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert set(BASE_RECORDS) == {"eval.json", "recipe.json", "components.json", "finetune.json", PROVENANCE}
    pipe = januskit.load(out)
    assert pipe.default_cfg_weight == 3.0


def _config_beside(tmp_path: Path, body: str) -> Path:
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    cfg = folder / "run.toml"
    cfg.write_text(body)
    return cfg


def test_relative_path_that_exists_only_beside_the_config_is_named_with_both_folders(tmp_path, monkeypatch):
    """Relative paths resolve against the working directory; one found only next to the config file
    gets an error saying where it was looked for and what to write instead."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = _config_beside(tmp_path, '[model]\nsource = "base"\n[stage]\nname = "janus-pro/3"\n[train]\nout = "o"\n')
    (cfg.parent / "base").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_run_config(cfg)
    assert str(e.value) == (
        f"{cfg}: [model] source = 'base': not found in the working directory {work}, which relative paths in a "
        f"config resolve against (not the config file's folder); {cfg.parent / 'base'} exists: write "
        f"{str(cfg.parent / 'base')!r}, or an absolute path")

    data = _dataset(cfg.parent / "data")
    assert Path(data["generation"]).is_file()
    cfg.write_text(f'[model]\nsource = "{PRESET}"\n[stage]\nname = "janus-pro/3"\n[train]\nout = "o"\n[data]\n'
                   'builder = "januskit.train.data.loader:build"\n'
                   'generation = {paths = "data/generation.jsonl", root = "data"}\n')
    with pytest.raises(FileNotFoundError, match=r"\[data\] generation = 'data/generation.jsonl': not found in the "
                       rf"working directory {work}.*{cfg.parent / 'data' / 'generation.jsonl'} exists"):
        load_run_config(cfg)

    # Missing in both places: not refused at load (a config may name what an earlier run will write); the
    # reader's error then says which folder the relative path was looked for in.
    cfg.write_text(f'[model]\nsource = "{PRESET}"\n[stage]\nname = "janus-pro/3"\n[train]\nout = "o"\n[data]\n'
                   'builder = "januskit.train.data.loader:build"\ngeneration = "nowhere.jsonl"\n')
    assert load_run_config(cfg).data.options["generation"] == "nowhere.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        open_source("nowhere.jsonl", kind="generation")
    assert str(e.value) == (f"nowhere.jsonl: no such manifest file or folder (relative paths resolve against "
                            f"the working directory {work})")


def test_ratio_without_a_source_says_how_to_train_without_that_kind(tmp_path):
    """Stage III's 5:1:4 with no text data: the error gives the ratio to set instead."""
    srcs = {"understanding": iter(()), "generation": iter(())}
    with pytest.raises(ValueError) as e:
        Mixer(srcs, (5, 1, 4), 10)
    assert str(e.value) == ("ratio gives 'text' weight 1 but there is no text source: add one ([data] text = "
                            "\"path/to/text.jsonl\"), or set [stage] ratio = [5, 0, 4] (understanding : text : "
                            "generation) to train without text")
    with pytest.raises(ValueError, match=r"set \[stage\] ratio = \[0.5, 0, 2, 0\] \(understanding : text : "
                       r"generation : edit\) to train without text"):
        Mixer(srcs, (0.5, 1, 2, 0), 10)
    with pytest.raises(ValueError, match="no text source: add one .*; the ratio weights no other kind$"):
        Mixer({"text": None}, (0, 1, 0), 10)
    # What the user met: the file loader on a stage whose ratio they did not set.
    data = _dataset(tmp_path / "data")
    del data["text"]
    with pytest.raises(ValueError, match=r"set \[stage\] ratio = \[5, 0, 4\]"):
        train(_loader_config(tmp_path / "out", PRESET, data, ratio=None, steps=1))


def test_an_odd_batch_is_rounded_only_for_packed_row_sources(tmp_path, caplog):
    """The loader takes exactly batch_size samples a step: no 'using N' warning for it; a source of packed
    rows (the synthetic builder) is rounded up to micro x world x accumulation, and says so."""
    data = _dataset(tmp_path / "data")
    cfg = _loader_config(tmp_path / "a", PRESET, data, ratio=[1, 1, 2], steps=1).to_dict()
    cfg["stage"]["batch_size"] = 3
    with caplog.at_level(logging.INFO, logger="januskit.train"):
        train(RunConfig.from_dict(cfg))
    assert "3 samples per optimiser step" in _start_line(caplog)
    assert not [r for r in caplog.records if "not a multiple" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="januskit.train"):
        train(run_config(tmp_path / "b", steps=1, batch_size=3, micro_batch_size=2))
    warned = [r.getMessage() for r in caplog.records if "not a multiple" in r.getMessage()]
    assert warned == ["batch size 3 (packed rows) is not a multiple of micro_batch_size x world = 2; using 4"]


def test_a_missing_model_source_names_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _loader_config(tmp_path / "out", "models/nowhere", _dataset(tmp_path / "data"), ratio=[1, 1, 2])
    with pytest.raises(FileNotFoundError, match=r"\[model\] source 'models/nowhere': no such checkpoint folder "
                       rf"\(a relative path is read from the working directory, {tmp_path}\), and not a preset"):
        train(cfg)


def test_a_busy_machine_is_named_before_training(monkeypatch, caplog, tmp_path):
    """Oversubscribed CPU training is many times slower: the trainer says so when other running threads
    plus its own exceed the cores, and stays quiet otherwise."""
    from januskit.train import trainer

    monkeypatch.setattr(trainer.os, "cpu_count", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="januskit.train"):
        assert trainer.warn_if_oversubscribed(2, busy=2.0)
        assert not trainer.warn_if_oversubscribed(2, busy=0.0)
        assert not trainer.warn_if_oversubscribed(1, busy=1.0)
    assert [r.getMessage() for r in caplog.records] == [
        "the machine is busy (2 other running thread(s) on 2 cores) and this run adds 2: oversubscribed CPU "
        "training can be many times slower; wait for the other jobs or set [train] threads lower"]
    loadavg = tmp_path / "loadavg"  # /proc/loadavg's format: the 4th field is running/total, this reader included
    loadavg.write_text("1.63 1.08 2.07 3/101 16808\n")
    assert trainer.busy_threads(samples=3, source=loadavg) == 2.0
    loadavg.write_text("garbage\n")
    assert trainer.busy_threads(samples=1, source=loadavg) is None
    assert trainer.busy_threads(samples=1, source=tmp_path / "absent") is None  # no /proc: no warning
