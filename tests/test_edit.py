"""Image-to-image sampling: the edit prompt, the three guidance rows and their combination (checked against
the rows run one at a time), seeds, and the training-free paths (Janus variations, JanusFlow img2img), each
reducing to text-to-image at strength 1."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import januskit
from januskit.checkpoint.init import init_checkpoint
from januskit.processing.edit import ROWS, EditInputs, dropped_positions, guide
from januskit.processing.tokenizer import IMAGE_TOKEN
from januskit.sampling import flow as flow_mod
from januskit.sampling import image_ar
from januskit.sampling.image_ar import cfg_rows, edit_rows, generate_image_tokens
from januskit.world.render import render
from januskit.world.scene import random_scene


@pytest.fixture(scope="module")
def janus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return januskit.load("tiny-janus-pro", dtype="float32")


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    return januskit.load(init_checkpoint(tmp_path_factory.mktemp("jf") / "ckpt", arch="janusflow", seed=0))


def _src(seed: int = 0):
    return render(random_scene(np.random.default_rng(seed)))


def _edit_inputs(pipe, prompts_sources, cfg_image=1.5):
    tok = pipe.processor.tokenizer
    return EditInputs([torch.stack([pipe.processor.transform(im) for im in s]) for s in prompts_sources], cfg_image,
                      tok.image_id, tok.boi_id, tok.eoi_id)


def test_edit_prompt_holds_the_sources_as_a_chat_does(janus):
    proc, tok = janus.processor, janus.processor.tokenizer
    ids = proc.edit_prompt("make the circle blue", 2)
    chat = proc.encode_chat(proc.user_turn("make the circle blue", [_src(0), _src(1)]), system_prompt="").ids
    assert ids == chat + [tok.boi_id]  # the chat's user turn and "Assistant:", then <begin_of_image>
    assert ids.count(tok.image_id) == 2 * proc.n_image_tokens and ids[0] == tok.bos_id
    with pytest.raises(ValueError, match="at least one source image"):
        proc.edit_prompt("x", 0)
    with pytest.raises(ValueError, match=f"must not contain {IMAGE_TOKEN}"):
        proc.edit_prompt(f"{IMAGE_TOKEN} x", 1)


def test_dropped_positions_by_hand():
    I, B, E = 9, 7, 8  # image slot, <begin_of_image>, <end_of_image>; 1 = BOS, others text
    ids = [1, 3, B, I, I, E, 4, 5, B]
    kw = dict(image_id=I, boi_id=B, eoi_id=E)
    keep = {name: dropped_positions(ids, **kw, keep_text=t, keep_image=i).tolist() for name, (t, i) in ROWS.items()}
    assert keep["full"] == [False] * 9
    assert keep["image"] == [False, True, False, False, False, False, True, True, False]
    assert keep["none"] == [False] + [True] * 7 + [False]
    assert guide(torch.tensor(5.0), torch.tensor(3.0), torch.tensor(1.0), torch.tensor(2.0), torch.tensor(1.5)) == \
        1 + 1.5 * (3 - 1) + 2 * (5 - 3)


def test_edit_rows_unconditional_row_is_text_to_image_s(janus):
    proc, pad = janus.processor, janus.processor.pad_id
    a, b = proc.edit_prompt("make it blue", 1), proc.edit_prompt("swap the two shapes", 1)
    e = _edit_inputs(janus, [[_src()], [_src()]])
    ids, valid = edit_rows([a, b], pad, e)
    L = max(len(a), len(b))
    assert ids.shape == (6, L) and valid.shape == (6, L)
    assert ids[1, L - len(b):].tolist() == b  # full row
    img_row = ids[3, L - len(b):]  # image-only: the image block kept, the instruction gone
    assert (img_row == proc.tokenizer.image_id).sum() == proc.n_image_tokens
    assert img_row.tolist() == torch.where(dropped_positions(b, image_id=e.image_id, boi_id=e.boi_id, eoi_id=e.eoi_id,
                                                             keep_text=False, keep_image=True), pad,
                                           torch.tensor(b)).tolist()
    t2i_uncond = cfg_rows([b], pad)[0][1]
    assert ids[5, L - len(b):].tolist() == t2i_uncond.tolist()  # both dropped: text-to-image's unconditional row


def _captured_first_logits(monkeypatch, run):
    seen = []
    real = image_ar.sample

    def spy(logits, *a, **k):
        seen.append(logits.clone())
        return real(logits, *a, **k)
    monkeypatch.setattr(image_ar, "sample", spy)
    run()
    return seen[0]


def test_janus_edit_guidance_equals_the_three_rows_run_alone(janus, monkeypatch):
    m, proc = janus.model, janus.processor
    p = proc.edit_prompt("make the circle blue", 1)
    e = _edit_inputs(janus, [[_src()]], cfg_image=1.7)
    got = _captured_first_logits(monkeypatch, lambda: generate_image_tokens(
        m, [p], pad_id=proc.pad_id, cfg_weight=3.0, edit=e, generators=[torch.Generator().manual_seed(0)]))
    ids, _ = edit_rows([p], proc.pad_id, e)
    rows = []
    with torch.inference_mode():
        for r in range(3):  # each row alone, through the model's own splice
            row = ids[r:r + 1]
            slots = row == e.image_id
            h = m.splice(row, slots, e.sources[0] if bool(slots.any()) else None)
            pos = torch.arange(row.shape[1])[None]
            rows.append(m.image_logits(m.llm(h, pos, None, 0, None)[:, -1]).float())
    want = rows[2] + 1.7 * (rows[1] - rows[2]) + 3.0 * (rows[0] - rows[1])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(rows[0], rows[1])  # the instruction matters to the full row


def test_janus_edit_image_seeds_and_independence_of_n(janus):
    a = janus.edit_image("make the circle blue", [_src()], n=2, seed=3)
    b = janus.edit_image("make the circle blue", _src(), n=3, seed=3)
    c = janus.edit_image("make the circle blue", [_src()], n=2, seed=4)
    assert a.tokens.shape == (2, janus.config.vq.n_tokens) and a.images[0].size == (janus.image_size,) * 2
    assert torch.equal(a.tokens, b.tokens[:2]) and not torch.equal(a.tokens, c.tokens)
    assert a.info["cfg_image"] == 1.5 and a.info["cfg_weight"] == janus.default_cfg_weight
    two = janus.edit_image("put them side by side", [_src(0), _src(1)], n=1, seed=3)  # two sources
    assert two.tokens.shape == (1, janus.config.vq.n_tokens)
    small = janus.edit_image("make the circle blue", [_src()], n=2, seed=3, memory_budget_gb=0)  # 1 image a chunk
    assert torch.equal(small.tokens, a.tokens)


def test_edit_errors_name_the_problem(janus):
    with pytest.raises(ValueError, match="at least one source image"):
        janus.edit_image("x", [])
    ids = janus.processor.edit_prompt("x", 2)
    g = [torch.Generator()]
    with pytest.raises(ValueError, match=r"prompt 0: 2 image block\(s\) but 1 source image\(s\)"):
        janus.generate_batch([ids], generators=g, sources=[[_src()]])
    with pytest.raises(ValueError, match="cfg_image guides towards source images"):
        janus.generate_batch([janus.processor.generation_prompt("x")], generators=g, cfg_image=2.0)
    with pytest.raises(ValueError, match="speculative decoding samples text-to-image only"):
        janus.edit_image("x", [_src()], speculative="sjd")
    with pytest.raises(ValueError, match="cfg_weight must be a finite number"):
        janus.edit_image("x", [_src()], cfg_image=float("nan"))
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
        janus.image_to_image("x", _src(), strength=0)


def test_janus_variations_keep_the_sources_top_rows_and_strength_one_is_text_to_image(janus):
    src = _src(2)
    v = janus.image_to_image("a red circle", src, strength=0.5, n=2, seed=1)
    side = int(janus.config.vq.n_tokens ** 0.5)
    keep = round(0.5 * side) * side
    assert v.info["kept_tokens"] == keep
    want = janus.encode_image_tokens(src)[0, :keep]
    assert torch.equal(v.tokens[:, :keep], want.expand(2, keep))
    assert not torch.equal(v.tokens[0, keep:], v.tokens[1, keep:])  # the rest is sampled, per image
    t2i = janus.generate_images("a red circle", n=2, seed=1)
    assert torch.equal(janus.image_to_image("a red circle", src, strength=1.0, n=2, seed=1).tokens, t2i.tokens)


def test_janusflow_edit_guidance_equals_the_three_rows_run_alone(flow):
    m, proc = flow.model, flow.processor
    p = proc.edit_prompt("make the circle blue", 1)
    e = _edit_inputs(flow, [[_src()]], cfg_image=1.7)
    z0 = torch.randn(1, *flow.config.latent_shape, generator=torch.Generator().manual_seed(0))
    seen = []

    def update(z, v, s, steps):
        seen.append(v.clone())
        return z + v / steps
    for reuse in (True, False):
        flow_mod.generate_latents(m, [p], z0, steps=1, cfg_weight=3.0, edit=e, pad_id=proc.pad_id, update=update,
                                  reuse_prompt_kv=reuse)
    ids, valid, positions = flow_mod.edit_flow_rows([p], proc.pad_id, e)
    assert valid[0].all() and not valid[2, 1:].any() and valid[2, 0]  # the unconditional row: only BOS seen
    assert int((ids[2] == e.image_id).sum()) == 0 and int((ids[1] == e.image_id).sum()) == proc.n_image_tokens
    v = []
    with torch.inference_mode():
        for r in range(3):
            row = ids[r:r + 1]
            slots = row == e.image_id
            h = m.splice(row, slots, e.sources[0] if bool(slots.any()) else None)
            v.append(flow_mod.row_velocities(m, h, positions[r:r + 1], valid[r:r + 1], z0, torch.zeros(1)))
    want = v[2] + 1.7 * (v[1] - v[2]) + 3.0 * (v[0] - v[1])
    for got in seen:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_janusflow_edit_and_img2img(flow):
    a = flow.edit_image("make the circle blue", [_src()], n=2, seed=3, steps=3)
    b = flow.edit_image("make the circle blue", [_src()], n=2, seed=3, steps=3)
    assert a.latents.shape == (2, *flow.config.latent_shape) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents[0], a.latents[1])
    calls = []
    r = flow.image_to_image("a red circle", _src(), strength=0.4, n=2, seed=1, steps=10,
                            progress=lambda d, t: calls.append((d, t)))
    assert r.info["start_step"] == 6 and calls[-1] == (4, 4) and r.images[0].size == (flow.image_size,) * 2
    t2i = flow.generate_images("a red circle", n=2, seed=1, steps=4)
    full = flow.image_to_image("a red circle", _src(), strength=1.0, n=2, seed=1, steps=4)
    assert full.info["start_step"] == 0 and torch.equal(full.latents, t2i.latents)
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
        flow.image_to_image("x", _src(), strength=1.5)


# -- the released models' shapes, random weights (one LLM layer: the rest of the model at full size) --------

def _real(name: str):
    import dataclasses

    from januskit.checkpoint.init import random_model, synthetic_tokenizer
    from januskit.config import preset
    from januskit.processing.chat import Processor
    from januskit.processing.image import ImageTransform

    c = preset(name)
    c = dataclasses.replace(c, llm=dataclasses.replace(c.llm, n_layers=1))
    proc = Processor(synthetic_tokenizer(name, c), ImageTransform(size=c.vision.image_size), c.vision.n_tokens)
    return random_model(c, 0, torch.bfloat16), proc


def _first_llm_input(model, run):
    shapes = []
    hook = model.llm.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    try:
        out = run()
    finally:
        hook.remove()
    return shapes[0], out


def test_janus_pro_1b_edit_at_real_shapes():
    from januskit.pipelines.janus import JanusPipeline

    model, proc = _real("janus-pro-1b")
    pipe = JanusPipeline(model, proc, "janus-pro-1b (random)")
    src = _src()
    prompt = proc.edit_prompt("make the circle blue", 1)
    assert prompt.count(proc.tokenizer.image_id) == 576  # SigLIP-L at 384 px: 24 x 24 features
    shape, two = _first_llm_input(model, lambda: pipe.edit_image("make the circle blue", [src], n=2, seed=0))
    assert shape == (6, len(prompt), 2048)  # 2 images x [full, image-only, unconditional] rows, 2048 wide
    assert two.tokens.shape == (2, 576) and two.images[0].size == (384, 384)
    one = pipe.edit_image("make the circle blue", [src], n=1, seed=0)
    assert torch.equal(one.tokens[0], two.tokens[0]) and not torch.equal(two.tokens[0], two.tokens[1])


def test_janusflow_1_3b_edit_at_real_shapes():
    model, proc = _real("janusflow-1.3b")
    prompt = proc.edit_prompt("make the circle blue", 1)
    tok = proc.tokenizer
    e = EditInputs([proc.transform(_src())[None]], 1.5, tok.image_id, tok.boi_id, tok.eoi_id)
    c = model.config
    z0 = torch.randn(2, *c.latent_shape, generator=torch.Generator().manual_seed(0))
    assert tuple(c.latent_shape) == (4, 48, 48)  # SDXL-VAE latents of a 384-px image

    def run():
        return flow_mod.generate_latents(model, [prompt] * 2, z0, steps=2, cfg_weight=2.0, edit=EditInputs(
            [e.sources[0]] * 2, 1.5, e.image_id, e.boi_id, e.eoi_id), pad_id=proc.pad_id)
    shape, z = _first_llm_input(model, run)
    assert shape == (6, len(prompt) - 1, 2048)  # the prompt without its <begin_of_image> (the timestep's slot)
    assert z.shape == (2, 4, 48, 48) and torch.isfinite(z).all()
    torch.testing.assert_close(run(), z, atol=0, rtol=0)
