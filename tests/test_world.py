"""The miniature world: deterministic scenes, prompts that mean what they say, a judge that reads
clean renders exactly, held-out combinations kept out of training, and the dataset in the training
data format."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from januskit.train.data.records import ManifestSource
from januskit.world.dataset import held_out, read_prompts, write_world
from januskit.world.judge import OUTCOMES, Detection, detect, failure_mode, holds, same_objects, score
from januskit.world.prompts import CATEGORIES, Prompt, describe, make_prompt, sample_prompt, scene_for, scene_from_json
from januskit.world.questions import ask, normalise
from januskit.world.render import render
from januskit.world.scene import COLOUR_NAMES, SHAPES, Obj, random_scene, relation


def test_scenes_are_deterministic_and_valid():
    a = [random_scene(np.random.default_rng(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = np.random.default_rng(0)
    counts = Counter()
    for _ in range(500):
        s = random_scene(rng)
        assert 1 <= len(s) <= 4 and len({o.cell for o in s}) == len(s)
        counts[len(s)] += 1
        for o in s:  # every shape stays inside its cell: relations are never ambiguous
            cx, cy = o.centre
            assert o.col * 32 < cx - o.r and cx + o.r <= (o.col + 1) * 32
            assert o.row * 32 < cy - o.r and cy + o.r <= (o.row + 1) * 32
    assert set(counts) == {1, 2, 3, 4}
    assert np.array_equal(np.asarray(render(a[0])), np.asarray(render(a[1])))


def test_relations_and_descriptions():
    a, b, c = Obj("circle", "red", 0), Obj("square", "blue", 1), Obj("triangle", "green", 3)
    assert relation(a, b) == "left of" and relation(b, a) == "right of"
    assert relation(b, c) == "above" and relation(c, b) == "below"
    assert relation(a, c) is None  # diagonal
    assert describe((c, a)) == "a red circle at the top left and a green triangle at the bottom right"
    assert describe((Obj("diamond", "yellow", 2),)) == "a yellow diamond at the bottom left"
    assert make_prompt("position", ("circle", "square"), relation="left of").text == "a circle to the left of a square"
    assert make_prompt("counting", ("diamond",), count=3).text == "three diamonds"
    assert make_prompt("color_attr", ("circle", "square"), ("cyan", "blue")).text == "a cyan circle and a blue square"
    assert make_prompt("colors", ("circle",)).text == "a circle" and make_prompt("single_object", ("square",)).text == "a square"
    with pytest.raises(ValueError, match="unknown prompt category 'size'"):
        make_prompt("size", ("circle",))


@pytest.mark.parametrize("category", CATEGORIES)
def test_judge_reads_clean_renders_of_every_category(category):
    """The judge scores every scene drawn for a prompt as correct, and the same image against a
    deliberately wrong prompt as incorrect (so `score` is not trivially True)."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        p = sample_prompt(rng, category)
        img = render(scene_for(p, rng))
        found = detect(img)
        assert score(p, found), (p, found)
        wrong = _contradiction(p)
        assert not score(wrong, found), (wrong, found)


def _contradiction(p: Prompt) -> Prompt:
    """A prompt the scene drawn for `p` cannot satisfy."""
    if p.category == "counting":
        return make_prompt("counting", (p.items[0][1],), count=p.count % 4 + 1 if p.count < 4 else 2)
    if p.category == "position":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[p.relation]
        return make_prompt("position", (p.items[0][1], p.items[1][1]), relation=flip)
    if p.category == "two_object":
        other = next(s for s in SHAPES if s not in (p.items[0][1], p.items[1][1]))
        return make_prompt("two_object", (p.items[0][1], other))
    if p.category == "single_object":
        return make_prompt("two_object", (p.items[0][1], next(s for s in SHAPES if s != p.items[0][1])))
    c, s = p.items[0]
    other = next(x for x in COLOUR_NAMES if x != c)
    if p.category == "colors":
        return make_prompt("colors", (s,), (other,))
    return make_prompt("color_attr", (s, p.items[1][1]), (other, p.items[1][0]))


def test_judge_detects_exact_objects_on_random_scenes():
    rng = np.random.default_rng(2)
    ok = [same_objects(s, detect(render(s))) for s in (random_scene(rng) for _ in range(400))]
    assert np.mean(ok) >= 0.99  # measured: 1.000 on 2000 scenes (docs/miniature-world.md)
    assert detect(render(())) == []


