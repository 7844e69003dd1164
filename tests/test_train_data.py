"""Training data: on-disk format and validation, answer-only masking, generation sequences and CFG drop,
per-step ratio mixing, deterministic shuffling with exact resume, rank sharding, packing (packed forward
equals each sample alone), VQ id caching. Tiny preset, CPU, built in tmp folders."""
from __future__ import annotations

import copy
import io
import itertools
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from januskit.checkpoint.init import preset_pipeline_parts
from januskit.models.llama import PackedSegments
from januskit.pipelines.janus import JanusPipeline
from januskit.processing.chat import SYSTEM_PROMPT, Message
from januskit.processing.image import to_gen_pixels
from januskit.sampling.image_ar import cfg_rows
from januskit.train.data.batch import IGNORE
from januskit.train.data.records import (DataError, ManifestSource, Sample, TarSource, file_fetch, jsonl_rows,
                                       open_source, parse_record)
from januskit.train.data.encode import SampleEncoder, fill_vq_ids, vq_tokenizer
from januskit.train.data.loader import TrainData
from januskit.train.data.mixing import Mixer, allocate
from januskit.train.data.packing import first_fit, pack, split_rows, unpacked
from januskit.train.data.vq_cache import cache_vq_ids

N_UND, N_TEXT, N_GEN = 12, 6, 10


@pytest.fixture(scope="module")
def parts():
    model, proc = preset_pipeline_parts("tiny-janus-pro", seed=0)
    return model, proc


@pytest.fixture(scope="module")
def encoder(parts):
    model, proc = parts
    return SampleEncoder.for_model(model, proc, seed=0, cfg_drop=0.0)


def noise_png(path: Path, w: int, h: int, seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def records(n_und: int = N_UND, n_text: int = N_TEXT, n_gen: int = N_GEN) -> dict[str, list[dict]]:
    """JSONL-form records per kind; every sample's text is unique (it identifies the sample)."""
    und = []
    for i in range(n_und):
        if i % 3 == 0:  # two images, two turns
            msgs = [{"role": "user", "content": f"<image_placeholder> and <image_placeholder>: compare {i}."},
                    {"role": "assistant", "content": f"The first is redder, case {i}."},
                    {"role": "user", "content": "Which is larger?"},
                    {"role": "assistant", "content": "The second one."}]
            images = [f"img/u{i}a.png", f"img/u{i}b.png"]
        elif i % 3 == 1:  # no marker: the image goes first
            msgs = [{"role": "user", "content": f"Describe the image in detail. ({i})"},
                    {"role": "assistant", "content": f"A noisy square number {i}."}]
            images = [f"img/u{i}a.png"]
        else:
            msgs = [{"role": "user", "content": f"<image_placeholder>\nWhat colour is sample {i}?"},
                    {"role": "assistant", "content": f"It is mostly grey, {i}."}]
            images = [f"img/u{i}a.png"]
        und.append({"kind": "understanding", "messages": msgs, "images": images, "id": f"u{i}"})
    text = []
    for i in range(n_text):
        if i % 2:
            text.append({"kind": "text", "id": f"t{i}", "messages": [
                {"role": "user", "content": f"What is {i} plus 30?"}, {"role": "assistant", "content": f"{i + 30}."}]})
        else:
            text.append({"kind": "text", "id": f"t{i}", "text": f"The horizon divides the image, document {i}."})
    gen = [{"kind": "generation", "id": f"g{i}", "image": f"img/g{i}.png",
            "caption": f"A red circle above a blue square, number {i}. Soft light."} for i in range(n_gen)]
    return {"understanding": und, "text": text, "generation": gen}


def write_jsonl(root: Path, recs: list[dict], name: str = "data.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for r in recs:
        for j, p in enumerate(r.get("images", []) + ([r["image"]] if "image" in r else [])):
            if not (root / p).exists():
                noise_png(root / p, 24 + 9 * j + 2 * len(p), 30 + 3 * len(p), seed=sum(map(ord, p)))
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def write_tars(src_root: Path, recs: list[dict], dst: Path, n_shards: int) -> list[Path]:
    """The same samples as WebDataset shards: key.json (no image fields) + key.<i>.png members."""
    dst.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(n_shards):
        path = dst / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s, len(recs), n_shards):
                r = dict(recs[i])
                refs = r.pop("images", []) + ([r.pop("image")] if "image" in r else [])
                add_member(tf, f"{i:06d}.json", json.dumps(r).encode())
                for j, ref in enumerate(refs):
                    add_member(tf, f"{i:06d}.{j}.png", (src_root / ref).read_bytes())
        shards.append(path)
    return shards


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{"jsonl": {kind: manifest folder}, "tar": {kind: shard folder}}."""
    base = tmp_path_factory.mktemp("data")
    out: dict[str, dict[str, Path]] = {"jsonl": {}, "tar": {}}
    for kind, recs in records().items():
        root = base / "jsonl" / kind
        write_jsonl(root, recs)
        write_tars(root, recs, base / "tar" / kind, n_shards=4 if kind != "text" else 3)
        out["jsonl"][kind], out["tar"][kind] = root, base / "tar" / kind
    return out


def ident(s) -> str:
    """A sample's identity independent of file format: its unique text."""
    if s.messages is not None:
        return s.messages[0].content
    return s.text if s.text is not None else s.caption


def answers_of(msgs: list[Message]) -> list[str]:
    return [m.content for m in msgs if m.role == "assistant"]


# ------------------------------------------------------------------------------------------------- format


def test_jsonl_and_tar_hold_the_same_samples(dataset):
    for kind in ("understanding", "text", "generation"):
        a = list(ManifestSource(dataset["jsonl"][kind], kind=kind, shuffle=False, epochs=1))
        b = list(TarSource(dataset["tar"][kind], kind=kind, shuffle=False, epochs=1))
        assert len(a) == len(b) == len(records()[kind])
        by_id = {ident(s): s for s in b}
        assert set(by_id) == {ident(s) for s in a}
        for s in a:
            t = by_id[ident(s)]
            assert s.kind == t.kind == kind
            assert [(m.role, m.content) for m in s.messages or []] == [(m.role, m.content) for m in t.messages or []]
            assert (s.text, s.caption) == (t.text, t.caption)
            assert len(s.images) == len(t.images)
            for x, y in zip(s.images, t.images):
                assert np.array_equal(np.asarray(x), np.asarray(y))
        assert a[0].key.endswith("data.jsonl:1") and ".tar:" in b[0].key


def test_open_source_picks_the_reader(dataset):
    assert isinstance(open_source(dataset["jsonl"]["text"]), ManifestSource)
    assert isinstance(open_source(dataset["tar"]["text"]), TarSource)


# ------------------------------------------------------------------------------------------ token sequences


def expected_targets(proc, msgs: list[Message], images, system=SYSTEM_PROMPT) -> tuple[list[int], set[int]]:
    """Inference's view: the ids of the whole chat, and for each assistant turn the positions after the
    prompt `...Assistant:` that inference would give the model (Processor.encode_chat on the prefix)."""
    full = proc.encode_chat(msgs_with_images(msgs, images), system).ids
    targets: set[int] = set()
    for i in range(1, len(msgs), 2):
        prompt = proc.encode_chat(msgs_with_images(msgs[:i], images), system).ids
        upto = proc.encode_chat(msgs_with_images(msgs[:i + 1], images), system).ids
        assert full[:len(upto)] == upto and upto[:len(prompt)] == prompt
        targets |= set(range(len(prompt), len(upto)))
    return full, targets


def msgs_with_images(msgs: list[Message], images) -> list[Message]:
    out, k = [], 0
    for m in msgs:
        n = m.content.count("<image_placeholder>")
        out.append(Message(m.role, m.content, list(images[k:k + n])))
        k += n
    return out


def test_understanding_loss_only_on_answers_token_by_token(dataset, encoder, parts):
    _, proc = parts
    tok = proc.tokenizer
    src = ManifestSource(dataset["jsonl"]["understanding"], shuffle=False, epochs=1)
    checked = 0
    for s in src:
        e = encoder(s)
        ids, targets = expected_targets(proc, s.messages, s.images)
        assert e.ids.tolist() == ids  # exactly what inference feeds the model
        got = set(torch.nonzero(e.text_target).flatten().tolist())
        assert got == targets
        # the targets, turn by turn, decode to " answer<EOS>" and nothing else
        spans = [list(g) for k, g in itertools.groupby(range(len(ids)), key=lambda t: t in got) if k]
        assert len(spans) == len(answers_of(s.messages))
        for span, ans in zip(spans, answers_of(s.messages)):
            assert ids[span[-1]] == tok.eos_id
            assert tok.decode([ids[t] for t in span], skip_special_tokens=False) == f" {ans}<｜end▁of▁sentence｜>"
            assert tok.decode([ids[span[0] - 1]], skip_special_tokens=False) == ":"  # after "<|Assistant|>:"
        # shifted labels: slot t predicts token t+1 exactly where t+1 is a target
        text_labels, image_labels = e.labels()
        for t in range(len(ids) - 1):
            assert text_labels[t] == (ids[t + 1] if t + 1 in targets else IGNORE)
        assert text_labels[-1] == IGNORE and bool((image_labels == IGNORE).all())
        # image slots and pixels
        n = proc.n_image_tokens
        assert int(e.und_mask.sum()) == n * len(s.images) and not bool((e.und_mask & e.text_target).any())
        assert bool((e.ids[e.und_mask] == tok.image_id).all())
        assert torch.equal(e.pixel_values, torch.stack([proc.transform(im) for im in s.images]))
        checked += 1
    assert checked == N_UND


def test_unmarked_images_go_where_the_models_processor_puts_them(parts, tmp_path):
    """A record without markers trains in the layout inference uses: images first for the official layout, after
    the first question for a model whose processor_config.json says image_placement "after"; a record with
    markers keeps them where they are."""
    model, proc = parts
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    fetch = file_fetch(tmp_path, "x.jsonl:1")
    plain = {"kind": "understanding", "images": ["a.png"],
             "messages": [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}]}
    marked = copy.deepcopy(plain)
    marked["messages"][0]["content"] = "<image_placeholder>\nWhat colour?"
    after = copy.copy(proc)
    after.image_placement = "after"
    for p, want in ((proc, "<image_placeholder>\nWhat colour?"), (after, "What colour?\n<image_placeholder>")):
        enc = SampleEncoder.for_model(model, p, seed=0, cfg_drop=0.0)
        s = parse_record(plain, "x.jsonl:1", fetch)
        assert s.placed and s.messages[0].content == "<image_placeholder>\nWhat colour?"
        inference = p.encode_chat(p.user_turn("What colour?", s.images)).ids
        assert p.user_turn("What colour?", s.images)[0].content == want
        e = enc(s)
        assert e.ids.tolist()[: len(inference)] == inference  # the prompt exactly as inference builds it
        m = parse_record(marked, "x.jsonl:1", fetch)
        assert not m.placed
        assert enc(m).ids.tolist() == SampleEncoder.for_model(model, proc, seed=0, cfg_drop=0.0)(m).ids.tolist()


