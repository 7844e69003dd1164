"""Fresh scenes on the fly (januskit.train.data.fresh): every sample a new render, drawn as the train
split draws them, seeded, resumable mid-stream, held-out combinations excluded, and usable as a
trainer's [data] builder with VQ ids computed on the fly."""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch

from januskit.checkpoint.init import preset_pipeline_parts
from januskit.train.config import DataContext
from januskit.train.data import fresh
from januskit.train.data.batch import IGNORE
from januskit.processing.image import to_gen_pixels
from januskit.train.data.encode import SampleEncoder, fill_vq_ids, vq_tokenizer
from januskit.train.data.records import ManifestSource
from januskit.world.captions import CaptionMix, V1_KINDS
from januskit.world.dataset import held_out, write_world
from januskit.world.judge import detect, score
from januskit.world.prompts import Prompt, scene_from_json
from januskit.world.render import render
from januskit.world.scene import random_scene

WorldSource = fresh.WorldSource


@pytest.fixture(scope="module")
def parts():
    return preset_pipeline_parts("tiny-janus-pro", seed=0)


def _view(s) -> tuple:
    """A sample's content, images as bytes."""
    msgs = tuple((m.role, m.content) for m in s.messages) if s.messages else None
    target = None if s.target is None else np.asarray(s.target).tobytes()
    return (s.kind, s.key, s.caption or s.instruction, s.text, msgs, tuple(np.asarray(im).tobytes() for im in s.images),
            target)


@pytest.mark.parametrize("kind", fresh.WORLD_KINDS)
def test_same_seed_same_samples_and_resume_mid_stream(kind):
    a = WorldSource(kind, seed=3, captions="v2")
    first = [_view(next(a)) for _ in range(30)]
    b = WorldSource(kind, seed=3, captions="v2")
    assert [_view(next(b)) for _ in range(30)] == first
    assert len({v[2:5] if kind != "edit" else v[5] for v in first}) >= 25  # new scenes, not repeats
    other = WorldSource(kind, seed=4, captions="v2")
    assert [_view(next(other)) for _ in range(30)] != first
    # killed after 17 samples, resumed from the saved state (through JSON and torch.save weights_only)
    c = WorldSource(kind, seed=3, captions="v2")
    [next(c) for _ in range(17)]
    st = c.state_dict()
    buf = io.BytesIO()
    torch.save(st, buf)
    buf.seek(0)
    d = WorldSource(kind, seed=3, captions="v2")
    d.load_state_dict(json.loads(json.dumps(torch.load(buf, weights_only=True))))
    assert [_view(next(d)) for _ in range(13)] == first[17:]
    with pytest.raises(ValueError, match="cannot resume: captions was 'v1'"):
        WorldSource(kind, seed=3, captions="v2").load_state_dict(WorldSource(kind, seed=3).state_dict())
    with pytest.raises(ValueError, match="cannot resume: seed was 3"):
        WorldSource(kind, seed=5, captions="v2").load_state_dict(st)


def test_question_first_conversations_and_their_resume_check():
    """question_first puts the first question before the image (later turns as before), draws the same scenes
    and questions, and is part of the resume check; a state saved before the option existed resumes as off."""
    plain, qfirst = WorldSource("understanding", seed=2), WorldSource("understanding", seed=2, question_first=True)
    for _ in range(10):
        a, b = next(plain), next(qfirst)
        ma, mb = [m.content for m in a.messages], [m.content for m in b.messages]
        assert ma[0].startswith("<image_placeholder>\n") and ma[0].count("<image_placeholder>") == 1
        assert mb[0] == ma[0].removeprefix("<image_placeholder>\n") + "\n<image_placeholder>"
        assert ma[1:] == mb[1:] and len(ma) >= 2
        assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    old = {k: v for k, v in WorldSource("understanding", seed=2).state_dict().items() if k != "question_first"}
    WorldSource("understanding", seed=2).load_state_dict(old)
    with pytest.raises(ValueError, match="cannot resume: question_first was False in the checkpoint, now True"):
        WorldSource("understanding", seed=2, question_first=True).load_state_dict(old)


def test_ranks_split_one_stream():
    one = WorldSource("generation", seed=1)
    whole = [_view(next(one)) for _ in range(12)]
    r0, r1 = (WorldSource("generation", seed=1, rank=r, world_size=2) for r in (0, 1))
    got = [x for pair in zip(*[[_view(next(r)) for _ in range(6)] for r in (r0, r1)]) for x in pair]
    assert got == whole