def test_judge_rejects_bad_input_and_relations():
    with pytest.raises(ValueError, match=r"judge: expected an RGB image \(H, W, 3\), got shape \(8, 8\)"):
        detect(np.zeros((8, 8)))
    a, b = Detection("circle", "red", 10, 16, 100), Detection("square", "red", 40, 18, 100)
    assert holds("left of", a, b) and holds("right of", b, a) and not holds("above", a, b)
    diag = Detection("square", "red", 40, 50, 100)  # down more than right: neither left of nor right of
    assert not holds("left of", a, diag) and holds("above", a, diag)


def test_questions_have_the_right_answers():
    scene = (Obj("circle", "red", 0), Obj("square", "blue", 1), Obj("circle", "green", 3))
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = ask(scene, "colour", rng)
        assert (q.question, q.answer) == ("What colour is the square?", "blue")  # the only unique shape
        q = ask(scene, "count", rng)
        n = {"How many shapes are there?": "three", "How many circles are there?": "two",
             "How many squares are there?": "one", "How many triangles are there?": "zero",
             "How many diamonds are there?": "zero"}
        assert q.answer == n[q.question]
        q = ask(scene, "position", rng)
        assert (q.question, q.answer) in {
            ("Where is the red circle relative to the blue square?", "to the left of"),
            ("Where is the blue square relative to the red circle?", "to the right of"),
            ("Where is the blue square relative to the green circle?", "above"),
            ("Where is the green circle relative to the blue square?", "below")}
        q = ask(scene, "pope", rng)
        present = q.question in {f"Is there a {n} in the image?" for n in ("red circle", "blue square", "green circle")}
        assert q.answer == ("yes" if present else "no")
    assert ask((Obj("circle", "red", 0), Obj("circle", "blue", 1)), "colour", rng) is None  # ambiguous
    assert {(q.question, q.answer) for q in (ask(scene, "where", rng) for _ in range(50))} == {
        ("Where is the red circle?", "at the top left"), ("Where is the blue square?", "at the top right"),
        ("Where is the green circle?", "at the bottom right")}
    twins = (Obj("circle", "red", 0), Obj("circle", "red", 1))
    assert ask(twins, "where", rng) is None  # neither can be named alone
    with pytest.raises(ValueError, match="unknown question type 'wher'; valid: .*describe, where"):
        ask(scene, "wher", rng)
    assert normalise("To the left of.") == "to the left of"
    answers = Counter(ask(random_scene(rng), "pope", rng).answer for _ in range(2000))
    assert abs(answers["yes"] - answers["no"]) < 150  # balanced, as POPE is


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("w") / "world", scale=0.02)


def test_world_files_load_with_the_training_reader(world: Path):
    meta = json.loads((world / "world.json").read_text())
    assert meta["counts"]["train/generation.jsonl"] == 480 and meta["counts"]["test/prompts.jsonl"] == 300
    for kind in ("understanding", "text", "generation"):
        src = ManifestSource(world / "train" / f"{kind}.jsonl", kind=kind, shuffle=False)
        s = next(iter(src))
        assert s.kind == kind
    gen = [json.loads(x) for x in (world / "train" / "generation.jsonl").read_text().splitlines()]
    for row in gen[:50]:  # every caption is true of its image, by the judge
        scene = scene_from_json(row["scene"])
        p = Prompt("scene", row["caption"], (), scene=scene) if row["category"] == "scene" else None
        assert same_objects(scene, detect(Image.open(world / "train" / row["image"])))
        if p is not None:
            assert row["caption"] == describe(scene)
    assert Counter(r["category"] for r in gen).keys() == set(CATEGORIES) | {"scene"}


def test_held_out_combinations_never_reach_training(world: Path):
    held = held_out()
    assert len(held.colour_pairs) > 20 and len(held.layouts) == 4
    for name in ("generation", "understanding"):
        for line in (world / "train" / f"{name}.jsonl").read_text().splitlines():
            assert not held.violated_by(scene_from_json(json.loads(line)["scene"]))
    prompts = read_prompts(world / "test" / "prompts.jsonl")
    for cat in ("position", "color_attr"):
        flags = [h for p, h in prompts if p.category == cat]
        assert sum(flags) == len(flags) // 2  # half of them held out
    assert all(not h for p, h in prompts if p.category not in ("position", "color_attr"))
    # A held-out prompt's text never appears as a training caption.
    captions = {json.loads(x)["caption"] for x in (world / "train" / "generation.jsonl").read_text().splitlines()}
    assert not any(p.text in captions for p, h in prompts if h)


