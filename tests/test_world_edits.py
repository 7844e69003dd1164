"""The miniature world's edit tasks: exact targets, held-out combinations, the split files, and the eval's
scoring (an oracle that draws the target scores 1, one that returns the source scores 0)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from januskit.eval.world import EvalSettings, eval_edits
from januskit.world.dataset import held_out, write_split
from januskit.world.edits import TASKS, Edit, combinations, draw_edit, held_out_edits, scene_key, score_edit
from januskit.world.judge import detect
from januskit.world.prompts import scene_from_json
from januskit.world.render import render
from januskit.world.scene import Obj


def test_each_task_changes_exactly_what_it_says():
    rng, held = np.random.default_rng(0), held_out_edits()
    for task in TASKS:
        for _ in range(30):
            e = draw_edit(rng, task, held, world_held=held_out())
            src, tgt = Counter(scene_key(e.source)), Counter(scene_key(e.target))
            gone, new = src - tgt, tgt - src
            if task == "add":
                assert not gone and len(new) == 1 and len(e.target) == len(e.source) + 1
            elif task == "remove":
                assert not new and len(gone) == 1
            elif task == "swap":
                assert len(gone) == len(new) == 2 and {(s, c) for s, c, _ in gone} == {(s, c) for s, c, _ in new}
            else:
                (s0, c0, k0), = gone
                (s1, c1, k1), = new
                changed = {"recolour": (s0 == s1, c0 != c1, k0 == k1), "move": (s0 == s1, c0 == c1, k0 != k1),
                           "reshape": (s0 != s1, c0 == c1, k0 == k1)}[task]
                assert all(changed), (task, gone, new)
            assert e.combination not in held[task]
            assert Edit.from_json(json.loads(json.dumps(e.to_json()))) == e


def test_the_judge_reads_targets_and_tells_them_from_sources():
    rng, held = np.random.default_rng(1), held_out_edits()
    for task in TASKS:
        for _ in range(20):
            e = draw_edit(rng, task, held)
            assert score_edit(detect(np.asarray(render(e.target))), e.target)
            assert not score_edit(detect(np.asarray(render(e.source))), e.target)


def test_held_out_combinations_and_wording():
    held = held_out_edits()
    assert held == held_out_edits() and set(held) == set(TASKS)
    for task in TASKS:
        assert 1 <= len(held[task]) <= 0.2 * len(combinations(task)) + 1
    e = draw_edit(np.random.default_rng(2), "recolour", held, want_held=True)
    assert e.combination in held["recolour"] and e.instruction.startswith("make the ")
    with pytest.raises(ValueError, match="unknown edit task 'paint'"):
        draw_edit(np.random.default_rng(0), "paint", held)
    assert scene_key([Obj("circle", "red", 3), Obj("square", "blue", 0)]) == [("circle", "red", 3), ("square", "blue", 0)]


def test_split_files_hold_edit_records_and_eval_sets_and_leave_the_rest_unchanged(tmp_path):
    held = held_out()
    write_split(tmp_path / "a", "train", 0, held, n_gen=3, n_und=2, n_text=1)
    write_split(tmp_path / "b", "train", 0, held, n_gen=3, n_und=2, n_text=1, n_edit=12)
    for f in ("generation.jsonl", "understanding.jsonl", "text.jsonl"):
        assert (tmp_path / "a" / "train" / f).read_bytes() == (tmp_path / "b" / "train" / f).read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "b" / "train" / "edit.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and [r["task"] for r in rows[:6]] == list(TASKS)
    r = rows[0]
    assert r["kind"] == "edit" and r["images"] == ["img/e000000s.png"] and r["target"] == "img/e000000t.png"
    img = np.asarray(Image.open(tmp_path / "b" / "train" / r["target"]).convert("RGB"))
    assert score_edit(detect(img), scene_from_json(r["target_scene"]))
    write_split(tmp_path / "c", "test", 0, held, n_gen=0, n_und=0, n_text=0, n_edits=4)
    test = [json.loads(x) for x in (tmp_path / "c" / "test" / "edits.jsonl").read_text().splitlines()]
    assert len(test) == 24 and sum(r["held_out"] for r in test) == 12
    ho = held_out_edits()
    assert all((tuple(r["combination"]) in ho[r["task"]]) == r["held_out"] for r in test)


class _Oracle:
    """A stand-in pipeline whose 'edit' draws the target scene (or hands back the source)."""
    image_size, source, arch, default_cfg_weight = 64, "oracle", "janus", 5.0

    def __init__(self, edits: list[Edit], good: bool, channels: tuple[int, ...] = (0, 1, 2)) -> None:
        self.by_prompt = {e.instruction: e for e in edits}
        self.good = good
        self.processor = self
        self.channels = channels  # what its "image tokenizer" does: a reordering of the colour channels

    def reconstruct_pixels(self, images):
        x = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images]).float() / 127.5 - 1
        return x[:, list(self.channels)]

    def edit_prompt(self, instruction: str, n: int) -> list:
        return [instruction]

    def own_options(self, **kw):
        return {}

    def generate_batch(self, ids, *, generators, sources, cfg_weight, cfg_image):
        scenes = [self.by_prompt[i[0]].target if self.good else self.by_prompt[i[0]].source for i in ids]

        class Out:
            def uint8(self):
                return np.stack([np.asarray(render(s)) for s in scenes])
        return Out()


def test_eval_edits_scores_the_target_scene(tmp_path):
    write_split(tmp_path, "test", 0, held_out(), n_gen=0, n_und=0, n_text=0, n_edits=2)
    rows = [json.loads(x) for x in (tmp_path / "test" / "edits.jsonl").read_text().splitlines()]
    edits = [Edit.from_json(r) for r in rows]
    s = EvalSettings(images_per_prompt=2, batch=5)
    good = eval_edits(_Oracle(edits, True), tmp_path / "test", rows, s)
    assert good["overall"] == 1.0 and good["images"] == 24 and set(good["tasks"]) == set(TASKS)
    assert good["held_out_vs_seen"] == {"seen": 1.0, "held_out": 1.0}
    assert all(v == 1.0 for d in good["diagnostics"].values() for v in d.values())
    bad = eval_edits(_Oracle(edits, False), tmp_path / "test", rows, s)
    assert bad["overall"] == 0.0 and not any(r["correct"] for r in bad["records"])
    # handing back the source: what each task changes is what its diagnostics find wrong
    d = bad["diagnostics"]
    assert d["recolour"] == {"count": 1.0, "objects": 0.0, "cells": 1.0, "kept": 1.0}
    assert d["move"] == {"count": 1.0, "objects": 1.0, "cells": 0.0, "kept": 1.0}
    assert d["swap"] == {"count": 1.0, "objects": 1.0, "cells": 1.0, "kept": 1.0}  # wrong only in which is where
    assert d["remove"]["count"] == 0.0 and d["add"]["count"] == 0.0 and d["remove"]["kept"] == 1.0
    # the ceiling: the targets through the pipeline's image tokenizer, judged; a faithful one keeps every target
    assert good["ceiling"] == {"overall": 1.0, "tasks": {t: 1.0 for t in TASKS}}
    # one that swaps red and blue channels turns red into blue, yellow into cyan and back (green and purple
    # stay themselves), so only targets with no red, blue, yellow or cyan object survive it
    bgr = eval_edits(_Oracle(edits, True, (2, 1, 0)), tmp_path / "test", rows, s)
    keep = {t: np.mean([all(o.colour in ("green", "purple") for o in e.target) for e in edits if e.task == t])
            for t in TASKS}
    assert bgr["overall"] == 1.0 and bgr["ceiling"]["tasks"] == pytest.approx(keep) and min(keep.values()) < 1.0


def test_the_fresh_world_source_draws_the_six_tasks_in_turn():
    from januskit.train.data.fresh import WorldSource

    src = WorldSource("edit", seed=0)
    for i in range(12):
        rec, (source, target) = src.item(i)
        s = src.sample(i)
        assert rec["task"] == TASKS[i % 6] and s.kind == "edit" and s.instruction == rec["instruction"]
        assert np.array_equal(np.asarray(s.images[0]), np.asarray(render(source)))
        assert score_edit(detect(np.asarray(s.target)), target) and not score_edit(detect(np.asarray(s.images[0])), target)


def test_eval_world_cli_scores_edits_only_when_asked(capsys):
    """`--edits-per-task` is 0 by default (the default model was not trained on edits), a count or `all`;
    anything else is refused by the parser, naming the value."""
    from januskit.cli import main

    args = ["eval", "world", "--prompts-per-category", "0", "--questions-per-type", "0", "--images-per-prompt", "1",
            "--json"]
    assert main(args[:5] + ["1"] + args[6:]) == 0  # one question per type, and no edits
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["understanding"]["questions"] == 6 and not rep.get("edits")
    assert main(args + ["--edits-per-task", "1"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["edits"]
    assert rep["edits"] == 6 and rep["images"] == 6 and set(rep["tasks"]) == set(TASKS)
    for bad, why in (("-1", "expected a count >= 0 or 'all', got -1"), ("some", "expected a count or 'all', got 'some'")):
        with pytest.raises(SystemExit):
            main(args + ["--edits-per-task", bad])
        assert why in capsys.readouterr().err