def test_reshard_goes_on_past_every_sample_taken():
    """Two ranks took 5 and 2 samples (indices 0, 2, ..., 8 and 1, 3); resharded to three ranks they go on at 9,
    10, 11 with stride 3: nothing is drawn twice, and only 5 and 7 (the lagging rank's next two) are passed over."""
    whole = WorldSource("generation", seed=1)
    ref = [_view(next(whole)) for _ in range(20)]
    old = [WorldSource("generation", seed=1, rank=r, world_size=2) for r in (0, 1)]
    for r, k in ((0, 5), (1, 2)):
        for _ in range(k):
            next(old[r])
    states = json.loads(json.dumps([s.state_dict() for s in old]))
    new = [WorldSource("generation", seed=1, rank=r, world_size=3) for r in range(3)]
    for r, s in enumerate(new):
        s.load_state_dict(s.reshard(states, r, 3))
    assert [s.index for s in new] == [9, 10, 11]
    assert [_view(next(new[r])) for r in range(3)] == ref[9:12]
    assert [_view(next(new[0]))] == [ref[12]]


@pytest.mark.parametrize("captions", ["v1", "v2"])
def test_no_held_out_combination_in_5000_fresh_samples(captions):
    held = held_out()
    gen = WorldSource("generation", seed=0, captions=captions)
    cats = Counter()
    for i in range(5000):
        rec, scene = gen.item(i)
        p = Prompt.from_json(rec["prompt"])
        assert rec["caption"] == p.text and not held.violated_by(scene) and not held.mentioned_by(p), rec
        cats[p.category] += 1
    und = WorldSource("understanding", seed=0)
    for i in range(2000):
        rec, scene = und.item(i)
        assert not held.violated_by(scene)
    # the filter is not idle: unfiltered scenes show held-out combinations often
    rng = np.random.default_rng(0)
    assert sum(held.violated_by(random_scene(rng)) for _ in range(2000)) > 100
    if captions == "v1":  # GenEval's six and scene descriptions, as the written train split
        assert set(cats) == set(V1_KINDS) and min(cats.values()) > 400  # multi-object kinds are filtered more
    else:
        assert {"color_position", "color_count", "objects"} <= set(cats)


def test_fresh_samples_are_distributed_as_the_written_train_split(tmp_path):
    """The same draws as write_split: category, object-count and question-type frequencies agree with a
    written train split within sampling noise, and a fresh sample read back from a manifest is the same
    sample."""
    world = write_world(tmp_path / "w", scale=0.05, captions="v2")  # 1,200 generation, 600 understanding
    rows = [json.loads(x) for x in (world / "train/generation.jsonl").read_text().splitlines()]
    gen = WorldSource("generation", seed=0, captions="v2")
    fresh_rows = [gen.item(i)[0] for i in range(3000)]

    def freq(rs, key):
        c = Counter(key(r) for r in rs)
        return {k: v / len(rs) for k, v in c.items()}

    for key in (lambda r: r["category"], lambda r: len(r["scene"])):
        a, b = freq(rows, key), freq(fresh_rows, key)
        assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 0.05, (a, b)
    und_rows = [json.loads(x) for x in (world / "train/understanding.jsonl").read_text().splitlines()]
    und = WorldSource("understanding", seed=0)
    fresh_und = [und.item(i)[0] for i in range(1500)]
    qkey = lambda r: " ".join(r["messages"][0]["content"].split("\n")[1].split()[:2])  # noqa: E731  "How many", ...
    for key in (lambda r: len(r["scene"]), lambda r: len(r["messages"]), qkey):
        a, b = freq(und_rows, key), freq(fresh_und, key)
        assert max(abs(a.get(k, 0) - b.get(k, 0)) for k in a.keys() | b.keys()) < 0.06, (a, b)
    text_rows = [json.loads(x) for x in (world / "train/text.jsonl").read_text().splitlines()]
    text = WorldSource("text", seed=0)
    fresh_text = [text.item(i)[0] for i in range(900)]
    for key in (lambda r: r["text"].count("?"), lambda r: r["text"].count(" at the ")):  # questions, objects
        a, b = freq(text_rows, key), freq(fresh_text, key)
        assert max(abs(a.get(k, 0) - b.get(k, 0)) for k in a.keys() | b.keys()) < 0.08, (a, b)
    # a fresh sample written out as a manifest line and read back is the same sample
    rec, scene = gen.item(7)
    render(scene).save(tmp_path / "0.png")
    (tmp_path / "one.jsonl").write_text(json.dumps(rec) + "\n")
    back = next(ManifestSource(tmp_path / "one.jsonl", kind="generation", shuffle=False))
    s = gen.sample(7)
    assert back.caption == s.caption and np.array_equal(np.asarray(back.images[0]), np.asarray(s.images[0]))
    assert score(Prompt.from_json(rec["prompt"]), detect(s.images[0]))
    assert scene_from_json(rec["scene"]) == scene


def _ctx(model, **kw) -> DataContext:
    base = dict(ratio=(5, 1, 4), batch_size=10, grad_accum=1, micro_batch_size=2, seq_len=512, seed=3, rank=0,
                world=1, model_config=model.config, source="tiny-janus-pro", model=model)
    return DataContext(**{**base, **kw})


