"""Training captions written the way people write prompts (januskit.world.captions, the "v2" mix): every
kind is true of its own render and false of a contradicting one, its words mean its structured prompt
(read back by an independent parser here), held-out combinations never appear, and the default ("v1")
world is byte for byte what it always was."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from januskit.world.captions import CAPTION_KINDS, NEW_KINDS, CaptionMix, caption_mix, draw_caption, phrase
from januskit.world.dataset import generation_pair, held_out, read_prompts, write_world
from januskit.world.judge import detect, score
from januskit.world.prompts import CATEGORIES, Prompt, describe, sample_prompt, scene_from_json
from januskit.world.render import render
from januskit.world.scene import COLOUR_NAMES, SHAPES, Obj

VARIED = CaptionMix(tuple((k, 1.0) for k in CAPTION_KINDS), vary=1.0)
CANONICAL = replace(VARIED, vary=0.0)


# ------------------------------------------------------------------------------ an independent reader
_REL = {"to the left of": "left of", "on the left of": "left of", "left of": "left of",
        "to the right of": "right of", "on the right of": "right of", "right of": "right of",
        "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
        "underneath": "below"}
_NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "2": 2, "3": 3, "4": 4}
_CELL = {f"{v}{sep}{h}": 2 * r + c for r, v in enumerate(("top", "bottom")) for c, h in enumerate(("left", "right"))
         for sep in (" ", "-")} | {f"{v} {h}": 2 * r + c for r, v in enumerate(("upper", "lower"))
                                    for c, h in enumerate(("left", "right"))}
_NP = re.compile(rf"({'|'.join(_NUM)}) (?:({'|'.join(COLOUR_NAMES)}) )?({'|'.join(SHAPES)})(s?)"
                 rf"(?: (?:at|in) the ({'|'.join(_CELL)})(?: corner)?)?")
_FRAME = re.compile(r"^(a picture of |an image of |an image with |a drawing of |draw |show |there is |there are )?(.*?)"
                    r"( on a white background)?$")


def _np(text: str) -> list[tuple[str | None, str, int | None]]:
    m = _NP.fullmatch(text)
    assert m, f"not a noun phrase: {text!r}"
    det, colour, shape, s, cell = m.groups()
    n = _NUM[det]
    assert (n > 1) == (s == "s"), f"number and plural disagree: {text!r}"
    if det in ("a", "an"):
        assert det == ("an" if (colour or shape)[0] in "aeiou" else "a"), f"wrong article: {text!r}"
    assert n == 1 or cell is None, text
    return [(colour, shape, _CELL[cell] if cell else None)] * n


def read(text: str) -> tuple[str, object]:
    """("relation", ((c, s), rel, (c, s))) or ("objects", Counter of (colour, shape, cell))."""
    t = text[0].lower() + text[1:]
    assert t == t.lower(), f"capital letters inside: {text!r}"
    t = t[:-1] if t.endswith(".") else t
    frame, body, _ = _FRAME.fullmatch(t).groups()
    rel = re.fullmatch(rf"(.+?) ({'|'.join(sorted(_REL, key=len, reverse=True))}) (.+)", body)
    if rel:
        (a,), (b,) = _np(rel.group(1)), _np(rel.group(3))
        assert a[2] is None and b[2] is None
        first = 1
        out = ("relation", (a[:2], _REL[rel.group(2)], b[:2]))
    else:
        parts = re.split(r", and |, | and ", body)
        mentions = [_np(x) for x in parts]
        first = len(mentions[0])
        out = ("objects", Counter(m for ms in mentions for m in ms))
    if frame in ("there is ", "there are "):
        assert (frame == "there are ") == (first > 1), f"there is/are disagrees with the noun: {text!r}"
    return out


def meaning(p: Prompt) -> tuple[str, object]:
    if p.category in ("position", "color_position"):
        return "relation", (p.items[0], p.relation, p.items[1])
    if p.category == "scene":
        return "objects", Counter((o.colour, o.shape, o.cell) for o in p.scene)
    if p.category in ("counting", "color_count"):
        return "objects", Counter({(p.items[0][0], p.items[0][1], None): p.count})
    cells = p.cells or (None,) * len(p.items)
    return "objects", Counter((c, s, k) for (c, s), k in zip(p.items, cells))


# ------------------------------------------------------------------------------------------- wording
def test_canonical_wording_is_the_v1_text_and_the_readme_prompt():
    rng = np.random.default_rng(0)
    for cat in CATEGORIES:
        for _ in range(100):
            p = sample_prompt(rng, cat)
            assert phrase(p) == p.text
    for _ in range(100):
        p, s = draw_caption(rng, CANONICAL, "scene")
        assert p.text == phrase(p) == describe(s)
    p = Prompt("color_position", "", (("red", "circle"), ("blue", "square")), relation="left of")
    assert phrase(p) == "a red circle to the left of a blue square"
    assert phrase(replace(p, items=(("blue", "square"), ("red", "circle")), relation="below")) == \
        "a blue square below a red circle"
    assert phrase(Prompt("color_count", "", (("red", "circle"),), count=2)) == "two red circles"
    assert phrase(Prompt("objects", "", (("red", "circle"), (None, "square"), (None, "square"), ("blue", "diamond")))) \
        == "a red circle, two squares and a blue diamond"
    assert phrase(Prompt("objects", "", (("red", "circle"), (None, "square")), cells=(0, None))) == \
        "a red circle at the top left and a square"


@pytest.mark.parametrize("mix", [CANONICAL, VARIED], ids=["canonical", "varied"])
def test_caption_words_mean_their_structured_prompt(mix):
    """An independent reader turns every caption's text back into its meaning: the wording (frames,
    synonyms, digits, articles, plurals, capitals, full stops) never changes what the caption says."""
    rng = np.random.default_rng(1)
    seen = Counter()
    for _ in range(3000):
        p, _ = draw_caption(rng, mix)
        assert read(p.text) == meaning(p), p
        seen.update(w for w in re.findall(r"[a-z0-9-]+", p.text.lower()))
    if mix is VARIED:  # the wording really varies
        for w in ("picture", "image", "draw", "there", "are", "beneath", "under", "underneath", "over", "upper",
                  "corner", "one", "2", "3", "white", "background"):
            assert seen[w] > 0, w
        texts = [draw_caption(rng, mix)[0].text for _ in range(400)]
        assert 0.3 < np.mean([t.endswith(".") for t in texts]) < 0.7
        assert 0.2 < np.mean([t[0].isupper() for t in texts]) < 0.6


# ------------------------------------------------------------------------------------------- judge
def _contradictions(p: Prompt, scene) -> list[tuple[str, tuple]]:
    """Scenes that differ from `scene` in something the caption states, so the caption is false of them."""
    objs, out = list(scene), []
    free = [c for c in range(4) if c not in {o.cell for o in objs}]
    # one object becomes another shape: the listed shapes / the counted shape / a related shape are gone
    # (objects: any other shape changes the listed multiset of shapes)
    other = next((s for s in SHAPES if s != objs[0].shape and all(s != x[1] for x in p.items)),
                 next(s for s in SHAPES if s != objs[0].shape))
    if p.category in ("objects", "color_count", "color_position", "position"):
        out.append(("reshape", (replace(objs[0], shape=other),) + tuple(objs[1:])))
    if p.category in ("position", "color_position"):  # the two objects change places: the relation flips
        a, b = objs
        out.append(("swap", (replace(a, cell=b.cell, dx=b.dx, dy=b.dy), replace(b, cell=a.cell, dx=a.dx, dy=a.dy))))
    if p.category == "color_count":  # one fewer; and one of them in another colour
        out.append(("fewer", tuple(objs[1:])))
        out.append(("recolour", (replace(objs[0], colour=next(c for c in COLOUR_NAMES if c != objs[0].colour)),)
                    + tuple(objs[1:])))
    if p.category in ("color_position", "objects"):
        named = {c for c, _ in p.items if c is not None}
        for i, (o, (c, s)) in enumerate(zip(objs, _matched(p, objs))):
            if c is not None:  # a named colour changes to one the caption never names for this shape
                new = next(x for x in COLOUR_NAMES if x not in named)
                out.append(("recolour", tuple(replace(x, colour=new) if j == i else x for j, x in enumerate(objs))))
                break
    if p.category == "objects":
        if free:  # an object the caption does not list
            out.append(("extra", tuple(objs) + (Obj("circle", "red", free[0]),)))
        cells = p.cells or ()
        for (c, s), k in zip(p.items, cells):
            if k is not None and free:  # an object named at a cell moves to another
                out.append(("move", tuple(replace(o, cell=free[0]) if o.cell == k else o for o in objs)))
                break
    return out


def _matched(p: Prompt, objs) -> list[tuple[str | None, str]]:
    """The caption item each object stands for (objects: by the caption's own structure)."""
    if p.category == "color_position":
        return [next(it for it in p.items if it[1] == o.shape and it[0] in (None, o.colour)) for o in objs]
    cells = p.cells or (None,) * len(p.items)
    pool = list(zip(p.items, cells))
    out = []
    for o in objs:  # objects with a named cell first take theirs; the rest by shape and colour
        hit = next((x for x in pool if x[1] == o.cell), None) or \
            next(x for x in pool if x[1] is None and x[0][1] == o.shape and x[0][0] in (None, o.colour))
        pool.remove(hit)
        out.append(hit[0])
    return out


@pytest.mark.parametrize("kind", NEW_KINDS + ("scene",))
def test_every_caption_kind_is_true_of_its_render_and_false_of_a_contradiction(kind):
    rng = np.random.default_rng(2)
    reasons = Counter()
    for i in range(80):
        p, s = draw_caption(rng, VARIED if i % 2 else CANONICAL, kind)
        found = detect(render(s))
        assert score(p, found), (p, found)
        for reason, bad in _contradictions(p, s):
            assert not score(p, detect(render(bad))), (reason, p, bad)
            reasons[reason] += 1
    want = {"color_position": {"reshape", "swap", "recolour"}, "position_some_colours": {"reshape", "swap", "recolour"},
            "color_count": {"reshape", "fewer", "recolour"}, "objects": {"reshape", "recolour", "extra"},
            "partial_scene": {"reshape", "recolour", "extra", "move"}, "scene": set()}[kind]
    assert want <= set(reasons), reasons


def test_new_categories_score_by_their_rule():
    """The judge's rules for the new categories on hand-made scenes."""
    red_c, blue_s = Obj("circle", "red", 0), Obj("square", "blue", 1)
    found = detect(render((red_c, blue_s)))
    cp = Prompt("color_position", "", (("red", "circle"), ("blue", "square")), relation="left of")
    assert score(cp, found) and not score(replace(cp, relation="right of"), found)
    assert not score(replace(cp, items=(("blue", "circle"), ("blue", "square"))), found)
    assert score(replace(cp, items=(("red", "circle"), (None, "square"))), found)
    cc = Prompt("color_count", "", (("red", "circle"),), count=2)
    two = detect(render((red_c, Obj("circle", "red", 3), Obj("circle", "blue", 2))))
    assert score(cc, two) and not score(replace(cc, count=3), two)
    assert score(Prompt("counting", "", ((None, "circle"),), count=3), two)  # counting ignores colour, as before
    assert Prompt.from_json(json.loads(json.dumps(cc.to_json()))) == cc
    ob = Prompt("objects", "", (("red", "circle"), (None, "square")), cells=(0, None))
    assert score(ob, found) and not score(replace(ob, cells=(1, None)), found)
    assert not score(ob, detect(render((red_c, blue_s, Obj("diamond", "green", 3)))))  # nothing unlisted
    assert score(replace(ob, cells=None), found)
    assert Prompt.from_json(json.loads(json.dumps(ob.to_json()))) == ob


# --------------------------------------------------------------------------------------- held out
def test_held_out_combinations_never_reach_new_captions():
    """5,000 training pairs of the new kinds (and 5,000 of the whole v2 mix): no held-out colour pair or
    layout in an image or a caption, although unfiltered draws name them often."""
    held = held_out()
    rng = np.random.default_rng(3)
    new_only = caption_mix({k: 1 for k in NEW_KINDS})
    unfiltered = sum(held.mentioned_by(draw_caption(rng, new_only)[0]) for _ in range(2000))
    assert unfiltered > 50  # the filter has work to do
    kinds = Counter()
    for mix in (new_only, caption_mix("v2")):
        for _ in range(5000):
            p, s = generation_pair(rng, held, "train", mix)
            assert not held.violated_by(s) and not held.mentioned_by(p), p
            kinds[p.category] += 1
    assert {"color_position", "color_count", "objects"} <= set(kinds)


def test_mentioned_by_reads_relations_cells_and_colour_pairs():
    held = held_out()
    pair = sorted(next(iter(held.colour_pairs)))
    (c1, s1), (c2, s2) = pair
    assert held.mentioned_by(Prompt("objects", "", ((c1, s1), (c2, s2))))
    assert not held.mentioned_by(Prompt("objects", "", ((c1, s1), (None, s2))))
    a, rel, b = sorted(held.layouts)[0]
    assert held.mentioned_by(Prompt("color_position", "", (("red", a), (None, b)), relation=rel))
    flipped = {"left of": "right of", "above": "below"}[rel]
    assert held.mentioned_by(Prompt("color_position", "", (("red", b), (None, a)), relation=flipped))
    cells = (0, 1) if rel == "left of" else (0, 2)
    assert held.mentioned_by(Prompt("objects", "", ((None, a), (None, b)), cells=cells))
    assert not held.mentioned_by(Prompt("objects", "", ((None, a), (None, b)), cells=(0, 3)))  # diagonal


# ------------------------------------------------------------------------------------ the written world
# sha256[:16] of the files `write_world(scale=0.02)` wrote before the caption mixes existed (git 2843d0e):
# the default world must stay byte-identical (the shipped model's rebuild reads it).
V1_FILES = {
    "test/prompts.jsonl": "7dc4f60e97bc37a0", "test/questions.jsonl": "6f3b4563e831a055",
    "train/generation.jsonl": "9d1d4a27c45fd5b7", "train/text.jsonl": "dda694fd76a36edf",
    "train/understanding.jsonl": "c6336156e6846593", "val/generation.jsonl": "781f8aa39b98366d",
    "val/prompts.jsonl": "7f91a92f5681dd07", "val/questions.jsonl": "950c440ff7367100",
    "val/text.jsonl": "e7db6eb703f0b225", "val/understanding.jsonl": "9ce634e8ee6fb436",
    "world.json": "abeb34df3f4a7061",  # as written then, before the edit splits' counts (see _sha_before_edits)
}
EDIT_COUNTS = ("train/edit.jsonl", "val/edits.jsonl", "test/edits.jsonl")  # added with the edit tasks (git eafe437)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cap")
    return write_world(d / "v1", scale=0.02), write_world(d / "v2", scale=0.02, captions="v2")


def _sha(path: Path) -> str:
    if path.name == "world.json":  # its counts gained the edit splits' entries; everything else is as it was
        meta = json.loads(path.read_text())
        assert {k: meta["counts"].pop(k) for k in EDIT_COUNTS if k in meta["counts"]}.keys() == set(EDIT_COUNTS)
        return hashlib.sha256((json.dumps(meta, indent=1) + "\n").encode()).hexdigest()[:16]
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_default_world_is_byte_identical_and_v2_changes_only_train(worlds):
    v1, v2 = worlds
    assert {f: _sha(v1 / f) for f in V1_FILES} == V1_FILES
    # v2 changes the generation pairs of the train split and nothing else: test/, val/, the understanding
    # conversations and text documents (and their images) are the v1 world's bytes
    def changed(rel: str) -> bool:
        return rel in ("world.json", "train/generation.jsonl") or rel.startswith("train/img/g")

    same = [f for f in sorted(v1.rglob("*")) if f.is_file() and not changed(f.relative_to(v1).as_posix())]
    assert len(same) > 1000 and (v1 / "train/understanding.jsonl") in same and (v1 / "test/prompts.jsonl") in same
    for f in same:
        assert f.read_bytes() == (v2 / f.relative_to(v1)).read_bytes(), f
    assert _sha(v2 / "train/generation.jsonl") != V1_FILES["train/generation.jsonl"]
    assert json.loads((v2 / "world.json").read_text())["captions"] == "v2"
    with pytest.raises(ValueError, match="unknown caption mix 'v9'"):
        write_world(v1.parent / "v9", captions="v9")
    assert not (v1.parent / "v9").exists()


def test_v2_train_captions_are_true_of_their_images(worlds):
    _, v2 = worlds
    rows = [json.loads(x) for x in (v2 / "train/generation.jsonl").read_text().splitlines()]
    cats = Counter(r["category"] for r in rows)
    assert set(cats) == set(CATEGORIES) | {"scene", "color_position", "color_count", "objects"}
    held = held_out()
    for r in rows:
        p = Prompt.from_json(r["prompt"])
        assert p.text == r["caption"] and read(p.text) == meaning(p)
        assert score(p, detect(Image.open(v2 / "train" / r["image"]))), r
        assert not held.violated_by(scene_from_json(r["scene"])) and not held.mentioned_by(p)
    # no held-out test prompt, in any wording the reader accepts, is a training caption
    captions = {_key(read(r["caption"])) for r in rows}
    test = read_prompts(v2 / "test/prompts.jsonl")
    assert sum(h for _, h in test) == 50 and not any(_key(meaning(p)) in captions for p, h in test if h)


def _key(m: tuple[str, object]) -> tuple:
    kind, what = m
    return kind, frozenset(what.items()) if isinstance(what, Counter) else what


def test_tokenizer_trained_on_v1_text_encodes_the_new_wording():
    """The recipe's tokenizer learns from the written train split; words it never saw (a v1 world has no
    "beneath" or "picture") still encode to ids that decode to the same text (byte-level BPE), at a
    cost of a few more tokens, and a v2 world's tokenizer has learnt them."""
    from januskit.processing.synthetic_tokenizer import build_synthetic_tokenizer

    rng = np.random.default_rng(4)
    v1_text = "\n".join(generation_pair(rng, held_out(), "train")[0].text for _ in range(3000))
    v2 = [generation_pair(rng, held_out(), "train", VARIED)[0].text for _ in range(3000)]
    tok1 = build_synthetic_tokenizer(512, seed_text=v1_text)
    tok2 = build_synthetic_tokenizer(512, seed_text="\n".join(v2))
    probe = ["A drawing of a red circle beneath a blue square.", "there are 3 green diamonds in the upper left corner",
             "Draw one cyan triangle underneath a purple circle on a white background."]
    for t in probe + v2[:300]:
        ids = tok1.encode(t, add_bos=False)
        assert tok1.decode(ids) == t and len(ids) < 64
    n1 = sum(len(tok1.encode(t, add_bos=False)) for t in v2[:300])
    n2 = sum(len(tok2.encode(t, add_bos=False)) for t in v2[:300])
    assert n2 < n1


def test_v3_mix_weights_the_binding_kinds_up():
    """The default recipe's "v3" mix draws each judge category in proportion to its kinds' weights
    (6,000 draws, within 0.02): colour attribution, colour + position and position up, single objects and
    whole scenes down, against v2's equal weights."""
    expected = {"single_object": 0.5, "two_object": 1.5, "counting": 1, "colors": 1, "position": 2,
                "color_attr": 3, "scene": 0.5, "color_position": 3, "color_count": 1, "objects": 1.5}
    total = sum(expected.values())
    rng = np.random.default_rng(0)
    for name, weights in (("v3", expected), ("v2", None)):
        got = Counter(draw_caption(rng, caption_mix(name))[0].category for _ in range(6000))
        if weights is None:  # v2: every kind weight 1 except color_position 2, so colour attribution is rarer
            assert got["color_attr"] / 6000 == pytest.approx(1 / 13, abs=0.02)
            continue
        assert set(got) == set(expected)
        for cat, w in expected.items():
            assert got[cat] / 6000 == pytest.approx(w / total, abs=0.02), cat