def test_text_document_and_conversation_labels(dataset, encoder, parts):
    _, proc = parts
    tok = proc.tokenizer
    for s in ManifestSource(dataset["jsonl"]["text"], shuffle=False, epochs=1):
        e = encoder(s)
        assert not bool(e.und_mask.any() or e.gen_mask.any()) and e.pixel_values is None
        if s.text is not None:  # document: BOS + text + EOS, loss on every token after BOS
            assert e.ids.tolist() == tok.encode(s.text) + [tok.eos_id]
            assert e.text_target.tolist() == [False] + [True] * (len(e) - 1)
            text_labels, _ = e.labels()
            assert text_labels[:-1].tolist() == e.ids[1:].tolist()
        else:  # conversation: default system prompt, answers only
            ids, targets = expected_targets(proc, s.messages, [])
            assert e.ids.tolist() == ids
            assert set(torch.nonzero(e.text_target).flatten().tolist()) == targets
            assert proc.tokenizer.decode(e.ids[e.text_target].tolist(), skip_special_tokens=False) == \
                f" {answers_of(s.messages)[0]}<｜end▁of▁sentence｜>"


def test_generation_sequence_labels_are_the_vq_ids(dataset, parts):
    model, proc = parts
    enc = SampleEncoder.for_model(model, proc, cfg_drop=0.0)
    n = model.config.vq.n_tokens
    s = next(ManifestSource(dataset["jsonl"]["generation"], shuffle=False))
    e = enc(s)
    assert e.gen_ids is None and e.gen_pixels is not None  # no cache: computed on the fly, batched
    assert fill_vq_ids([e], vq_tokenizer(model), model.config.vq.codebook_size) == 1
    want = model.gen_vision_model.encode(to_gen_pixels(s.images[0], model.config.vq.image_size)[None])[0]
    assert torch.equal(e.gen_ids, want)
    assert torch.equal(e.gen_ids, JanusPipeline(model, proc).encode_image_tokens(s.images[0])[0])
    prompt = proc.generation_prompt(s.caption)
    P = len(prompt)
    assert e.ids[:P].tolist() == prompt and prompt[-1] == proc.tokenizer.boi_id
    assert e.gen_mask.tolist() == [False] * P + [True] * n + [False]
    assert int(e.ids[-1]) == proc.tokenizer.eoi_id and len(e) == P + n + 1
    text_labels, image_labels = e.labels()
    assert bool((text_labels == IGNORE).all())  # no text loss on generation samples
    # token k is predicted from slot k-1; the first from the <begin_of_image> slot (P-1); EOI is not a target
    assert image_labels[P - 1:P - 1 + n].tolist() == want.tolist()
    mask = torch.ones(len(e), dtype=torch.bool)
    mask[P - 1:P - 1 + n] = False
    assert bool((image_labels[mask] == IGNORE).all())
    # cached ids give the same sequence
    cached = enc(Sample("generation", s.key, caption=s.caption, vq_ids=want.tolist()))
    assert torch.equal(cached.ids, e.ids) and torch.equal(cached.labels()[1], image_labels)


def test_cfg_drop_rate_is_seeded_and_rows_match_inference(parts):
    model, proc = parts
    n = model.config.vq.n_tokens
    caption = "A red circle above a blue square."
    prompt = proc.generation_prompt(caption)
    uncond = cfg_rows([prompt], proc.pad_id)[0][1].tolist()  # what inference feeds the unconditional row
    ids = list(range(n))

    def decisions(seed: int) -> list[bool]:
        enc = SampleEncoder.for_model(model, proc, seed=seed)  # default cfg_drop 0.1
        out = []
        for i in range(2000):
            e = enc(Sample("generation", f"gen.jsonl:{i % 500}", epoch=i // 500, caption=caption, vq_ids=ids))
            assert e.ids[:len(prompt)].tolist() == (uncond if e.cfg_dropped else prompt)
            assert e.gen_ids.tolist() == ids  # the image targets never change
            out.append(e.cfg_dropped)
        return out

    a = decisions(0)
    assert 0.08 <= sum(a) / len(a) <= 0.12
    assert decisions(0) == a  # deterministic
    assert decisions(1) != a  # and seeded
    assert uncond[0] == prompt[0] == proc.tokenizer.bos_id and uncond[-1] == proc.tokenizer.boi_id
    assert set(uncond[1:-1]) == {proc.pad_id}


# ------------------------------------------------------------------------------------------------ mixing


class Counting:
    """A minimal source: yields (kind, i) forever, with a resumable position."""

    def __init__(self, kind: str) -> None:
        self.kind, self.i = kind, 0

    def __next__(self):
        self.i += 1
        return (self.kind, self.i - 1)

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, st):
        self.i = st["i"]


def counting_sources(kinds=("understanding", "text", "generation")):
    return {k: Counting(k) for k in kinds}


def test_mixer_exact_proportions_every_step():
    m = Mixer(counting_sources(), (5, 1, 4), batch_size=10, seed=0)
    for _ in range(50):
        kinds = [k for k, _ in next(m)]
        assert (kinds.count("understanding"), kinds.count("text"), kinds.count("generation")) == (5, 1, 4)
    m = Mixer(counting_sources(), (5, 1, 4), batch_size=16, seed=0)
    total = np.zeros(3)
    for step in range(1, 201):
        kinds = [k for k, _ in next(m)]
        c = np.array([kinds.count(k) for k in ("understanding", "text", "generation")])
        assert c.sum() == 16 and np.all(np.abs(c - 16 * np.array([0.5, 0.1, 0.4])) < 1)  # within 1, every step
        total += c
        assert np.all(np.abs(total - step * 16 * np.array([0.5, 0.1, 0.4])) <= 1)  # and no drift
    # Janus-Pro Stage I 1:0:3, no text source at all
    m = Mixer({"understanding": Counting("understanding"), "generation": Counting("generation")}, (1, 0, 3), 8)
    for _ in range(5):
        kinds = [k for k, _ in next(m)]
        assert (kinds.count("understanding"), kinds.count("text"), kinds.count("generation")) == (2, 0, 6)
    assert allocate(7, [1, 1, 1], [0, 0, 0], 0) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])