def test_world_is_deterministic(world: Path, tmp_path: Path):
    again = write_world(tmp_path / "again", scale=0.02)
    for f in ("train/generation.jsonl", "train/understanding.jsonl", "test/prompts.jsonl", "test/questions.jsonl"):
        assert (world / f).read_bytes() == (again / f).read_bytes()
    assert (world / "test/img/q000007.png").read_bytes() == (again / "test/img/q000007.png").read_bytes()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        write_world(tmp_path / "again", scale=0.02)


def test_binding_variants_differ_by_one_edit_and_keep_held_out_combinations_out():
    from januskit.world.variants import variants

    held = held_out()
    rng = np.random.default_rng(3)
    s = (Obj("circle", "red", 0), Obj("square", "blue", 1))
    vs = variants(s, rng, 4, allowed=lambda v: not held.violated_by(v))
    assert len(vs) == 4
    # the first edit swaps the colours: the same shapes and places, the colours bound the other way
    assert sorted((o.shape, o.colour, o.cell) for o in vs[0]) == [("circle", "blue", 0), ("square", "red", 1)]
    # the second swaps places: the same coloured objects in each other's cells
    assert sorted((o.shape, o.colour, o.cell) for o in vs[1]) == [("circle", "red", 1), ("square", "blue", 0)]
    keys = {tuple(sorted((o.shape, o.colour, o.cell) for o in v)) for v in [s, *vs]}
    assert len(keys) == 5  # all distinct in content
    for v in vs:
        assert len({o.cell for o in v}) == len(v)
        changed = sum(a != b for a, b in zip(sorted((o.shape, o.colour, o.cell) for o in s),
                                              sorted((o.shape, o.colour, o.cell) for o in v)))
        assert 1 <= changed <= 2  # one edit: one object changed, or two traded an attribute
    # a held-out filter is obeyed on every variant of many random scenes, and equal seeds give equal variants
    for i in range(200):
        base = random_scene(np.random.default_rng(i))
        got = variants(base, np.random.default_rng(i), 3, allowed=lambda v: not held.violated_by(v))
        assert not any(held.violated_by(v) for v in got)
        assert got == variants(base, np.random.default_rng(i), 3, allowed=lambda v: not held.violated_by(v))
    # a single object has no colours or places to swap: it still gets moved, recoloured and reshaped variants
    one = variants((Obj("diamond", "green", 2),), np.random.default_rng(0), 3)
    assert [len(v) for v in one] == [1, 1, 1] and len({(v[0].colour, v[0].shape, v[0].cell) for v in one}) == 3


def test_failure_modes_name_what_an_image_did_with_the_prompt():
    """Scenes built to each outcome, rendered and detected: the mode says which (the eval's breakdown). Objects
    sit at their cells' centres, so a diagonal pair is exactly diagonal (with offsets one axis would lead)."""
    pos = make_prompt("position", ("circle", "square"), relation="below")  # circle in a lower cell than the square
    layouts = {"correct": [("circle", 2), ("square", 0)], "reversed": [("circle", 0), ("square", 2)],
               "other axis": [("circle", 0), ("square", 1)], "diagonal": [("circle", 3), ("square", 0)],
               "missing": [("circle", 2), ("triangle", 0)]}
    for want, objs in layouts.items():
        found = detect(render(tuple(Obj(s, "red", c) for s, c in objs)))
        assert failure_mode(pos, found) == want, (want, found)
    attr = make_prompt("color_attr", ("circle", "square"), ("red", "blue"))
    scenes = {"correct": (("red", "circle"), ("blue", "square")), "colours swapped": (("blue", "circle"), ("red", "square")),
              "one colour wrong": (("red", "circle"), ("green", "square")),
              "both colours wrong": (("green", "circle"), ("yellow", "square")),
              "missing": (("red", "circle"), ("blue", "diamond"))}
    for want, objs in scenes.items():
        found = detect(render(tuple(Obj(s, c, k) for k, (c, s) in enumerate(objs))))
        assert failure_mode(attr, found) == want, (want, found)
    assert set(OUTCOMES["position"]) == set(layouts) and set(OUTCOMES["color_attr"]) == set(scenes)
    assert failure_mode(make_prompt("colors", ("circle",), ("red",)), []) is None  # other categories: no breakdown
    readme = Prompt("color_position", "a red circle to the left of a blue square", (("red", "circle"), ("blue", "square")),
                    relation="left of")
    assert failure_mode(readme, detect(render((Obj("square", "blue", 0), Obj("circle", "red", 1))))) == "reversed"
    assert failure_mode(readme, detect(render((Obj("circle", "red", 0), Obj("square", "green", 1))))) == "missing"
