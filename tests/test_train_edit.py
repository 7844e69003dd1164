"""Edit (image-to-image) training samples: the sequence is the edit prompt the sampler uses plus the
target's slots, the source images fill understanding slots, only the target carries loss; the
InstructPix2Pix dropout drops exactly the positions the sampler's guidance rows drop (Janus: pad,
JanusFlow: hidden), at the configured, reproducible rates; bad records are DataErrors naming the field;
edit mixes, packs, trains (with LoRA too) and resumes like the other kinds. Tiny presets, CPU."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import januskit
from januskit.checkpoint.init import init_checkpoint, preset_pipeline_parts
from januskit.processing.edit import ROWS, EditInputs, dropped_positions
from januskit.processing.image import to_gen_pixels
from januskit.sampling.flow import edit_flow_rows, row_velocities
from januskit.sampling.image_ar import edit_rows
from januskit.train.config import DataContext, RunConfig
from januskit.train.data.batch import IGNORE
from januskit.train.data.encode import SampleEncoder, fill_latents, fill_vq_ids, to_und_pixels, vq_tokenizer
from januskit.train.data.loader import build as build_loader
from januskit.train.data.mixing import Mixer
from januskit.train.data.packing import flow_starts, pack
from januskit.train.data.records import DataError, ManifestSource, Sample, TarSource
from januskit.train.data.vq_cache import cache_vq_ids
from januskit.train.flow import FlowSettings, flow_inputs, noise_and_t
from januskit.train.lora import ADAPTER_WEIGHTS
from januskit.train.losses import LossForward, batch_loss
from januskit.train.plot import read_metrics
from januskit.train.trainer import train

from train_helpers import LORA, PRESET

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
INSTRUCTION = "make the square blue"
# outcome -> (edit_drop_text, edit_drop_image, edit_drop_both) that force it, and its (keep text, keep image)
OUTCOMES = {"full": ((0, 0, 0), (True, True)), "text": ((1, 0, 0), (False, True)),
            "image": ((0, 1, 0), (True, False)), "both": ((0, 0, 1), (False, False))}


@pytest.fixture(scope="module")
def janus():
    return preset_pipeline_parts(PRESET, seed=0)  # (model, processor)


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("edit-flow") / "base", arch="janusflow", seed=0)


@pytest.fixture(scope="module")
def flow(flow_ckpt):
    return januskit.load(flow_ckpt)  # the pipeline: model, processor and the VAE


def square(colour: str, size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[colour])


def edit_sample(key: str = "edit.jsonl:1", sources: tuple[str, ...] = ("red",), target: str = "blue",
                vq_ids: list[int] | None = None, epoch: int = 0) -> Sample:
    return Sample("edit", key, epoch, instruction=INSTRUCTION, images=[square(c) for c in sources],
                  target=None if vq_ids is not None else square(target), vq_ids=vq_ids)


def encoder(model, proc, outcome: str = "full", **kw) -> SampleEncoder:
    t, i, b = OUTCOMES[outcome][0]
    return SampleEncoder.for_model(model, proc, edit_drop_text=t, edit_drop_image=i, edit_drop_both=b, **kw)


def ids_of(proc) -> dict[str, int]:
    tok = proc.tokenizer
    return {"image_id": tok.image_id, "boi_id": tok.boi_id, "eoi_id": tok.eoi_id}


# -- the sequence -------------------------------------------------------------------------------------------

def test_janus_edit_is_the_edit_prompt_then_the_target_with_loss_only_there(janus, tmp_path):
    model, proc = janus
    n, tok = model.config.vq.n_tokens, proc.tokenizer
    e = encoder(model, proc)(edit_sample(sources=("red", "green")))
    prompt = proc.edit_prompt(INSTRUCTION, 2)
    P = len(prompt)
    assert e.ids.tolist() == prompt + [tok.image_id] * n + [tok.eoi_id]
    assert prompt[-1] == tok.boi_id and prompt.count(tok.boi_id) == 3  # two source blocks, then the target's
    slots = [i for i, t in enumerate(prompt) if t == tok.image_id]
    assert len(slots) == 2 * proc.n_image_tokens
    assert e.und_mask.nonzero().flatten().tolist() == slots  # exactly the sources' slots
    assert e.gen_mask.nonzero().flatten().tolist() == list(range(P, P + n))  # exactly the target's
    want_pix = torch.stack([proc.transform(square("red")), proc.transform(square("green"))])
    assert torch.equal(e.pixel_values, want_pix)  # in block order, as masked_scatter fills them
    assert fill_vq_ids([e], vq_tokenizer(model), model.config.vq.codebook_size) == 1
    want = model.gen_vision_model.encode(to_gen_pixels(square("blue"), model.config.vq.image_size)[None])[0]
    assert torch.equal(e.gen_ids, want)  # the TARGET's ids, not a source's
    text_labels, image_labels = e.labels()
    assert bool((text_labels == IGNORE).all())  # no loss on the instruction or the sources
    assert image_labels.ne(IGNORE).nonzero().flatten().tolist() == list(range(P - 1, P - 1 + n))
    assert image_labels[P - 1:P - 1 + n].tolist() == want.tolist()  # first id predicted from the final boi

    # cached target ids (vq_cache writes them for edit lines too) give the same sample
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    for c in ("red", "green", "blue"):
        square(c).save(root / "img" / f"{c}.png")
    rec = {"kind": "edit", "instruction": INSTRUCTION, "images": ["img/red.png", "img/green.png"],
           "target": "img/blue.png"}
    (root / "edit.jsonl").write_text(json.dumps(rec) + "\n")
    stats = cache_vq_ids(root, model, tmp_path / "edit.vq.jsonl")
    assert stats == {"lines": 1, "encoded": 1, "cached": 0}
    s = next(ManifestSource(tmp_path / "edit.vq.jsonl", root=root, shuffle=False))
    assert s.vq_ids == want.tolist() and s.target is None and len(s.images) == 2
    cached = encoder(model, proc)(s)
    assert torch.equal(cached.ids, e.ids) and torch.equal(cached.gen_ids, e.gen_ids)
    assert torch.equal(cached.labels()[1], image_labels) and torch.equal(cached.pixel_values, want_pix)


def test_flow_edit_is_the_prompt_without_boi_then_the_flow_slots(flow):
    c, proc, tok = flow.config, flow.processor, flow.processor.tokenizer
    e = encoder(flow.model, proc, repa=True)(edit_sample())
    prompt = proc.edit_prompt(INSTRUCTION, 1)[:-1]  # <begin_of_image>'s slot takes the timestep token
    P, n = len(prompt), c.n_gen_tokens
    assert e.ids.tolist() == prompt + [tok.image_id] * (1 + n)
    assert e.und_mask.nonzero().flatten().tolist() == [i for i, t in enumerate(prompt) if t == tok.image_id]
    assert e.flow_mask.tolist() == [False] * P + [True] * (1 + n)
    assert not bool(e.hidden.any()) and not bool(e.gen_mask.any()) and not bool(e.text_target.any())
    assert torch.equal(e.pixel_values, proc.transform(square("red"))[None])
    gen_pixels = to_gen_pixels(square("blue"), c.vision.image_size)
    assert torch.equal(e.gen_pixels, gen_pixels)  # the target is what the latent is made of
    assert torch.equal(e.repa_pixels, to_und_pixels(gen_pixels, proc))  # REPA aligns to the target too
    fill_latents([e], lambda px: flow.vae.encode(px), c.latent_shape)
    assert tuple(e.flow_latent.shape) == tuple(c.latent_shape)
    with pytest.raises(DataError, match="a JanusFlow edit sample needs its image"):
        encoder(flow.model, proc)(edit_sample(vq_ids=list(range(64))))


def test_edit_samples_are_never_truncated(janus):
    model, proc = janus
    full = encoder(model, proc)(edit_sample())
    for enc in (encoder(model, proc, max_len=len(full) - 1),
                encoder(model, proc, max_len=len(full) - 1, too_long="truncate")):
        with pytest.raises(DataError, match="edit samples cannot be truncated|longer than the context") as err:
            enc(edit_sample())
        assert err.value.reason == "length"
    with pytest.raises(DataError, match="edit samples cannot be truncated") as err:
        pack([full], len(full) - 1, too_long="truncate", n_und_tokens=proc.n_image_tokens)
    assert err.value.where == "edit.jsonl:1"


# -- dropout ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("outcome", OUTCOMES)
def test_janus_dropout_pads_exactly_the_samplers_positions(janus, outcome):
    model, proc = janus
    keep_text, keep_image = OUTCOMES[outcome][1]
    e = encoder(model, proc, outcome)(edit_sample(sources=("red", "green"), vq_ids=list(range(64))))
    prompt = proc.edit_prompt(INSTRUCTION, 2)
    P = len(prompt)
    drop = dropped_positions(prompt, **ids_of(proc), keep_text=keep_text, keep_image=keep_image)
    assert e.ids[:P].tolist() == torch.where(drop, proc.pad_id, torch.tensor(prompt)).tolist()
    assert e.ids[P:].tolist() == [proc.tokenizer.image_id] * 64 + [proc.tokenizer.eoi_id]  # the target stays
    assert e.cfg_dropped == (outcome != "full")
    slots = torch.tensor(prompt) == proc.tokenizer.image_id
    assert e.und_mask[:P].tolist() == (slots & keep_image).tolist()  # a dropped image has no features
    assert (e.pixel_values is None) == (not keep_image)
    assert e.gen_ids.tolist() == list(range(64)) and int(e.gen_mask.sum()) == 64
    if outcome in ("full", "text", "both"):  # a guidance row the sampler builds: the very same ids
        row = list(ROWS.values()).index((keep_text, keep_image))
        ids, _ = edit_rows([prompt], proc.pad_id, EditInputs([], 1.5, **ids_of(proc)))
        assert e.ids[:P].tolist() == ids[row].tolist()


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_flow_dropout_hides_exactly_the_samplers_positions(flow, outcome):
    proc, tok = flow.processor, flow.processor.tokenizer
    keep_text, keep_image = OUTCOMES[outcome][1]
    e = encoder(flow.model, proc, outcome)(edit_sample(sources=("red", "green")))
    full = proc.edit_prompt(INSTRUCTION, 2)
    prompt = torch.tensor(full[:-1])
    P = len(prompt)
    drop = dropped_positions(full, **ids_of(proc), keep_text=keep_text, keep_image=keep_image)[:-1]
    assert e.hidden.tolist() == drop.tolist() + [False] * (1 + flow.config.n_gen_tokens)  # ids stay, hidden
    slots = prompt == tok.image_id
    # only a dropped image's slots change (to pad: no features), as in the sampler's rows
    assert e.ids[:P].tolist() == torch.where(slots & (not keep_image), proc.pad_id, prompt).tolist()
    assert e.und_mask[:P].tolist() == (slots & keep_image).tolist()
    assert (e.pixel_values is None) == (not keep_image)
    fill_latents([e], lambda px: flow.vae.encode(px), flow.config.latent_shape)
    batch = pack([e], 512, pad_id=proc.pad_id)
    assert batch.doc_ids[0, :P].tolist() == torch.where(drop, -1, 0).tolist()  # hidden = seen by no slot


def test_dropout_rates_are_the_configured_ones_and_reproducible(janus):
    model, proc = janus

    def outcomes(seed: int, folder: str = "data", **p) -> list[tuple[bool, bool]]:
        enc = SampleEncoder.for_model(model, proc, seed=seed, **p)
        return [enc.edit_condition(f"/{folder}/edit.jsonl:{i % 4000}", i // 4000) for i in range(20_000)]

    def rates(out: list) -> dict[str, float]:
        return {k: out.count(keep) / len(out) for k, (_, keep) in OUTCOMES.items()}

    default = outcomes(0)
    r = rates(default)  # InstructPix2Pix's 5% text, 5% image, 5% both
    for k in ("text", "image", "both"):
        assert abs(r[k] - 0.05) < 0.006, r
    assert abs(r["full"] - 0.85) < 0.01, r
    r = rates(outcomes(0, edit_drop_text=0.1, edit_drop_image=0.2, edit_drop_both=0.3))
    assert [round(r[k], 2) for k in ("text", "image", "both", "full")] == [0.1, 0.2, 0.3, 0.4], r
    assert outcomes(0) == default  # a pure function of (seed, epoch, key): resuming needs no state
    assert outcomes(0, folder="moved") == default  # the dataset's folder is not part of the key
    assert outcomes(1) != default  # seeded
    assert rates(outcomes(0, edit_drop_text=0, edit_drop_image=0, edit_drop_both=0))["full"] == 1
    # the encoder applies the draw: the sample is dropped exactly as edit_condition says
    enc = SampleEncoder.for_model(model, proc, seed=0, edit_drop_text=0.3, edit_drop_image=0.3, edit_drop_both=0.3)
    prompt = proc.edit_prompt(INSTRUCTION, 1)
    seen = set()
    for i in range(40):
        s = edit_sample(key=f"edit.jsonl:{i}", vq_ids=list(range(64)))
        keep_text, keep_image = enc.edit_condition(s.key, 0)
        drop = dropped_positions(prompt, **ids_of(proc), keep_text=keep_text, keep_image=keep_image)
        assert enc(s).ids[:len(prompt)].tolist() == torch.where(drop, proc.pad_id, torch.tensor(prompt)).tolist()
        seen.add((keep_text, keep_image))
    assert len(seen) == 4


def test_dropout_options_are_validated_naming_the_field(janus, tmp_path):
    model, proc = janus
    for kw, msg in [({"edit_drop_text": 1.5}, r"edit_drop_text must be a probability in \[0, 1\], got 1.5"),
                    ({"edit_drop_image": -0.1}, r"edit_drop_image must be a probability"),
                    ({"edit_drop_both": "0.1"}, r"edit_drop_both must be a probability in \[0, 1\], got '0.1'"),
                    ({"edit_drop_both": True}, r"edit_drop_both must be a probability"),
                    ({"edit_drop_text": 0.5, "edit_drop_image": 0.4, "edit_drop_both": 0.2},
                     r"edit_drop_text \+ edit_drop_image \+ edit_drop_both = 1.1 > 1"),
                    ({"cfg_drop": 2}, r"cfg_drop must be a probability")]:
        with pytest.raises(ValueError, match=msg):
            SampleEncoder.for_model(model, proc, **kw)
    SampleEncoder.for_model(model, proc, edit_drop_text=0.5, edit_drop_image=0.25, edit_drop_both=0.25)  # sum 1
    ctx = _ctx(model)  # the trainer's [data] table: the same checks, saying where
    with pytest.raises(ValueError, match=r"^\[data\] edit_drop_image must be a probability"):
        build_loader(ctx, edit_drop_image=7, prefetch=0)


# -- bad records --------------------------------------------------------------------------------------------

def _image_root(root: Path) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for c in COLOURS:
        square(c).save(root / "img" / f"{c}.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


GOOD = {"kind": "edit", "instruction": INSTRUCTION, "images": ["img/red.png"], "target": "img/blue.png"}
BAD = [  # (id, record changes (None: delete the field), message fragment, skip reason)
    ("no-instruction", {"instruction": None}, "missing field 'instruction'", "field"),
    ("blank-instruction", {"instruction": "  "}, "'instruction' must be a non-empty string", "field"),
    ("marker-in-instruction", {"instruction": "<image_placeholder> blue"}, "'instruction' contains <image_placeholder>",
     "field"),
    ("no-images", {"images": None}, "an edit sample needs at least one source image in 'images'", "field"),
    ("empty-images", {"images": []}, "an edit sample needs at least one source image in 'images'", "field"),
    ("images-not-list", {"images": "img/red.png"}, "'images' must be a list of strings", "field"),
    ("no-target", {"target": None}, "missing field 'target' (or 'vq_ids')", "field"),
    ("target-not-string", {"target": ["img/blue.png"]}, "'target' must be a string", "field"),
    ("target-missing-file", {"target": "img/none.png"}, "image 'img/none.png' not found", "image"),
    ("target-unreadable", {"target": "img/broken.png"}, "image 'img/broken.png'", "image"),
    ("source-unreadable", {"images": ["img/red.png", "img/broken.png"]}, "image 'img/broken.png'", "image"),
    ("target-absolute", {"target": "/etc/passwd"}, "is absolute", "path"),
    ("caption-on-edit", {"caption": "a blue square"}, "field(s) caption are not used by edit samples", "field"),
    ("image-on-edit", {"image": "img/blue.png"}, "field(s) image are not used by edit samples", "field"),
    ("vq-not-ints", {"vq_ids": [1, "2"]}, "'vq_ids' must be a list of integers; item 1", "vq_ids"),
    ("vq-wrong-length", {"vq_ids": [1, 2, 3]}, "vq_ids: expected 64 ids per image, got (3,)", "vq_ids"),
]


@pytest.mark.parametrize("changes, frag, reason", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_edit_record_is_a_data_error_naming_line_and_field(janus, tmp_path, changes, frag, reason):
    model, proc = janus
    root = _image_root(tmp_path)
    rec = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    path = root / "edit.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(rec) + "\n")
    src = ManifestSource(path, shuffle=False, transform=encoder(model, proc))
    next(src)  # line 1 is fine
    with pytest.raises(DataError) as err:
        next(src)
    assert str(err.value).startswith(f"{path}:2: ") and frag in str(err.value), str(err.value)
    assert err.value.reason == reason


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    square(colour).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_edit_samples_take_numbered_sources_and_a_target_member(tmp_path):
    shard = tmp_path / "edit-000.tar"
    with tarfile.open(shard, "w") as tf:
        _member(tf, "000000.json", json.dumps({"kind": "edit", "instruction": INSTRUCTION}).encode())
        for name, colour in (("0.png", "red"), ("1.png", "green"), ("target.png", "blue")):
            _member(tf, f"000000.{name}", _png(colour))
        rec = {"kind": "edit", "instruction": INSTRUCTION, "images": ["src.png"], "target": "out.png"}
        _member(tf, "000001.json", json.dumps(rec).encode())
        _member(tf, "000001.src.png", _png("green"))
        _member(tf, "000001.out.png", _png("red"))
        _member(tf, "000002.json", json.dumps({"kind": "edit", "instruction": INSTRUCTION}).encode())
        _member(tf, "000002.0.png", _png("red"))
    src = TarSource(shard, shuffle=False, kind="edit")

    def colours(images: list[Image.Image]) -> list[tuple]:
        return [im.getpixel((0, 0)) for im in images]

    a, b = next(src), next(src)
    assert colours(a.images) == [COLOURS["red"], COLOURS["green"]] and colours([a.target]) == [COLOURS["blue"]]
    assert colours(b.images) == [COLOURS["green"]] and colours([b.target]) == [COLOURS["red"]]
    with pytest.raises(DataError, match=r"000002: missing 'target': expected one 000002\.target\.<png") as err:
        next(src)
    assert err.value.reason == "field"


# -- mixing, the loss buckets, the trainer ------------------------------------------------------------------

class Counting:
    def __init__(self) -> None:
        self.i = 0

    def __next__(self) -> int:
        self.i += 1
        return self.i

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, st: dict) -> None:
        self.i = st["i"]


def test_mixer_takes_an_edit_weight_and_resumes_older_states():
    kinds = ("understanding", "generation", "edit")
    m = Mixer({k: Counting() for k in kinds}, (1, 0, 1, 2), batch_size=4, seed=0)
    for _ in range(3):
        plan = m.plan()
        next(m)
        assert sorted(plan) == ["edit", "edit", "generation", "understanding"]
    assert m.state_dict()["given"] == [3, 0, 3, 6]
    # a paper's three weights: no edit samples, the same plans as before edit existed
    three = Mixer({k: Counting() for k in ("understanding", "generation")}, (5, 0, 4), 10, seed=0)
    assert three.weights[-1] == 0
    st = three.state_dict()
    old = {**st, "given": st["given"][:3], "ratio": st["ratio"][:3]}  # saved before the edit kind existed
    again = Mixer({k: Counting() for k in ("understanding", "generation")}, (5, 0, 4), 10, seed=0)
    again.load_state_dict(old)
    assert again.state_dict() == st
    with pytest.raises(ValueError, match="ratio needs 3 or 4 weights"):
        Mixer({}, (1, 1), 4)
    with pytest.raises(ValueError, match="ratio gives 'edit' weight 1 but there is no edit source"):
        Mixer({"generation": Counting()}, (0, 0, 1, 1), 4)


@pytest.mark.parametrize("arch", ["janus", "janusflow"])
def test_source_images_reach_the_loss_unless_dropped(janus, flow, arch):
    """The understanding features of the sources are spliced into the prompt in both loss paths (the
    target's loss changes with the source), and a dropped image contributes nothing."""
    if arch == "janus":
        (model, proc), settings, fill = janus, None, lambda items: fill_vq_ids(items, vq_tokenizer(janus[0]))
    else:
        model, proc, settings = flow.model, flow.processor, FlowSettings(repa_weight=0.0)
        fill = lambda items: fill_latents(items, lambda px: flow.vae.encode(px), flow.config.latent_shape)  # noqa: E731

    def edit_loss(outcome: str, source: str) -> float:
        e = encoder(model, proc, outcome)(edit_sample(sources=(source,)))
        fill([e])
        with torch.no_grad():
            _, per = batch_loss(model, pack([e], 512, pad_id=proc.pad_id), settings)
        assert set(per) == {"edit"}  # its own bucket
        return per["edit"]

    assert edit_loss("full", "red") != edit_loss("full", "green")
    assert edit_loss("text", "red") != edit_loss("text", "green")
    assert edit_loss("image", "red") == edit_loss("image", "green")
    assert edit_loss("both", "red") == edit_loss("both", "green")


@pytest.mark.parametrize("row", ROWS)
def test_flow_training_velocity_equals_the_samplers_edit_row(flow, row):
    """An edit sample's training forward computes the velocity the sampler computes for the guidance row
    of its dropout outcome (full, image-only, unconditional)."""
    m, proc = flow.model, flow.processor
    outcome = {"full": "full", "image": "text", "none": "both"}[row]  # the row keeps what the outcome keeps
    loss = LossForward(m, FlowSettings(repa_weight=0.0))
    e = encoder(m, proc, outcome)(edit_sample(sources=("red", "green")))
    fill_latents([e], lambda px: flow.vae.encode(px), flow.config.latent_shape)
    batch = pack([e], 512, pad_id=proc.pad_id)
    prompt = proc.edit_prompt(INSTRUCTION, 2)
    sources = torch.stack([proc.transform(square("red")), proc.transform(square("green"))])
    with torch.no_grad():
        inputs, skip, t_emb, _ = flow_inputs(m, batch.flow_latents, batch.flow_seeds, loss.flow)
        h = m.splice(batch.input_ids, batch.und_mask, batch.pixel_values)
        h = h.masked_scatter(batch.flow_mask[..., None], inputs.reshape(-1, inputs.shape[-1]))
        hidden, _ = m.llm.forward_packed(h, batch.positions, batch.doc_ids)
        grid = batch.flow_mask & ~flow_starts(batch.flow_mask)
        v_train = m.velocity(hidden[grid].view(1, -1, hidden.shape[-1]), skip, t_emb)
        noise, t = noise_and_t(batch.flow_seeds, flow.config.latent_shape, loss.flow)
        z_t = t * batch.flow_latents + (1 - t) * noise
        ids, valid, pos = edit_flow_rows([prompt], proc.pad_id, EditInputs([sources], 1.5, **ids_of(proc)))
        prompt_h = m.splice(ids, ids == proc.tokenizer.image_id, torch.cat([sources] * 2))
        v_rows = row_velocities(m, prompt_h, pos, valid, torch.cat([z_t] * 3), torch.cat([t] * 3))
    torch.testing.assert_close(v_train[0], v_rows[list(ROWS).index(row)], rtol=0, atol=2e-5)
    assert not torch.allclose(v_rows[0], v_rows[1], atol=1e-3) and not torch.allclose(v_rows[1], v_rows[2], atol=1e-3)


def _ctx(model, ratio=(0, 0, 1, 1), batch_size=4) -> DataContext:
    return DataContext(ratio=ratio, batch_size=batch_size, grad_accum=1, micro_batch_size=2, seq_len=384, seed=3,
                       rank=0, world=1, model_config=model.config, source=PRESET, model=model)


def _dataset(root: Path) -> Path:
    """gen.jsonl: a square of each colour; edit.jsonl: recolour one square, or pick one of two."""
    _image_root(root)
    names = list(COLOURS)
    gen = [{"kind": "generation", "caption": f"a {c} square", "image": f"img/{c}.png"} for c in names]
    edit = [{"kind": "edit", "instruction": f"make it {b}", "images": [f"img/{a}.png"], "target": f"img/{b}.png"}
            for a, b in zip(names, names[1:] + names[:1])]
    edit.append({"kind": "edit", "instruction": "keep only the second", "images": ["img/red.png", "img/green.png"],
                 "target": "img/green.png"})
    for name, rows in (("gen", gen), ("edit", edit)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_loader_mixes_edit_with_generation(janus, tmp_path):
    model, _ = janus
    data_root = _dataset(tmp_path / "data")
    data = build_loader(_ctx(model, ratio=(0, 0, 1, 3)), generation=str(data_root / "gen.jsonl"),
                        edit=str(data_root / "edit.jsonl"), prefetch=0, edit_drop_text=0, edit_drop_image=0,
                        edit_drop_both=0)
    b = next(data)
    assert data.last["samples"] == {"generation": 1, "edit": 3}
    assert set(b.kinds.unique().tolist()) - {-1} == {2, 3}  # records.KIND_CODE: generation 2, edit 3
    assert int((b.image_labels != IGNORE).sum()) == 4 * 64  # every target's ids, and nothing else
    assert int((b.text_labels != IGNORE).sum()) == 0
    assert int(b.und_mask.sum()) == b.pixel_values.shape[0] * 64  # the edits' sources
    st = data.state_dict()
    assert set(st["sources"]) == {"generation", "edit"} and st["given"] == [0, 0, 1, 3]


def _run(out: Path, source: str | Path, data: Path, steps: int, *, stage: str, lora: dict | None = None,
         flow: dict | None = None) -> RunConfig:
    return RunConfig.from_dict({**({"lora": lora} if lora else {}), **({"flow": flow} if flow else {}),
        "model": {"source": str(source), "seed": 0},
        "stage": {"name": stage, "steps": steps, "warmup": 0, "batch_size": 4, "lr": 1e-3, "ratio": [0, 0, 1, 1]},
        "train": {"out": str(out), "micro_batch_size": 2, "seq_len": 384, "save_every": 2, "log_every": 1,
                  "keep_last": 2, "export_dtype": "float32", "seed": 0, "progress": False, "plot": False,
                  "parallel": "none"},
        "data": {"builder": "januskit.train.data.loader:build", "generation": str(data / "gen.jsonl"),
                 "edit": str(data / "edit.jsonl"), "prefetch": 0, "edit_drop_text": 0.2, "edit_drop_image": 0.2,
                 "edit_drop_both": 0.2}})


def _losses(out: Path) -> list[dict]:
    rows = read_metrics(out / "metrics.jsonl")
    for r in rows:
        assert np.isfinite(r["loss"]) and np.isfinite(r["loss_edit"]) and np.isfinite(r["loss_gen"]), r
        assert r["loss_und"] is None and r["loss_text"] is None, r
    return rows


def test_janus_trains_on_generation_and_edit_and_resumes_exactly(tmp_path):
    data = _dataset(tmp_path / "data")
    train(_run(tmp_path / "a", PRESET, data, 2, stage="janus-pro/3"))
    train(_run(tmp_path / "a", PRESET, data, 3, stage="janus-pro/3"), resume=True)  # from the step-2 checkpoint
    resumed = _losses(tmp_path / "a")
    straight = _losses(train(_run(tmp_path / "b", PRESET, data, 3, stage="janus-pro/3")))
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(resumed, straight):
        assert {k: v for k, v in a.items() if k not in ("time_s", "tok_per_s")} == \
            {k: v for k, v in b.items() if k not in ("time_s", "tok_per_s")}


@pytest.mark.needs("peft", "lora")
@pytest.mark.parametrize("arch", ["janus", "janusflow"])
def test_edit_trains_with_lora(tmp_path, flow_ckpt, arch):
    data = _dataset(tmp_path / "data")
    if arch == "janus":
        cfg = _run(tmp_path / "out", PRESET, data, 2, stage="janus-pro/3", lora=LORA)
    else:
        cfg = _run(tmp_path / "out", flow_ckpt, data, 2, stage="janusflow/3", lora={"enabled": True, "r": 4},
                   flow={"repa_layer": 1})
    assert len(_losses(train(cfg))) == 2
    assert (tmp_path / "out" / "checkpoints" / "step-00000002" / ADAPTER_WEIGHTS).is_file()  # only adapters train


def test_janusflow_trains_on_generation_and_edit_with_repa(tmp_path, flow_ckpt):
    data = _dataset(tmp_path / "data")
    rows = _losses(train(_run(tmp_path / "out", flow_ckpt, data, 2, stage="janusflow/3", flow={"repa_layer": 1})))
    assert all(0 <= r["loss_repa"] <= 2 for r in rows)  # over the gen and edit grid positions


# -- sources as VQ tokens ([data] edit_source = "vq") ------------------------------------------------------

@pytest.fixture
def vq_proc(janus):
    """The tiny model's processor with VQ sources (a copy: the module fixture's stays as it is)."""
    import copy

    model, proc = janus
    p = copy.copy(proc)
    p.edit_source_slots = model.config.vq.n_tokens
    return p


def test_vq_sources_are_input_slots_before_the_target_and_carry_no_loss(janus, vq_proc, tmp_path):
    model, proc = janus[0], vq_proc
    n, tok = model.config.vq.n_tokens, proc.tokenizer
    e = encoder(model, proc)(edit_sample(sources=("red", "green")))
    prompt = proc.edit_prompt(INSTRUCTION, 2)
    P = len(prompt)
    und_prompt = janus[1].edit_prompt(INSTRUCTION, 2)
    assert prompt.count(tok.image_id) == 2 * n and und_prompt.count(tok.image_id) == 2 * janus[1].n_image_tokens
    assert INSTRUCTION in tok.decode(prompt[:prompt.index(tok.boi_id)])  # the instruction comes first
    assert INSTRUCTION not in tok.decode(und_prompt[:und_prompt.index(tok.boi_id)])  # (a chat's order: after)
    # the last source ends a fixed distance before the target: the same for any instruction
    gap = lambda ids: len(ids) - 1 - max(i for i, t in enumerate(ids) if t == tok.image_id)  # noqa: E731
    assert gap(prompt) == gap(proc.edit_prompt("swap the red circle and the blue square, please", 1))
    slots = [i for i, t in enumerate(prompt) if t == tok.image_id]
    assert not bool(e.und_mask.any()) and e.pixel_values is None  # nothing through the understanding encoder
    assert e.gen_mask.nonzero().flatten().tolist() == slots + list(range(P, P + n))
    assert e.gen_input.nonzero().flatten().tolist() == slots
    assert fill_vq_ids([e], vq_tokenizer(model), model.config.vq.codebook_size) == 3  # 2 sources + the target
    enc = lambda c: model.gen_vision_model.encode(to_gen_pixels(square(c), model.config.vq.image_size)[None])[0]  # noqa: E731
    assert torch.equal(e.gen_ids, torch.cat([enc("red"), enc("green"), enc("blue")]))  # slot order
    text_labels, image_labels = e.labels()
    assert bool((text_labels == IGNORE).all())
    assert image_labels.ne(IGNORE).nonzero().flatten().tolist() == list(range(P - 1, P - 1 + n))  # target only
    assert image_labels[P - 1:P - 1 + n].tolist() == enc("blue").tolist()
    # cached target ids: the sources still go through the tokenizer, ahead of the cached ids
    c = encoder(model, proc)(edit_sample(sources=("red", "green"), vq_ids=enc("blue").tolist()))
    with pytest.raises(ValueError, match="VQ ids not computed yet"):
        c.labels()
    assert fill_vq_ids([c], vq_tokenizer(model), model.config.vq.codebook_size) == 2
    assert torch.equal(c.gen_ids, e.gen_ids) and torch.equal(c.labels()[1], image_labels)
    # a dropped image: its slots are pad, no VQ input, no source to encode
    d = encoder(model, proc, "image")(edit_sample())
    assert d.source_pixels is None and int(d.gen_mask.sum()) == n and tok.image_id not in d.ids[:-n - 1].tolist()


@pytest.mark.parametrize("outcome,row", [("full", 0), ("text", 1), ("both", 2)])
def test_vq_source_training_inputs_equal_the_samplers_edit_row(janus, vq_proc, outcome, row):
    """The prompt part of a VQ-source edit sample embeds exactly as the sampler's guidance row of its
    dropout outcome (so what training teaches is what sampling asks)."""
    from januskit.sampling.image_ar import edit_embeds

    model, proc = janus[0], vq_proc
    e = encoder(model, proc, outcome)(edit_sample())
    fill_vq_ids([e], vq_tokenizer(model))
    b = pack([e], 512, pad_id=proc.pad_id)
    with torch.no_grad():
        h_train = model.mixed_embeds(b.input_ids, b.und_mask, b.pixel_values, b.gen_mask, b.gen_ids)
        prompt = proc.edit_prompt(INSTRUCTION, 1)
        src = to_gen_pixels(square("red"), model.config.vq.image_size)[None]
        inputs = EditInputs([src], 1.5, **ids_of(proc), via="vq")
        ids, valid = edit_rows([prompt], proc.pad_id, inputs)
        h_sample = edit_embeds(model, ids, inputs)
    assert valid is None and ids.shape == (3, len(prompt))
    assert torch.equal(b.input_ids[0, :len(prompt)], ids[row])
    torch.testing.assert_close(h_train[0, :len(prompt)], h_sample[row], rtol=0, atol=0)


def test_a_vq_source_model_records_it_and_edits_through_its_vq(tmp_path):
    data = _dataset(tmp_path / "data")
    cfg = _run(tmp_path / "out", PRESET, data, 2, stage="janus-pro/3").to_dict()
    cfg["data"]["edit_source"] = "vq"
    out = train(RunConfig.from_dict(cfg))
    assert json.loads((out / "generation_config.json").read_text())["edit_source"] == "vq"
    pipe = januskit.load(out)
    n = pipe.config.vq.n_tokens
    assert pipe.processor.edit_source == "vq" and pipe.processor.edit_source_slots == n
    ids = pipe.processor.edit_prompt(INSTRUCTION, 1)
    assert ids.count(pipe.processor.tokenizer.image_id) == n
    a = pipe.edit_image(INSTRUCTION, [square("red")], n=2, seed=3)
    b = pipe.edit_image(INSTRUCTION, [square("red")], n=2, seed=3)
    c = pipe.edit_image(INSTRUCTION, [square("green")], n=2, seed=3)
    assert a.tokens.shape == (2, n) and torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)  # the source matters
    assert a.info["prompt_tokens"] == len(ids)
    # training from that folder keeps its way unless [data] edit_source says otherwise (the export copies
    # the source's generation_config.json, so it must be rewritten either way)
    def further(name: str, **data) -> dict:
        c = _run(tmp_path / name, out, _dataset(tmp_path / "data2"), 1, stage="janus-pro/3").to_dict()
        c["data"].update(data)
        return json.loads((train(RunConfig.from_dict(c)) / "generation_config.json").read_text())
    assert further("kept")["edit_source"] == "vq"
    assert further("back", edit_source="understanding")["edit_source"] == "understanding"
    # a bad value in the folder is named; JanusFlow refuses VQ sources at training time
    (out / "generation_config.json").write_text(json.dumps({"edit_source": "pixels"}))
    with pytest.raises(Exception, match=r"generation_config.json: edit_source must be one of understanding, vq"):
        januskit.load(out)
    cfg["data"]["edit_source"] = "latents"
    cfg["train"]["out"] = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"\[data\] edit_source must be one of understanding, vq, got 'latents'"):
        train(RunConfig.from_dict(cfg))