def test_mixer_order_is_seeded_split_over_ranks_and_resumable():
    plans = [[k for k, _ in next(Mixer(counting_sources(), (5, 1, 4), 10, seed=s))] for s in (0, 0, 1)]
    assert plans[0] == plans[1] and plans[0] != plans[2]
    full = Mixer(counting_sources(), (2, 3, 5), 12, seed=3)
    ranks = [Mixer(counting_sources(), (2, 3, 5), 12, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(6):
        plan = full.plan()
        next(full)
        got = [next(r) for r in ranks]
        assert all(len(g) == 4 for g in got)
        assert [k for g in got for k, _ in g] == plan  # ranks take contiguous slices of the global plan
    a = Mixer(counting_sources(), (5, 1, 4), 16, seed=7)
    seq = [next(a) for _ in range(8)]
    b = Mixer(counting_sources(), (5, 1, 4), 16, seed=7)
    for _ in range(3):
        next(b)
    st = json.loads(json.dumps(b.state_dict()))
    c = Mixer(counting_sources(), (5, 1, 4), 16, seed=7)
    c.load_state_dict(st)
    assert [next(c) for _ in range(5)] == seq[3:]
    with pytest.raises(ValueError, match="no 'text' source|no text source"):
        Mixer({"understanding": Counting("understanding"), "generation": Counting("generation")}, (5, 1, 4), 10)


# ------------------------------------------------------------------------------ shuffling, resume, sharding


def make_source(dataset, fmt: str, kind: str, **kw):
    if fmt == "tar":
        return TarSource(dataset["tar"][kind], kind=kind, shuffle_buffer=4, **kw)
    return ManifestSource(dataset["jsonl"][kind], kind=kind, **kw)


@pytest.mark.parametrize("fmt", ["jsonl", "tar"])
def test_shuffle_is_deterministic_and_resume_continues_exactly(dataset, fmt):
    kind, n = "understanding", N_UND
    seq = [ident(next(s)) for s in [make_source(dataset, fmt, kind, seed=1)] for _ in range(3 * n)]
    assert seq == [ident(x) for x in itertools.islice(make_source(dataset, fmt, kind, seed=1), 3 * n)]
    assert seq != [ident(x) for x in itertools.islice(make_source(dataset, fmt, kind, seed=2), 3 * n)]
    for e in range(3):
        assert len(set(seq[e * n:(e + 1) * n])) == n  # each epoch holds every sample once
    assert seq[:n] != seq[n:2 * n]  # and epochs are reshuffled
    for cut in (5, n, n + 7):  # mid-epoch, at the epoch boundary, in the second epoch
        a = make_source(dataset, fmt, kind, seed=1)
        for _ in range(cut):
            next(a)
        st = json.loads(json.dumps(a.state_dict()))  # checkpoints are JSON-serialisable
        b = make_source(dataset, fmt, kind, seed=1)
        b.load_state_dict(st)
        assert [ident(next(b)) for _ in range(3 * n - cut)] == seq[cut:]
    other = make_source(dataset, fmt, kind, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(st)


@pytest.mark.parametrize("fmt", ["jsonl", "tar"])
def test_rank_sharding_is_disjoint_and_complete(dataset, fmt):
    for kind, n in (("understanding", N_UND), ("generation", N_GEN)):
        per_rank = [[ident(s) for s in make_source(dataset, fmt, kind, seed=4, rank=r, world_size=3, epochs=1)]
                    for r in range(3)]
        flat = [x for r in per_rank for x in r]
        assert len(flat) == len(set(flat)) == n
        assert all(per_rank)


# -------------------------------------------------------------------------------------------------- packing


def mixed_samples(dataset, parts) -> list:
    model, proc = parts
    enc = SampleEncoder.for_model(model, proc, cfg_drop=0.0)
    out = []
    for kind, k in (("understanding", 3), ("text", 3), ("generation", 2)):
        out += list(itertools.islice(ManifestSource(dataset["jsonl"][kind], shuffle=False, transform=enc), k))
    fill_vq_ids(out, vq_tokenizer(model))
    out[-1] = enc(Sample("generation", "cached", caption="a cached one", vq_ids=out[-2].gen_ids.tolist()))
    return out


@pytest.fixture(params=["mask", "segments"])
def packed_attention(request, parts):
    """train.attention: the packed rows' (T, T) mask, or each sample attended alone (models.llama.PackedSegments)."""
    llm = parts[0].llm
    llm.packed_attention = request.param
    yield request.param
    llm.packed_attention = "mask"


def test_packed_forward_equals_each_sample_alone(dataset, parts, packed_attention):
    model, proc = parts
    samples = mixed_samples(dataset, parts)
    ctx = 400
    batch = pack(samples, ctx, pad_id=proc.pad_id)
    assert batch.input_ids.shape == (batch.input_ids.shape[0], ctx) and batch.input_ids.shape[0] < len(samples)
    assert batch.pixel_values.shape[0] == sum(len(s.pixel_values) for s in samples if s.pixel_values is not None)
    llm = model.language_model.model
    assert PackedSegments.of(batch.doc_ids) is not None  # samples back to back, padding last: segments apply
    with torch.no_grad():
        h = llm.forward_packed(model.mixed_embeds(batch.input_ids, batch.und_mask, batch.pixel_values,
                                                  batch.gen_mask, batch.gen_ids), batch.positions, batch.doc_ids)[0]
        ref = unpacked(samples, pad_id=proc.pad_id)
        h_ref = llm.forward_packed(model.mixed_embeds(ref.input_ids, ref.und_mask, ref.pixel_values, ref.gen_mask,
                                                      ref.gen_ids), ref.positions, ref.doc_ids)[0]
    found = 0
    for i, s in enumerate(samples):
        L = len(s)
        with torch.no_grad():  # the sample alone: plain causal forward, no packing at all
            one = unpacked([s])
            alone = llm(model.mixed_embeds(one.input_ids, one.und_mask, one.pixel_values, one.gen_mask, one.gen_ids),
                        one.positions)[0]
        torch.testing.assert_close(h_ref[i, :L], alone, rtol=0, atol=1e-5)
        text_labels, image_labels = s.labels()
        for b in range(batch.input_ids.shape[0]):  # find the sample in the packed rows
            for d in range(int(batch.doc_ids[b].max()) + 1):
                slots = batch.doc_ids[b] == d
                if int(slots.sum()) == L and torch.equal(batch.input_ids[b, slots], s.ids) and \
                        torch.equal(batch.und_mask[b, slots], s.und_mask):
                    torch.testing.assert_close(h[b, slots], alone, rtol=0, atol=1e-5)
                    assert torch.equal(batch.positions[b, slots], torch.arange(L))
                    assert torch.equal(batch.text_labels[b, slots], text_labels)
                    assert torch.equal(batch.image_labels[b, slots], image_labels)
                    found += 1
                    break
    assert found == len(samples)
    assert bool((batch.text_labels[batch.doc_ids < 0] == IGNORE).all())
    assert bool((batch.kinds[batch.doc_ids < 0] == -1).all())
    # micro-batches keep each row's images
    micro = split_rows(batch, 1, proc.n_image_tokens)
    assert sum(m.input_ids.shape[0] for m in micro) == batch.input_ids.shape[0]
    assert torch.equal(torch.cat([m.pixel_values for m in micro if m.pixel_values is not None]), batch.pixel_values)


def test_segment_attention_gradients_equal_the_mask_and_odd_rows_fall_back(dataset, parts):
    """train.attention = "segments": the same gradients as the packed mask (float32 rounding) with the padding
    slots left out of the decoder; a row that is not samples back to back followed by padding (hidden slots)
    keeps the mask."""
    model, proc = parts
    batch = pack(mixed_samples(dataset, parts), 400, pad_id=proc.pad_id)
    llm = model.llm
    assert PackedSegments.of(batch.doc_ids) is not None and (batch.doc_ids < 0).any()
    grads = {}
    for mode in ("mask", "segments"):
        llm.packed_attention = mode
        model.zero_grad()
        try:
            h = model.mixed_embeds(batch.input_ids, batch.und_mask, batch.pixel_values, batch.gen_mask, batch.gen_ids)
            hidden, _ = llm.forward_packed(h, batch.positions, batch.doc_ids)
            hidden[batch.doc_ids >= 0].square().mean().backward()
        finally:
            llm.packed_attention = "mask"
        grads[mode] = {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None}
    assert grads["mask"].keys() == grads["segments"].keys() and len(grads["mask"]) > 4
    for n, g in grads["mask"].items():
        torch.testing.assert_close(grads["segments"][n], g, rtol=1e-4, atol=1e-6, msg=n)
    hidden_slot = torch.tensor([[0, 0, -1, 0, 1, -1]])  # a dropped flow prompt: a hidden slot inside sample 0
    assert PackedSegments.of(hidden_slot) is None
    seg = PackedSegments.of(torch.tensor([[0, 0, 1, 2, 2, 2], [-1] * 6, [0, 0, 0, 1, -1, -1]]))
    assert seg.keep.tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15]  # the real slots, as one sequence
    # samples of lengths 2, 1, 3, 3, 1 -> groups of similar length, longest first: (3, 3), (2, 2), (1, 1) x 2
    assert seg.sizes == [(2, 3), (1, 2), (2, 1)]
    assert seg.index.tolist() == [3, 4, 5, 6, 7, 8, 0, 1, 2, 9]  # packed positions, group by group
    assert PackedSegments.of(torch.full((2, 4), -1)) is None  # nothing but padding: the mask path


def test_packing_efficiency_first_fit_and_too_long(parts, encoder):
    _, proc = parts
    tok = proc.tokenizer
    docs = []
    for i, L in enumerate((60, 50, 40, 30, 20)):  # documents of exact lengths (BOS + filler + EOS)
        e = encoder(Sample("text", f"doc{i}", text="x"))
        e.ids = torch.tensor([tok.bos_id] + [e.ids[1].item()] * (L - 2) + [tok.eos_id])
        e.text_target = torch.tensor([False] + [True] * (L - 1))
        e.und_mask = e.gen_mask = torch.zeros(L, dtype=torch.bool)
        docs.append(e)
    assert first_fit([60, 50, 40, 30, 20], 100) == [[0, 2], [1, 3, 4]]
    b = pack(docs, 100)
    assert b.input_ids.shape == (2, 100) and b.packing_efficiency == 1.0
    b = pack(docs, 128)
    assert b.packing_efficiency == pytest.approx(200 / (2 * 128))
    assert b.doc_ids[0].tolist()[:60] == [0] * 60 and b.positions[0, 60:100].tolist() == list(range(40))
    with pytest.raises(DataError, match="doc0: text sample of 60 tokens does not fit the context \\(50\\)"):
        pack(docs, 50)
    assert pack(docs, 50, too_long="truncate", n_und_tokens=proc.n_image_tokens).input_ids.shape[1] == 50


def test_too_long_understanding_error_or_truncate_before_image(dataset, parts):
    model, proc = parts
    s = next(ManifestSource(dataset["jsonl"]["understanding"], shuffle=False))  # two images, two turns
    full = SampleEncoder.for_model(model, proc, cfg_drop=0.0)(s)
    first_boi = full.ids.tolist().index(proc.tokenizer.boi_id)
    second_boi = full.ids.tolist().index(proc.tokenizer.boi_id, first_boi + 1)
    cut = second_boi + 10  # inside the second image
    with pytest.raises(DataError, match=r"data\.jsonl:1: \d+ tokens, longer than the context"):
        SampleEncoder.for_model(model, proc, max_len=cut)(s)
    t = SampleEncoder.for_model(model, proc, max_len=cut, too_long="truncate")(s)
    assert len(t) == second_boi and t.pixel_values.shape[0] == 1
    assert int(t.und_mask.sum()) == proc.n_image_tokens
    b = pack([t], cut)
    with torch.no_grad():
        model.mixed_embeds(b.input_ids, b.und_mask, b.pixel_values, b.gen_mask, b.gen_ids)  # counts still agree


def test_loader_resume_gives_identical_batches(dataset, parts):
    model, proc = parts

    def build(prefetch: int) -> TrainData:
        enc = SampleEncoder.for_model(model, proc, seed=5)
        srcs = {k: ManifestSource(dataset["jsonl"][k], kind=k, seed=5, transform=enc)
                for k in ("understanding", "text", "generation")}
        return TrainData(Mixer(srcs, (5, 1, 4), 10, seed=5), 512, pad_id=proc.pad_id,
                         tokenize_images=vq_tokenizer(model), codebook_size=model.config.vq.codebook_size,
                         prefetch=prefetch)

    a = build(prefetch=1)
    batches, states = [], []
    for _ in range(4):
        batches.append(next(a))
        states.append(a.state_dict())
        assert a.last["samples"] == {"understanding": 5, "text": 1, "generation": 4}
        assert 0 < a.last["packing_efficiency"] <= 1
    a.close()
    b = build(prefetch=0)
    b.load_state_dict(json.loads(json.dumps(states[1])))
    for want in batches[2:]:
        got = next(b)
        for f in ("input_ids", "positions", "doc_ids", "und_mask", "gen_mask", "gen_ids", "text_labels",
                  "image_labels", "kinds", "pixel_values"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f


@pytest.mark.parametrize("fmt,n", [("jsonl", 1), ("tar", 1), ("jsonl", 3), ("tar", 2)])
def test_worker_processes_give_the_same_batches_and_resume_exactly(dataset, parts, fmt, n):
    """[data] worker_processes: each kind's source in a process of its own (n = 1) or in n that decode every
    n-th record each (ParallelSource), reading ahead; the batches and the checkpointed positions are those of the
    in-process path, and a resume restarts the processes there."""
    from januskit.train.data.workers import ParallelSource, SourceProcess

    model, proc = parts

    def build(processes: bool) -> TrainData:
        enc = SampleEncoder.for_model(model, proc, seed=5)
        srcs = {k: make_source(dataset, fmt, k, seed=5, transform=enc) for k in ("understanding", "text", "generation")}
        if processes:
            srcs = {k: SourceProcess(s, ahead=4) if n == 1 else ParallelSource(s, n, ahead=2) for k, s in srcs.items()}
        return TrainData(Mixer(srcs, (5, 1, 4), 10, seed=5), 512, pad_id=proc.pad_id,
                         tokenize_images=vq_tokenizer(model), codebook_size=model.config.vq.codebook_size)

    fields = ("input_ids", "positions", "doc_ids", "und_mask", "gen_mask", "gen_ids", "text_labels", "image_labels",
              "kinds", "pixel_values")
    a, b = build(False), build(True)
    states = []
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in fields)
        assert b.state_dict() == a.state_dict()  # the position after what was taken, not after what was read ahead
        states.append(a.state_dict())
    b.load_state_dict(json.loads(json.dumps(states[0])))  # back to after step 1: the processes restart there
    a2 = build(False)
    a2.load_state_dict(json.loads(json.dumps(states[0])))
    for _ in range(2):
        x, y = next(a2), next(b)
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in fields)
    procs = [p for s in b.mixer.sources.values() for p in ([s._proc] if n == 1 else s._procs)]
    assert len(procs) == 3 * n and all(p.is_alive() for p in procs)
    b.close()
    assert not any(p.is_alive() for p in procs)


def test_a_worker_process_raises_the_sources_error_in_the_trainer(bad_root, parts):
    from januskit.train.data.workers import SourceProcess

    model, proc = parts
    src = SourceProcess(ManifestSource(bad_root, shuffle=False, epochs=1,
                                       transform=SampleEncoder.for_model(model, proc)), ahead=2)
    next(src)  # line 1 is fine
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*contains '\.\.'"):
        next(src)


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_parallel_workers_skip_and_count_bad_samples_as_the_source_does(bad_root, parts, on_error):
    """Three processes over the bad manifest (bad lines fall to every worker): the same good samples, skip counts
    and states after each as the source in process; in "raise" mode the first bad line's error, with its line."""
    from januskit.train.data.workers import ParallelSource

    model, proc = parts

    def source():
        return ManifestSource(bad_root, shuffle=False, epochs=2, on_error=on_error,
                              transform=SampleEncoder.for_model(model, proc))

    par = ParallelSource(source(), 3, ahead=2)
    if on_error == "raise":
        next(par)  # line 1 is fine
        with pytest.raises(DataError, match=r"bad.jsonl:2: .*contains '\.\.'"):
            next(par)
        par.close()
        return
    ref, got = source(), []
    for want in ref:
        s = next(par)
        assert s.key == want.key and torch.equal(s.ids, want.ids)
        assert par.state_dict() == ref.state_dict()
        got.append(par.state_dict())
    for _ in range(2):  # the end, and again
        with pytest.raises(StopIteration):
            next(par)
    assert got[-1]["epoch"] == 1 and sum(got[-1]["skipped"].values()) == 2 * 11  # 11 bad lines, two epochs
    # resumed mid-way (after the first good sample of epoch 1): the rest as the source gives it
    par.load_state_dict(got[2])
    ref.load_state_dict(got[2])
    assert [(x.key, x.ids.tolist()) for x in par] == [(x.key, x.ids.tolist()) for x in ref]


def test_worker_processes_setting_is_checked():
    from januskit.train.data.loader import _process_count
    from januskit.train.data.workers import ParallelSource

    assert [_process_count(x) for x in (False, True, 0, 3)] == [0, 1, 0, 3]
    with pytest.raises(ValueError, match=r"\[data\] worker_processes must be true, false or a number of processes "
                                         r">= 0, got -1"):
        _process_count(-1)
    with pytest.raises(ValueError, match="more than one process per source needs a manifest or tar source, not list"):
        ParallelSource([], 2)


# ------------------------------------------------------------------------------------------------ bad data


BAD_LINES = [  # (line content, expected message fragment, skip reason); line numbers are 1-based
    ('{"kind": "text", "text": "fine"}', None, None),
    ('{"kind": "understanding", "messages": [{"role": "user", "content": "Hi"}, '
     '{"role": "assistant", "content": "Yo"}], "images": ["../x.png"]}', "contains '..'", "path"),
    ('{"kind": "generation", "caption": "c", "image": "/etc/passwd"}', "is absolute", "path"),
    ('{"kind": "generation", "caption": "c", "image": "img/missing.png"}', "not found", "image"),
    ('{"kind": "generation", "caption": "c", "image": "img/empty.png"}', "empty file (0 bytes)", "image"),
    ('{"kind": "text", "text": ', "malformed JSON", "json"),
    ('{"kind": "video", "text": "x"}', "unknown kind 'video'", "kind"),
    ('{"kind": "generation", "image": "img/ok.png"}', "missing field 'caption'", "field"),
    ('{"kind": "generation", "caption": "c", "image": "img/link.png"}', "leads outside the dataset root", "path"),
    ('{"kind": "generation", "caption": "c", "image": "img/ok.png", "vq_ids": [1, 2, 3]}',
     "expected 64 ids per image", "vq_ids"),
    ('{"kind": "text", "messages": [{"role": "assistant", "content": "x"}]}', "expected 'user'", "field"),
    ('{"kind": "understanding", "messages": [{"role": "user", "content": "<image_placeholder> hi"}, '
     '{"role": "assistant", "content": "Yo"}], "images": []}', "1 <image_placeholder> marker(s) but 0", "field"),
    ('{"kind": "generation", "caption": "fine too", "image": "img/ok.png"}', None, None),
]


@pytest.fixture
def bad_root(tmp_path):
    root = tmp_path / "bad"
    noise_png(root / "img/ok.png", 20, 20, 0)
    (root / "img/empty.png").write_bytes(b"")
    noise_png(tmp_path / "outside.png", 20, 20, 1)
    os.symlink(tmp_path / "outside.png", root / "img/link.png")
    (root / "bad.jsonl").write_text("\n".join(line for line, _, _ in BAD_LINES) + "\n\n")  # trailing blank line
    return root


def test_bad_jsonl_errors_name_file_and_line(bad_root, parts):
    model, proc = parts
    enc = SampleEncoder.for_model(model, proc)
    src = ManifestSource(bad_root, shuffle=False, epochs=1, transform=enc)
    assert len(src) == len(BAD_LINES)  # blank lines are not samples
    for n, (_, frag, _) in enumerate(BAD_LINES, start=1):
        if frag is None:
            assert next(src).key.endswith(f"bad.jsonl:{n}")
            continue
        with pytest.raises(DataError) as ei:
            next(src)
        assert f"bad.jsonl:{n}: " in str(ei.value) and frag in str(ei.value), str(ei.value)


def test_bad_jsonl_skip_mode_counts_and_logs(bad_root, parts, caplog):
    model, proc = parts
    src = ManifestSource(bad_root, shuffle=False, epochs=1, on_error="skip",
                         transform=SampleEncoder.for_model(model, proc))
    with caplog.at_level("WARNING", logger="januskit.train.data.records"):
        good = list(src)
    assert [g.key.rsplit(":", 1)[1] for g in good] == ["1", str(len(BAD_LINES))]
    want: dict[str, int] = {}
    for _, _, reason in BAD_LINES:
        if reason:
            want[reason] = want.get(reason, 0) + 1
    assert dict(src.skipped) == want and src.n_skipped == len(BAD_LINES) - 2
    assert src.state_dict()["skipped"] == want
    assert sum("skipping bad sample" in r.message for r in caplog.records) == src.n_skipped
    assert "bad.jsonl:2" in caplog.records[0].message


def test_bad_tar_errors_name_shard_and_member(tmp_path):
    path = tmp_path / "bad.tar"
    good_png = noise_png(tmp_path / "g.png", 20, 20, 0)
    with tarfile.open(path, "w") as tf:
        add_member(tf, "000000.json", b'{"kind": "generation", "caption": "ok"}')
        add_member(tf, "000000.0.png", good_png)
        add_member(tf, "000001.json", b'{"kind": "generation", "caption": ')
        add_member(tf, "000002.json", b'{"kind": "generation", "caption": "zero"}')
        add_member(tf, "000002.0.png", b"")
        add_member(tf, "000003.0.png", good_png)  # no json
        add_member(tf, "000004.json", b'{"kind": "understanding", "messages": [{"role": "user", "content": '
                                      b'"<image_placeholder><image_placeholder>?"}, {"role": "assistant", '
                                      b'"content": "a"}]}')
        add_member(tf, "000004.0.png", good_png)
        add_member(tf, "000004.2.png", good_png)  # 1 is missing
    src = TarSource(path, shuffle=False, epochs=1)
    assert src.__next__().caption == "ok"
    expect = ["bad.tar:000001.json: malformed JSON", "bad.tar:000002.0.png: image '000002.0.png': empty file",
              "bad.tar:000003: no 000003.json member", "bad.tar:000004: image members are not numbered"]
    for frag in expect:
        with pytest.raises(DataError) as ei:
            next(src)
        assert frag in str(ei.value), str(ei.value)
    skip = TarSource(path, shuffle=False, epochs=1, on_error="skip")
    assert [s.caption for s in skip] == ["ok"]
    assert dict(skip.skipped) == {"json": 1, "image": 2, "field": 1}


def test_all_bad_epoch_raises_instead_of_looping(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"kind": "video"}\n')
    with pytest.raises(DataError, match="yielded no usable sample"):
        next(ManifestSource(tmp_path, on_error="skip"))


# -------------------------------------------------------------------------------------- hostile data
# Every bad sample is a DataError naming file:line (or shard:member) with a reason, and with on_error="skip"
# is counted and skipped: never another exception, also not from the encoder that runs as the transform.


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory) -> Path:
    """A dataset root: a good image, a 17 KB PNG that decodes to 144M pixels, a 9000 px strip, a TIFF, a
    symlink loop."""
    root = tmp_path_factory.mktemp("hostile")
    noise_png(root / "img/ok.png", 20, 20, 0)
    Image.new("1", (12000, 12000)).save(root / "img/huge.png", optimize=True)
    Image.new("RGB", (9000, 4)).save(root / "img/wide.png")
    Image.new("RGB", (8, 8)).save(root / "img/x.tif")
    os.symlink("loop.png", root / "img/loop.png")
    return root