def test_builder_makes_batches_with_vq_ids_on_the_fly_and_resumes_exactly(parts):
    model, _ = parts
    fields = ("input_ids", "positions", "doc_ids", "und_mask", "gen_mask", "gen_ids", "text_labels", "image_labels",
              "kinds", "pixel_values")
    a = fresh.build(_ctx(model), captions="v2", prefetch=1)
    assert a.per_step
    batches, states = [], []
    for _ in range(4):
        batches.append(next(a))
        states.append(a.state_dict())
        assert a.last["samples"] == {"understanding": 5, "text": 1, "generation": 4}
        b = batches[-1]
        assert int((b.image_labels != IGNORE).sum()) == 64 * 4  # every generation sample got its VQ ids
        assert int(b.image_labels[b.image_labels != IGNORE].max()) < model.config.vq.codebook_size
    a.close()
    buf = io.BytesIO()
    torch.save(states[1], buf)
    buf.seek(0)
    c = fresh.build(_ctx(model), captions="v2", prefetch=0)
    c.load_state_dict(torch.load(buf, weights_only=True))
    for want in batches[2:]:
        got = next(c)
        for f in fields:
            assert torch.equal(getattr(got, f), getattr(want, f)), f
    # the VQ ids of a fresh generation sample are the frozen VQ's encoding of its render
    enc = SampleEncoder.for_model(model, parts[1], seed=3, cfg_drop=0.0)
    src = WorldSource("generation", seed=3, captions="v2")
    s = enc(src.sample(2))
    side = model.config.vq.image_size
    assert s.gen_ids is None and torch.equal(s.gen_pixels, to_gen_pixels(render(src.item(2)[1]), side))
    assert fill_vq_ids([s], vq_tokenizer(model), model.config.vq.codebook_size) == 1
    assert torch.equal(s.gen_ids, vq_tokenizer(model)(to_gen_pixels(render(src.item(2)[1]), side)[None])[0])
    # a different world seed gives different data
    d = fresh.build(_ctx(model), captions="v2", seed=11, prefetch=0)
    assert not torch.equal(next(d).input_ids, batches[0].input_ids)


def test_builder_mixes_fresh_kinds_with_files_and_checks_its_options(parts, tmp_path):
    model, _ = parts
    world = write_world(tmp_path / "w", scale=0.01)
    data = fresh.build(_ctx(model), kinds=["understanding", "text"],
                       generation=str(world / "train/generation.jsonl"), prefetch=0)
    next(data)
    st = data.state_dict()["sources"]
    assert "index" in st["understanding"] and "pos" in st["generation"]  # fresh and manifest positions
    with pytest.raises(ValueError, match="unknown kind"):
        fresh.build(_ctx(model), kinds=["pictures"])
    with pytest.raises(ValueError, match="given both as files and as a built-in source"):
        fresh.build(_ctx(model), generation=str(world / "train/generation.jsonl"))
    with pytest.raises(ValueError, match="ratio gives 'generation' weight 4 but there is no generation source"):
        fresh.build(_ctx(model), kinds=["understanding", "text"])
    with pytest.raises(ValueError, match="unknown caption kind"):
        fresh.build(_ctx(model), captions={"selfies": 1})
    mix = CaptionMix((("color_position", 1.0),), vary=0.0)
    src = WorldSource("generation", captions={"color_position": 1, "vary": 0})
    assert src.state_dict()["captions"] == mix.to_json()
    rows = [src.item(i)[0] for i in range(20)]
    assert {r["category"] for r in rows} == {"color_position"}
    assert all(r["caption"] == Prompt.from_json(r["prompt"]).text for r in rows)
    assert all(" left of " in r["caption"] or " right of " in r["caption"] or " above " in r["caption"]
               or " below " in r["caption"] for r in rows)  # vary=0: the canonical words


def test_trainer_runs_on_fresh_data_from_a_run_config(tmp_path):
    """`[data] builder = "januskit.train.data.fresh:build"` in a run config: two steps train and save."""
    from januskit.train.config import RunConfig
    from januskit.train.trainer import train

    cfg = RunConfig.from_dict({
        "model": {"source": "tiny-janus-pro", "seed": 0},
        "stage": {"name": "janus-pro/3", "steps": 2, "batch_size": 4, "lr": 1e-3, "warmup": 1},
        "train": {"out": str(tmp_path / "run"), "micro_batch_size": 2, "seq_len": 512, "save_every": 2,
                  "log_every": 1, "export_dtype": "float32", "seed": 0, "progress": False},
        "data": {"builder": "januskit.train.data.fresh:build", "captions": "v2", "seed": 5, "prefetch": 0},
    })
    out = train(cfg)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss_gen"]) and np.isfinite(m["loss_und"]) for m in metrics), metrics