def test_janusflow_refuses_vq_sources_naming_the_option(flow_ckpt, tmp_path):
    data = _dataset(tmp_path / "data")
    cfg = _run(tmp_path / "out", flow_ckpt, data, 1, stage="janusflow/3", flow={"repa_layer": 1}).to_dict()
    cfg["data"]["edit_source"] = "vq"
    with pytest.raises(ValueError, match=r"\[data\] edit_source 'vq' is for Janus models"):
        train(RunConfig.from_dict(cfg))


def test_sources_last_layout_is_trained_recorded_and_sampled(tmp_path):
    """[data] edit_layout = "sources_last": the instruction, then the understanding sources, then the target;
    the trained folder records it, januskit.load builds the same prompts, and bad values are named."""
    data = _dataset(tmp_path / "data")
    cfg = _run(tmp_path / "out", PRESET, data, 2, stage="janus-pro/3").to_dict()
    cfg["data"]["edit_layout"] = "sources_last"
    out = train(RunConfig.from_dict(cfg))
    assert json.loads((out / "generation_config.json").read_text())["edit_layout"] == "sources_last"
    pipe = januskit.load(out)
    proc, tok = pipe.processor, pipe.processor.tokenizer
    assert proc.edit_sources_last and proc.edit_source == "understanding"
    ids = proc.edit_prompt(INSTRUCTION, 1)
    first = januskit.load(PRESET, seed=0).processor.edit_prompt(INSTRUCTION, 1)
    assert ids != first and ids.count(tok.image_id) == first.count(tok.image_id) == proc.n_image_tokens
    assert first.index(tok.boi_id) < ids.index(tok.boi_id)  # by default the source comes first
    boi = ids.index(tok.boi_id)
    assert INSTRUCTION in tok.decode(ids[:boi]) and INSTRUCTION not in tok.decode(ids[boi:])  # before the source
    assert ids[-1] == tok.boi_id and ids.index(tok.eoi_id) > boi
    a = pipe.edit_image(INSTRUCTION, [square("red")], n=2, seed=3)
    assert torch.equal(a.tokens, pipe.edit_image(INSTRUCTION, [square("red")], n=2, seed=3).tokens)
    assert a.info["prompt_tokens"] == len(ids)
    (out / "generation_config.json").write_text(json.dumps({"edit_layout": "middle"}))
    with pytest.raises(Exception, match=r"generation_config.json: edit_layout must be one of sources_first, sources_last"):
        januskit.load(out)
    cfg["data"]["edit_layout"] = "middle"
    cfg["train"]["out"] = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"\[data\] edit_layout must be one of sources_first, sources_last, got 'middle'"):
        train(RunConfig.from_dict(cfg))