VQ = list(range(64))
HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


def gen_line(**kw) -> str:
    return json.dumps({"kind": "generation", "caption": "c", **kw})


def und_line(**kw) -> str:
    return json.dumps({"kind": "understanding", "messages": HI, **kw})


HOSTILE = [  # (id, line, message fragment(s), reason); json.dumps writes "\ud800" and "\u0000" escaped
    ("nested", "[" * 200000, "malformed JSON: nested too deeply", "json"),
    ("nested-in-record", '{"kind": "text", "text": ' + "[" * 200000, "malformed JSON: nested too deeply", "json"),
    ("latin-1", b'{"kind": "text", "text": "caf\xe9"}', "not UTF-8 (", "json"),
    ("utf8-encoded-surrogate", b'{"kind": "text", "text": "\xed\xa0\x80"}', "not UTF-8 (", "json"),
    ("5000-digit-int", '{"kind": "generation", "caption": "c", "vq_ids": [' + "9" * 5000 + "]}",
     "malformed JSON: Exceeds the limit (4300 digits)", "json"),
    ("top-level-array", "[1, 2]", "expected a JSON object, got list", "json"),
    ("surrogate-text", json.dumps({"kind": "text", "text": "a\ud800b"}),
     "'text' is not valid Unicode: lone surrogate '\\ud800' at character 1", "field"),
    ("surrogate-caption", gen_line(caption="x\udfff", vq_ids=VQ), "'caption' is not valid Unicode", "field"),
    ("surrogate-content", und_line(messages=[HI[0], {"role": "assistant", "content": "\ud800"}]),
     "message 1: content is not valid Unicode: lone surrogate '\\ud800'", "field"),
    ("surrogate-text-conversation",
     json.dumps({"kind": "text", "messages": [{"role": "user", "content": "\udc80?"}, HI[1]]}),
     "message 0: content is not valid Unicode", "field"),
    ("surrogate-system", und_line(system="\ud800"), "'system' is not valid Unicode", "field"),
    ("surrogate-image", gen_line(image="img/\udc80.png"), "'image' is not valid Unicode", "path"),
    ("surrogate-images", und_line(images=["img/ok.png", "\ud800"]), "'images' item 1 is not valid Unicode", "path"),
    ("nul-path", gen_line(image="img/ok.png\x00.txt"), "image path 'img/ok.png\\x00.txt' contains a NUL byte",
     "path"),
    ("long-name", gen_line(image="a" * 5000), "is too long (File name too long)", "path"),
    ("long-path", gen_line(image="/".join(["a" * 200] * 40)), "is too long (File name too long)", "path"),
    ("symlink-loop", gen_line(image="img/loop.png"), "image path 'img/loop.png' cannot be resolved", "path"),
    ("huge-image", gen_line(image="img/huge.png"), ("image 'img/huge.png': too large: 12000x12000", "16777216"),
     "image"),
    ("long-side", gen_line(image="img/wide.png"), ("image 'img/wide.png': too large: 9000x4", "8192"), "image"),
    ("tiff", gen_line(image="img/x.tif"), "image 'img/x.tif': not a readable image", "image"),
    ("vq-huge", gen_line(vq_ids=[2**70]), "'vq_ids' are codebook indices in [0, 2**31); item 0 is 1180591", "vq_ids"),
    ("vq-negative", gen_line(vq_ids=[3, -1]), "'vq_ids' are codebook indices in [0, 2**31); item 1 is -1", "vq_ids"),
    ("vq-float", gen_line(vq_ids=[1.5]), "'vq_ids' must be a list of integers; item 0 is 1.5", "vq_ids"),
    ("vq-nan", '{"kind": "generation", "caption": "c", "vq_ids": [NaN]}', "item 0 is nan", "vq_ids"),
    ("vq-bool", gen_line(vq_ids=[True]), "item 0 is True", "vq_ids"),
    ("vq-dict", gen_line(vq_ids={"0": 1}), "'vq_ids' must be a list of integers, got dict", "vq_ids"),
    ("kind-list", json.dumps({"kind": ["text"], "text": "x"}), "unknown kind ['text']", "kind"),
    ("kind-dict", json.dumps({"kind": {"text": 1}}), "unknown kind {'text': 1}", "kind"),
    ("kind-number", json.dumps({"kind": 1e999}), "unknown kind inf", "kind"),
    ("messages-dict", und_line(messages={"role": "user"}), "'messages' must be a non-empty list", "field"),
    ("message-list", und_line(messages=[["user", "Hi"]]), "message 0: expected {\"role\"", "field"),
    ("content-number", und_line(messages=[{"role": "user", "content": 1}, HI[1]]), "message 0: expected", "field"),
    ("role-dict", und_line(messages=[{"role": {"a": [1]}, "content": "Hi"}, HI[1]]),
     "message 0: role {'a': [1]}, expected 'user'", "field"),
    ("images-dict", und_line(images={"0": "img/ok.png"}), "'images' must be a list of strings", "field"),
    ("images-numbers", und_line(images=[0]), "'images' must be a list of strings", "field"),
    ("caption-number", gen_line(caption=1e308, vq_ids=VQ), "'caption' must be a non-empty string", "field"),
    ("caption-infinity", '{"kind": "generation", "caption": Infinity, "image": "img/ok.png"}',
     "'caption' must be a non-empty string", "field"),
    ("text-list", json.dumps({"kind": "text", "text": ["a"]}), "'text' must be a non-empty string", "field"),
    ("system-list", und_line(system=["a"]), "'system' must be a string, got list", "field"),
    ("system-marker", und_line(system="<image_placeholder>"), "'system' contains <image_placeholder>", "field"),
    ("image-number", gen_line(image=7), "'image' must be a string", "field"),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns on opening huge.png
@pytest.mark.parametrize("line, frag, reason", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_line_is_a_data_error_raised_or_skipped(line, frag, reason, hostile_root, encoder, tmp_path):
    path = tmp_path / "h.jsonl"
    raw = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(b'{"kind": "text", "text": "fine"}\n' + raw + b"\n")
    src = ManifestSource(path, root=hostile_root, shuffle=False, epochs=1, transform=encoder)
    assert next(src).key == f"{path}:1"
    with pytest.raises(DataError) as ei:
        next(src)
    e = ei.value
    assert (e.where, e.reason) == (f"{path}:2", reason)
    frags = (frag,) if isinstance(frag, str) else frag
    assert str(e).startswith(f"{path}:2: ") and all(f in str(e) for f in frags), str(e)
    skip = ManifestSource(path, root=hostile_root, shuffle=False, epochs=1, on_error="skip", transform=encoder)
    assert [s.key for s in skip] == [f"{path}:1"]
    assert dict(skip.skipped) == {reason: 1}
    if "JSON:" in frags[0] or "UTF-8" in frags[0]:  # not JSON: jsonl_rows (VQ cache, DPO pairs, RL prompts) agrees
        rows = jsonl_rows(path)
        assert next(rows)[0] == f"{path}:1"
        with pytest.raises(DataError) as ei:
            next(rows)
        assert (ei.value.where, ei.value.reason, str(ei.value)) == (e.where, e.reason, str(e))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_hostile_tar_members_are_data_errors(tmp_path, hostile_root, encoder):
    img = hostile_root / "img"
    path = tmp_path / "h.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        add_member(tf, "000000.json", b'{"kind": "generation", "caption": "ok"}')
        add_member(tf, "000000.0.png", (img / "ok.png").read_bytes())
        add_member(tf, "000001.json", b"[" * 200000)
        add_member(tf, "000002.json", b'{"kind": "generation", "caption": "huge"}')
        add_member(tf, "000002.0.png", (img / "huge.png").read_bytes())
        add_member(tf, "000003.json", json.dumps({"kind": "generation", "caption": "\ud800"}).encode())
        add_member(tf, "000003.0.png", (img / "ok.png").read_bytes())
        add_member(tf, "000004.json", b'{"kind": "generation", "caption": "tiff, numbered"}')
        add_member(tf, "000004.0.tif", (img / "x.tif").read_bytes())  # not an image member: TIFF is not accepted
        add_member(tf, "000005.json", b'{"kind": "generation", "caption": "tiff, named", "image": "0.tiff"}')
        add_member(tf, "000005.0.tiff", (img / "x.tif").read_bytes())
        add_member(tf, "000006.json", b'{"kind": "generation", "caption": "nul", "image": "0.png\\u0000"}')
        # a member name that is not UTF-8 (tarfile decodes it with surrogateescape): a good sample
        add_member(tf, "caf\udce9/000007.json", b'{"kind": "generation", "caption": "latin-1 name"}')
        add_member(tf, "caf\udce9/000007.0.png", (img / "ok.png").read_bytes())
    expect = [  # (where, reason, message fragment)
        ("h.tar:000001.json", "json", "malformed JSON: nested too deeply"),
        ("h.tar:000002.0.png", "image", "image '000002.0.png': too large: 12000x12000"),
        ("h.tar:000003.json", "field", "'caption' is not valid Unicode: lone surrogate '\\ud800'"),
        ("h.tar:000004.json", "field", "a generation sample needs one image (or 'vq_ids'), found 0"),
        ("h.tar:000005.0.tiff", "image", "image '000005.0.tiff': not a readable image in an accepted format"),
        ("h.tar:000006", "image", "image member '000006.0.png\\x00' not found in the shard"),
    ]
    src = TarSource(path, shuffle=False, epochs=1, transform=encoder)
    assert next(src).key == f"{path}:000000.json"
    for where, reason, frag in expect:
        with pytest.raises(DataError) as ei:
            next(src)
        assert (ei.value.where, ei.value.reason) == (f"{tmp_path}/{where}", reason)
        assert frag in str(ei.value), str(ei.value)
        if reason == "image" and "too large" in frag:
            assert "16777216" in str(ei.value)  # the limit it broke
    assert next(src).key == f"{path}:caf\\xe9/000007.json"  # encodable, so CFG drop can hash it
    skip = TarSource(path, shuffle=False, epochs=1, on_error="skip", transform=encoder)
    assert len(list(skip)) == 2
    assert dict(skip.skipped) == {"json": 1, "image": 3, "field": 2}


def test_image_pixel_limit_is_a_reader_option(hostile_root, tmp_path):
    (tmp_path / "g.jsonl").write_text(gen_line(image="img/ok.png") + "\n")
    assert next(ManifestSource(tmp_path, root=hostile_root)).images[0].size == (20, 20)
    with pytest.raises(DataError) as ei:
        next(ManifestSource(tmp_path, root=hostile_root, max_image_pixels=399))
    assert (ei.value.where, ei.value.reason) == (f"{tmp_path}/g.jsonl:1", "image")
    assert str(ei.value).startswith(f"{tmp_path}/g.jsonl:1: image 'img/ok.png': too large: 20x20") and \
        "399" in str(ei.value), str(ei.value)
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        add_member(tf, "0.json", b'{"kind": "generation", "caption": "c"}')
        add_member(tf, "0.0.png", (hostile_root / "img/ok.png").read_bytes())
    with pytest.raises(DataError, match=r"s\.tar:0\.0\.png: image '0\.0\.png': too large: 20x20.*399"):
        next(open_source(tmp_path / "s.tar", max_image_pixels=399))
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        ManifestSource(tmp_path, max_image_pixels=0)


# property-based: whatever JSON a record holds, parse_record returns a Sample or raises DataError, and the
# encoder (the readers' transform) then raises nothing but DataError either
REASONS = {"json", "kind", "field", "path", "image", "vq_ids", "length"}
TRICKY = ["", " ", "<image_placeholder>", "<image_placeholder>\n", "user", "assistant", "understanding", "text",
          "generation", "img/ok.png", "img/wide.png", "img/loop.png", "img/x.tif", "img", "../ok.png", "/etc/passwd",
          "C:\\x.png", "img/ok.png\x00", "a" * 300, "\ud800", "\udcff", "0.png", "NaN", "[" * 50]
FIELDS = ["kind", "messages", "images", "system", "text", "caption", "image", "vq_ids", "role", "content"]
CHARS = st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "\x00", "[", "{", '"', "\\"])
TEXT = st.text(CHARS, max_size=12) | st.sampled_from(TRICKY)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2**80, 2**80) | st.floats() | TEXT,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT | st.sampled_from(FIELDS), kids, max_size=4),
    max_leaves=12)
VALID = [
    {"kind": "understanding", "messages": [{"role": "user", "content": "<image_placeholder>\nWhat?"}, HI[1]],
     "images": ["img/ok.png"]},
    {"kind": "understanding", "messages": HI + HI, "images": ["img/ok.png", "img/ok.png"], "system": ""},
    {"kind": "text", "text": "A document."},
    {"kind": "text", "messages": HI, "system": "Be brief."},
    {"kind": "generation", "caption": "A red circle.", "image": "img/ok.png"},
    {"kind": "generation", "caption": "A red circle.", "vq_ids": VQ},
]


TRICKY_VALUES = [None, True, 0, -1, 1.5, float("nan"), float("inf"), 2**31, 2**63, 2**64, -2**63 - 1, 10**30,
                 -10**30, "", " ", "\ud800", "<image_placeholder>", "img/ok.png\x00", "img/loop.png", [], {}, [1],
                 {"role": "user"}]
BIG_INTS = st.sampled_from([-1, 2**31, 2**63, 2**64, -2**63 - 1, 10**30]) | st.integers()  # past int64: tensor overflow
NUMBERS = BIG_INTS | st.floats() | st.booleans()
PATH_PARTS = ["img", "ok.png", "loop.png", "wide.png", "x.tif", "huge.png", "..", ".", "", "\x00", "\ud800", "a" * 300,
              "C:", "~", "\\", "ok.png\x00"]
PATHS = st.lists(st.sampled_from(PATH_PARTS), min_size=1, max_size=30).map("/".join) | TEXT
TRICKY_INSERTS = st.sampled_from(["\ud800", "\udfff", "\x00", "<image_placeholder>", "\n", "/", ".."]) | CHARS


def json_slots(node: dict | list) -> list[tuple[dict | list, str | int]]:
    """(container, key) of every value inside a JSON value, depth first."""
    out: list[tuple[dict | list, str | int]] = []
    for k, v in list(node.items() if isinstance(node, dict) else enumerate(node)):
        out.append((node, k))
        if isinstance(v, (dict, list)):
            out += json_slots(v)
    return out


@st.composite
def mutated_records(draw) -> dict:
    """A valid record with 1-3 edits anywhere inside it: a value replaced (by anything, or by a known
    troublemaker), a character inserted into a string, a number (a VQ id) or an image path changed, a key
    or item removed, one added."""
    rec = copy.deepcopy(draw(st.sampled_from(VALID)))  # edited in place: never the shared originals
    for _ in range(draw(st.integers(1, 3))):
        slots = json_slots(rec)
        strings = [(c, k) for c, k in slots if isinstance(c[k], str)]
        numbers = [(c, k) for c, k in slots if isinstance(c[k], int)]
        op = draw(st.sampled_from(["replace", "tricky", "insert", "number", "path", "delete", "add"]))
        if op == "add" or not slots:
            node = draw(st.sampled_from([rec] + [c[k] for c, k in slots if isinstance(c[k], (dict, list))]))
            if isinstance(node, dict):
                node[draw(st.sampled_from(FIELDS))] = draw(JSON_VALUES)
            else:
                node.append(draw(JSON_VALUES))
        elif op == "insert" and strings:
            node, key = draw(st.sampled_from(strings))
            i = draw(st.integers(0, len(node[key])))
            node[key] = node[key][:i] + draw(TRICKY_INSERTS) + node[key][i:]
        elif op == "number" and numbers:
            node, key = draw(st.sampled_from(numbers))
            node[key] = draw(NUMBERS)
        elif op == "path":  # where the file system gets involved
            if isinstance(rec.get("images"), list) and rec["images"]:
                rec["images"][draw(st.integers(0, len(rec["images"]) - 1))] = draw(PATHS)
            else:
                rec["image"] = draw(PATHS)
        else:
            node, key = draw(st.sampled_from(slots))
            if op == "delete":
                del node[key]
            else:
                node[key] = copy.deepcopy(draw(JSON_VALUES if op == "replace" else st.sampled_from(TRICKY_VALUES)))
    return rec


RECORDS = st.one_of(  # edited valid records; VQ ids of any size; known fields of any type; any JSON at all
    mutated_records(),
    st.lists(st.integers(0, 20000) | BIG_INTS, max_size=70).map(  # wrong types: the "number" edit above
        lambda ids: {"kind": "generation", "caption": "c", "vq_ids": ids}),
    st.fixed_dictionaries({"kind": st.sampled_from(["understanding", "text", "generation"])},
                          optional={f: JSON_VALUES for f in FIELDS if f != "kind"}),
    JSON_VALUES,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ref=PATHS)
def test_fuzz_image_references_give_an_image_or_a_data_error(ref, hostile_root):
    where = "fuzz.jsonl:3"
    for obj in ({"kind": "generation", "caption": "c", "image": ref}, {"kind": "understanding", "messages": HI,
                                                                       "images": ["img/ok.png", ref]}):
        try:
            s = parse_record(obj, where, file_fetch(hostile_root, where))
        except DataError as e:
            assert e.where == where and e.reason in ("path", "image"), str(e)
            continue
        assert all(im.mode == "RGB" for im in s.images) and len(s.images) == len(obj.get("images", [1]))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(obj=RECORDS)
def test_fuzz_parse_record_gives_a_sample_or_a_data_error(obj, hostile_root, encoder):
    where = "fuzz.jsonl:7"
    try:
        s = parse_record(obj, where, file_fetch(hostile_root, where))
    except DataError as e:
        assert e.where == where and e.reason in REASONS and str(e).startswith(f"{where}: ")
        return
    assert isinstance(s, Sample) and s.key == where
    try:
        encoder(s)
    except DataError as e:
        assert e.where == where and e.reason in REASONS


LINES = st.one_of(
    st.text(CHARS, max_size=40),
    st.integers(1, 5000).map(lambda n: "[" * n),  # past ~1000 the JSON decoder runs out of recursion
    st.integers(1, 6000).map(lambda n: "7" * n),  # past 4300 digits int() refuses
    st.integers(1, 3000).map(lambda n: '{"kind": "text", "text": ' + "[" * n + "]" * n + "}"),
    st.builds(lambda obj, ascii: json.dumps(obj, ensure_ascii=ascii), RECORDS, st.booleans()),  # raw surrogates too
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(lines=st.lists(LINES, min_size=1, max_size=6))
def test_fuzz_raw_jsonl_lines_are_skipped_and_counted(lines, hostile_root, encoder, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz-lines.jsonl"
    with open(path, "w", encoding="utf-8", errors="surrogatepass", newline="\n") as fh:  # lone surrogates -> bad UTF-8
        fh.write('{"kind": "text", "text": "fine"}\n' + "".join(line + "\n" for line in lines))
    src = ManifestSource(path, root=hostile_root, shuffle=False, epochs=1, on_error="skip", transform=encoder)
    good = list(src)
    assert good[0].key == f"{path}:1" and len(good) + src.n_skipped == len(src)
    assert set(src.skipped) <= REASONS
    try:
        for _ in jsonl_rows(path):
            pass
    except DataError as e:
        assert e.reason == "json" and e.where.startswith(f"{path}:")


# ------------------------------------------------------------------------------------------------ VQ cache


def test_cache_vq_ids_writes_a_manifest_with_ids(tmp_path, parts):
    model, proc = parts
    root = tmp_path / "gen"
    recs = records(0, 0, 3)["generation"]
    recs.append({"kind": "generation", "caption": "already cached", "vq_ids": list(range(64))})
    write_jsonl(root, recs)
    out = tmp_path / "cache" / "gen.vq.jsonl"
    stats = cache_vq_ids(root, model, out, batch_size=2)
    assert stats == {"lines": 4, "encoded": 3, "cached": 1}
    cached = list(ManifestSource(out, root=root, shuffle=False, epochs=1))
    fresh = list(ManifestSource(root, shuffle=False, epochs=1))
    assert [s.caption for s in cached] == [r["caption"] for r in recs]
    for c, f in zip(cached[:3], fresh[:3]):
        want = model.gen_vision_model.encode(to_gen_pixels(f.images[0], model.config.vq.image_size)[None])[0]
        assert c.vq_ids == want.tolist() and not c.images
    assert cached[3].vq_ids == list(range(64))


def test_trainer_builder_yields_whole_step_batches(dataset, parts):
    from januskit.train.config import DataContext
    from januskit.train.data.loader import build

    model, proc = parts
    ctx = DataContext(ratio=(5, 1, 4), batch_size=20, grad_accum=1, micro_batch_size=2, seq_len=512, seed=3, rank=1,
                      world=2, model_config=model.config, source="tiny-janus-pro", model=model)
    data = build(ctx, understanding=str(dataset["jsonl"]["understanding"]), text=[str(dataset["tar"]["text"])],
                 generation={"paths": str(dataset["jsonl"]["generation"] / "data.jsonl")}, prefetch=0)
    assert data.per_step
    b = next(iter(data))
    assert sum(data.last["samples"].values()) == 10  # this rank's half of the global batch
    assert b.input_ids.shape[1] == 512 and b.text_labels.shape == b.input_ids.shape
    assert int(b.kinds.max()) <= 2 and int((b.image_labels != IGNORE).sum()) == 64 * data.last["samples"]["generation"]
    st = data.state_dict()
    assert torch.load(io.BytesIO(_saved(st)), weights_only=True) == st  # the trainer loads it weights_only


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_janus_13b_role_format_masks_answers_too():
    from januskit.processing.chat import Processor
    from januskit.processing.image import ImageTransform
    from januskit.processing.synthetic_tokenizer import build_synthetic_tokenizer
    from januskit.config import preset

    proc = Processor(build_synthetic_tokenizer(1024, style="janus"), ImageTransform(size=128), 64)
    assert proc.roles == ("User", "Assistant")
    enc = SampleEncoder(proc, preset("tiny-janus").vq)
    msgs = [Message("user", "What is 2 plus 2?"), Message("assistant", "4, of course."),
            Message("user", "And 3 plus 3?"), Message("assistant", "(six) 6")]
    e = enc(Sample("text", "conv", messages=msgs))
    ids, targets = expected_targets(proc, msgs, [])
    assert e.ids.tolist() == ids and set(torch.nonzero(e.text_target).flatten().tolist()) == targets
    assert proc.tokenizer.decode(e.ids[e.text_target].tolist(), skip_special_tokens=False) == \
        " 4, of course.<｜end▁of▁sentence｜> (six) 6<｜end▁of▁sentence｜>"


def test_turn_answer_weighting_gives_every_answer_one_share(dataset, parts):
    """answer_weighting = "turn": every answer of a conversation carries the same total weight (the
    conversation's answer-token count, split evenly between its answers), packing, micro-batches and the
    padding-free layout carry the weights, and the objective is the weighted sum while the per-kind figures stay
    plain token means; "token" (the default) leaves batches unweighted."""
    from januskit.train.data.encode import turn_weights
    from januskit.train.data.packing import without_padding
    from januskit.train.losses import batch_losses

    t = torch.tensor([0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)  # answers of 3, 1, 6 tokens
    w = turn_weights(t)
    assert w.tolist() == pytest.approx([0, 0] + [10 / 9] * 3 + [0, 0, 10 / 3, 0] + [10 / 18] * 6)
    assert turn_weights(torch.zeros(4, dtype=torch.bool)).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="answer_weighting must be one of 'token', 'turn', got 'answer'"):
        SampleEncoder.for_model(parts[0], parts[1], answer_weighting="answer")

    model, proc = parts
    enc = SampleEncoder.for_model(model, proc, cfg_drop=0.0, answer_weighting="turn")
    plain = SampleEncoder.for_model(model, proc, cfg_drop=0.0)
    convs = [s for s in ManifestSource(dataset["jsonl"]["understanding"], shuffle=False, epochs=1)][:4]
    multi = [s for s in convs if len(answers_of(s.messages)) > 1]
    assert multi, "the fixture needs a conversation with several answers"
    for s in convs:
        e = enc(s)
        tw = e.text_weights()
        labels, _ = e.labels()
        assert bool(((tw > 0) == (labels != IGNORE)).all())  # weights exactly at the targets
        assert float(tw.sum()) == pytest.approx(float((labels != IGNORE).sum()))  # the conversation's total kept
        spans = [list(g) for k, g in itertools.groupby(range(len(tw)), key=lambda i: bool(tw[i] > 0)) if k]
        assert len(spans) == len(answers_of(s.messages))
        assert [float(tw[sp].sum()) for sp in spans] == pytest.approx([float(tw.sum()) / len(spans)] * len(spans))
        assert plain(s).text_weight is None and torch.equal(plain(s).text_weights(), (labels != IGNORE).float())
    docs = list(itertools.islice(ManifestSource(dataset["jsonl"]["text"], shuffle=False, transform=enc), 2))
    samples = [enc(s) for s in convs] + docs
    batch = pack(samples, 400, pad_id=proc.pad_id)
    assert batch.text_weights is not None and pack([plain(s) for s in convs], 400, pad_id=proc.pad_id).text_weights is None
    assert float(batch.text_weights.sum()) == pytest.approx(float((batch.text_labels != IGNORE).sum()))
    micro = split_rows(batch, 1, proc.n_image_tokens)
    assert torch.equal(torch.cat([m.text_weights for m in micro]), batch.text_weights)
    flat = without_padding(batch)
    assert torch.equal(flat.text_weights[0], batch.text_weights[batch.doc_ids >= 0])
    with torch.no_grad():
        s_w = batch_losses(model, batch)
        unweighted = pack([plain(s) for s in convs] + docs, 400, pad_id=proc.pad_id)
        s_u = batch_losses(model, unweighted)
    assert torch.equal(s_w.by_kind, s_u.by_kind) and torch.equal(s_w.count, s_u.count)  # figures: plain means
    assert not torch.allclose(s_w.total, s_u.total)  # the objective: weighted ...
    import dataclasses
    twice = dataclasses.replace(unweighted, text_weights=2.0 * (unweighted.text_labels != IGNORE).float())
    with torch.no_grad():
        assert float(batch_losses(model, twice).total) == pytest.approx(2 * float(s_u.total), rel=1e-5)  # ... sum w*CE


def _epoch(src, epoch: int) -> list[str]:
    """What `src` yields until it moves past `epoch` (the sample that starts the next epoch is put back by
    reloading the state taken before it)."""
    out = []
    while True:
        st = src.state_dict()
        x = next(src)
        if src.epoch > epoch:
            src.load_state_dict(st)
            return out
        out.append(ident(x))


@pytest.mark.parametrize("fmt", ["jsonl", "tar"])
@pytest.mark.parametrize("new_world", [1, 3])
def test_reshard_takes_no_sample_twice_and_passes_over_only_what_lagging_ranks_had_not_reached(
        dataset, fmt, new_world):
    """Resuming at another number of ranks (train.checkpoints.restore_state): the new ranks go on from one past
    the furthest sample (shard) any old rank took, so nothing is taken twice in the epoch; what a lagging old
    rank had not reached yet is passed over. Here two old ranks took 4 and 1 understanding samples (12: one
    permutation, or 4 shards of 3)."""
    kind, n = "understanding", N_UND
    old = [make_source(dataset, fmt, kind, seed=4, rank=r, world_size=2) for r in range(2)]
    took = [ident(next(old[0])) for _ in range(4)] + [ident(next(old[1]))]
    states = json.loads(json.dumps([s.state_dict() for s in old]))
    new = [make_source(dataset, fmt, kind, seed=4, rank=r, world_size=new_world) for r in range(new_world)]
    for r, s in enumerate(new):
        s.load_state_dict(json.loads(json.dumps(s.reshard(states, r, new_world))))
    rest = [x for s in new for x in _epoch(s, 0)]
    seen = took + rest
    assert len(seen) == len(set(seen))  # no sample twice in the epoch
    # jsonl: old positions 0,2,4,6 and 1 taken; 3 and 5 passed over; 7..11 left. tar: shards 0 and 1 of the
    # permutation opened by rank 0 (3 + 1 taken), shard 1 by rank 1 (1 taken); the new ranks read shard 3
    assert len(rest) == (5 if fmt == "jsonl" else 3) and len(seen) == (10 if fmt == "jsonl" else 8)
    # the next epoch is the new number of ranks' ordinary split: every sample once
    nxt = [x for s in new for x in _epoch(s, 1)]
    assert len(nxt) == len(set(nxt)) == n


def test_a_mix_with_a_source_without_reshard_is_refused():
    m = Mixer(counting_sources(), (5, 1, 4), 10, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"its understanding source \(Counting\) has no reshard; resume with 2 "
                                         r"processes"):
        m.reshard([m.state_dict(), m.state_dict()], 0, 1)
