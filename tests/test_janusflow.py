"""JanusFlow: official layout (keys, config.json), strict loading, the ShallowUViT modules against the
spec's formulas, the understanding splice, and the rectified-flow sampler (prompt-KV reuse equals the
reference's full recompute)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import januskit
from januskit.checkpoint.init import init_checkpoint, random_model
from januskit.checkpoint.io import CheckpointError
from januskit.checkpoint.official import (load_official, load_official_with_extras, official_key_order, save_janus,
                                          unused_official_shapes)
from januskit.config import ConfigError, preset
from januskit.checkpoint.official_config import detect_arch, flow_from_official, to_official
from januskit.models.janusflow import JanusFlowModel
from januskit.models.uvit import ConvNextBlock, GlobalResponseNorm, timestep_sinusoid
from januskit.sampling.flow import flow_rows, generate_latents

ASSETS = Path(__file__).parent / "assets"
TINY = "tiny-janusflow"


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("jf") / "ckpt", arch="janusflow", seed=0)


@pytest.fixture(scope="module")
def pipe(flow_ckpt):
    return januskit.load(flow_ckpt)


# -- layout ------------------------------------------------------------------------------------------

def test_real_size_layout_matches_reference():
    """Keys, order and shapes of an official JanusFlow-1.3B checkpoint (meta device) equal the dump of
    the official classes (tests/assets/janusflow-1.3b.keys.tsv, from the reference material)."""
    rows = [line.split("\t") for line in (ASSETS / "janusflow-1.3b.keys.tsv").read_text().splitlines() if line]
    want = [(k, tuple(int(x) for x in s.strip("()").split(",") if x.strip())) for k, s in rows]
    c = preset("janusflow-1.3b")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in JanusFlowModel(c).state_dict().items()}
    shapes.update(unused_official_shapes(c))
    got = [(k, shapes[k]) for k in official_key_order(c)]
    assert len(got) == len(want) == 587
    assert got == want
    n = {p: sum(math.prod(s) for k, s in got if k.startswith(p)) for p in ("vision_gen_enc_model.", "vision_gen_dec_model.")}
    assert round(n["vision_gen_enc_model."] / 1e6, 2) == 21.61 and round(n["vision_gen_dec_model."] / 1e6, 2) == 50.56


@pytest.mark.parametrize("name", ["janusflow-1.3b", TINY, "mini-janusflow"])
def test_config_round_trip(name):
    c = preset(name)
    d = to_official(c)
    assert detect_arch(d) == "janusflow"
    assert flow_from_official(json.loads(json.dumps(d))) == c
    if name == "janusflow-1.3b":  # the official file's values (spec section 8.1)
        ep, dp = d["vision_gen_enc_config"]["params"], d["vision_gen_dec_config"]["params"]
        assert (ep["input_channels"], ep["block_out_channels"], ep["kernel_size"], ep["stride"], ep["padding"],
                ep["hidden_size"]) == (4, [768], 2, 2, 0, 2048)
        assert "latent_size" not in ep
        assert (dp["in_channels"], dp["out_channels"], dp["upsamples"], dp["hidden_size"]) == (768, 4, 1, 2048)


def test_config_errors_name_the_field():
    d = to_official(preset(TINY))
    bad = json.loads(json.dumps(d))
    bad["vision_gen_dec_config"]["params"]["block_out_channels"] = [48]
    with pytest.raises(ConfigError, match=r"x\.json: vision_gen_dec_config\.params\.block_out_channels\[-1\] = 48 "
                                          r"does not match the encoder width .* 32"):
        flow_from_official(bad, "x.json")
    bad = json.loads(json.dumps(d))
    bad["vision_gen_enc_config"]["cls"] = "Something"
    with pytest.raises(ConfigError, match=r"vision_gen_enc_config\.cls 'Something' is not ShallowUViTEncoder"):
        flow_from_official(bad)
    bad = json.loads(json.dumps(d))
    bad["vision_gen_enc_config"]["params"]["hidden_size"] = 128
    with pytest.raises(ConfigError, match=r"vision_gen_enc_config\.params\.hidden_size = 128 does not match the LLM"):
        flow_from_official(bad)
    bad = json.loads(json.dumps(d))
    del bad["vision_gen_dec_config"]
    with pytest.raises(ConfigError, match="missing field 'vision_gen_dec_config'"):
        flow_from_official(bad)


def test_init_writes_official_layout_and_loads_strictly(flow_ckpt, tmp_path):
    sd = load_file(str(flow_ckpt / "model.safetensors"))
    c = preset(TINY)
    assert sorted(sd) == sorted(official_key_order(c))  # the reference's keys, attn_pool included
    assert not any("codebook_used" in k for k in sd)
    model, extras = load_official_with_extras(flow_ckpt)
    assert isinstance(model, JanusFlowModel)
    ref = random_model(c, seed=0)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # load -> save rewrites the same tensors (unused attn_pool entries included)
    back = save_janus(model, tmp_path / "back", copy_from=flow_ckpt, extras=extras)
    again = load_file(str(back / "model.safetensors"))
    assert list(again) == list(sd)
    for k in sd:
        assert torch.equal(again[k], sd[k]), k


def test_missing_and_unexpected_keys_are_named(flow_ckpt, tmp_path):
    import shutil

    dst = tmp_path / "broken"
    shutil.copytree(flow_ckpt, dst)
    sd = load_file(str(dst / "model.safetensors"))
    del sd["vision_gen_dec_model.out_convs.0.unpatch_conv.bias"]
    sd["vision_gen_dec_model.extra"] = torch.zeros(1)
    save_file(sd, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_official(dst)
    assert "vision_gen_dec_model.out_convs.0.unpatch_conv.bias" in str(e.value)
    assert "vision_gen_dec_model.extra" in str(e.value)


def test_cli_init_and_generate_latents_need_a_vae(tmp_path):
    out = subprocess.run([sys.executable, "-m", "januskit.cli", "init", str(tmp_path / "m"), "--arch", "janusflow"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "januskit.cli", "init", str(tmp_path / "x"), "--arch", "janusflow",
                          "--preset", "tiny-janus"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "preset 'tiny-janus' is a janus model, not janusflow" in bad.stderr
    assert not (tmp_path / "x").exists()


# -- modules against the spec's formulas ----------------------------------------------------------------

def test_timestep_embedding_matches_diffusers():
    from conftest import need

    emb = need("diffusers.models.embeddings", "flow")
    t = torch.tensor([0.0, 1.0, 333.3, 999.0])
    ref = emb.Timesteps(24, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    torch.testing.assert_close(timestep_sinusoid(t, 24), ref, rtol=0, atol=1e-6)
    # [cos | sin] ordering: at t = 0 the first half is 1 and the second 0
    assert torch.equal(timestep_sinusoid(torch.zeros(1), 8), torch.tensor([[1.0] * 4 + [0.0] * 4]))


def test_grn_and_convnext_block_follow_the_spec():
    g = torch.Generator().manual_seed(0)
    C, D = 8, 16
    blk = ConvNextBlock(C, D, eps=1e-6)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x, cond = torch.randn(2, C, 5, 5, generator=g), torch.randn(2, D, generator=g)
    # the spec, written out: depthwise 7x7 -> NHWC -> RMSNorm -> Linear -> GELU -> GRN -> Linear -> residual
    # -> x * (1 + scale) + shift with (scale, shift) = split(Linear(SiLU(cond)))
    h = F.conv2d(x, blk.depthwise.weight, blk.depthwise.bias, padding=3, groups=C).permute(0, 2, 3, 1)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * blk.norm.weight
    h = F.gelu(h @ blk.channelwise_linear_1.weight.T + blk.channelwise_linear_1.bias)
    gx = h.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(-1, keepdim=True) + 1e-6)
    h = blk.channelwise_norm.bias + (blk.channelwise_norm.weight * nx + 1) * h
    h = h @ blk.channelwise_linear_2.weight.T + blk.channelwise_linear_2.bias
    y = x + h.permute(0, 3, 1, 2)
    ss = F.silu(cond) @ blk.cond_embeds_mapper.weight.T + blk.cond_embeds_mapper.bias
    scale, shift = ss[:, :C], ss[:, C:]
    want = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    torch.testing.assert_close(blk(x, cond), want, rtol=1e-5, atol=1e-5)
    # a fresh GRN (zeros) is the identity
    assert torch.equal(GlobalResponseNorm(4)(h[..., :4]), h[..., :4])


def test_encoder_decoder_shapes_and_skip(pipe):
    m, c = pipe.model, pipe.config
    z = torch.randn(3, *c.latent_shape)
    x, skip, t_emb = m.gen_inputs(z, torch.tensor([0.0, 0.5, 1.0]))
    assert x.shape == (3, 1 + c.n_gen_tokens, c.llm.dim) and skip.shape == (3, c.gen_enc.width, c.grid, c.grid)
    assert t_emb.shape == (3, c.llm.dim)
    assert torch.equal(x[:, 0], t_emb)  # the timestep token comes first
    # grid tokens are the encoder grid in raster order through the aligner
    torch.testing.assert_close(x[:, 1 + 5], m.vision_gen_enc_aligner(skip[:, :, 0, 5]), rtol=0, atol=1e-5)
    v = m.velocity(torch.randn(3, c.n_gen_tokens, c.llm.dim), skip, t_emb)
    assert v.shape == (3, *c.latent_shape)
    # the encoder's time input is t on the 0..1000 scale
    _, t1000 = m.vision_gen_enc_model(z, torch.tensor([0.0, 500.0, 1000.0]))
    torch.testing.assert_close(t_emb, t1000, rtol=0, atol=0)


# -- understanding -------------------------------------------------------------------------------------

def test_understanding_splice_puts_beg_of_und_embed_at_begin_of_image(pipe):
    m, proc = pipe.model, pipe.processor
    with torch.no_grad():
        m.beg_of_und_embed.copy_(torch.randn(1, pipe.config.llm.dim))
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    enc = proc.encode_chat(proc.user_turn("what colour?", [img]))
    b = proc.batch([enc])
    with torch.no_grad():
        h = m.splice(b.input_ids, b.image_mask, b.pixel_values)
        feats = m.vision_und_enc_aligner(m.vision_und_enc_model(b.pixel_values))[0]
        text = m.text_embeds(b.input_ids)[0]
    ids = b.input_ids[0]
    tok = proc.tokenizer
    boi = int((ids == tok.boi_id).nonzero()[0])
    n = pipe.config.vision.n_tokens
    assert bool((ids[boi + 1:boi + 1 + n] == tok.image_id).all()) and int(ids[boi + 1 + n]) == tok.eoi_id
    torch.testing.assert_close(h[0, boi], m.beg_of_und_embed[0])
    torch.testing.assert_close(h[0, boi + 1:boi + 1 + n], feats)
    torch.testing.assert_close(h[0, boi + 1 + n], text[boi + 1 + n])  # <end_of_image> stays a text token
    torch.testing.assert_close(h[0, :boi], text[:boi])
    assert pipe.chat("what colour?", images=[img], max_new_tokens=3) == pipe.chat("what colour?", images=[img],
                                                                                  max_new_tokens=3)


def test_beg_of_und_embed_gets_no_gradient_through_understanding(pipe):
    m = pipe.model
    px = torch.randn(1, 3, pipe.config.vision.image_size, pipe.config.vision.image_size)
    m.image_embeds(px).sum().backward()
    assert m.beg_of_und_embed.grad is None
    assert m.vision_und_enc_aligner.weight.grad is not None
    m.zero_grad(set_to_none=True)


# -- sampler -------------------------------------------------------------------------------------------

def test_flow_rows_layout():
    ids, valid, pos = flow_rows([[1, 5, 6, 9], [1, 7, 9]])  # 9 = <begin_of_image>, dropped
    assert ids.tolist() == [[1, 5, 6], [0, 1, 7], [1, 5, 6], [0, 1, 7]]
    assert valid.tolist() == [[True] * 3, [False, True, True], [True, False, False], [False, True, False]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 1], [0, 1, 2], [0, 0, 1]]


@pytest.mark.parametrize("cfg", [1.0, 2.0, 5.0])
def test_prompt_kv_reuse_equals_full_recompute(pipe, cfg):
    """The acceptance check of the issue: fp32, within 1e-4."""
    z0 = torch.randn(2, *pipe.config.latent_shape, generator=torch.Generator().manual_seed(3))
    a = pipe.generate_latents("a red circle above a blue square", n=2, steps=6, cfg_weight=cfg, latents=z0)
    b = pipe.generate_latents("a red circle above a blue square", n=2, steps=6, cfg_weight=cfg, latents=z0,
                              reuse_prompt_kv=False)
    assert a.shape == (2, *pipe.config.latent_shape) and a.dtype == torch.float32
    assert (a - z0).abs().max() > 0.1  # the ODE moved
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_prompts_of_different_lengths_batch_like_alone(pipe):
    proc, m = pipe.processor, pipe.model
    z0 = torch.randn(2, *pipe.config.latent_shape, generator=torch.Generator().manual_seed(4))
    p1, p2 = proc.generation_prompt("a red circle"), proc.generation_prompt("two small green triangles below a blue star")
    both = generate_latents(m, [p1, p2], z0, steps=4, cfg_weight=2.0)
    for i, p in enumerate((p1, p2)):
        alone = generate_latents(m, [p], z0[i:i + 1], steps=4, cfg_weight=2.0)
        torch.testing.assert_close(both[i], alone[0], rtol=0, atol=1e-4)


def test_cfg_and_euler_arithmetic(pipe, monkeypatch):
    """One step from z with w: z + (w * v_c - (w - 1) * v_u) / steps, the rows' velocities taken from
    the model itself."""
    m, proc = pipe.model, pipe.processor
    z0 = torch.randn(1, *pipe.config.latent_shape, generator=torch.Generator().manual_seed(5))
    seen = []
    orig = m.velocity

    def spy(*a):
        v = orig(*a)
        seen.append(v.detach().clone())
        return v

    monkeypatch.setattr(m, "velocity", spy)
    out = generate_latents(m, [proc.generation_prompt("a star")], z0, steps=1, cfg_weight=3.0)
    v = seen[0]
    torch.testing.assert_close(out, z0 + (3.0 * v[:1] - 2.0 * v[1:]) / 1, rtol=0, atol=1e-6)
    assert not torch.allclose(v[0], v[1])  # the unconditional row differs: the prompt is masked there


def test_latents_replay_and_seeds(pipe):
    c = pipe.config
    a = pipe.generate_latents("a blue square", n=2, steps=3, seed=7)
    b = pipe.generate_latents("a blue square", n=2, steps=3, seed=7)
    assert torch.equal(a, b)
    # image i depends only on (seed, i): the same noise given explicitly replays it
    from januskit.sampling.flow import initial_latents
    from januskit.sampling.logits import row_generator

    z0 = initial_latents(c.latent_shape, [row_generator(7, i) for i in range(2)])
    torch.testing.assert_close(pipe.generate_latents("a blue square", n=2, steps=3, latents=z0), a, rtol=0, atol=0)
    assert not torch.allclose(pipe.generate_latents("a blue square", n=2, steps=3, seed=8), a)


def test_sampler_errors(pipe):
    with pytest.raises(ValueError, match=r"latents: expected shape \(2, 4, 16, 16\) for n=2, got \(2, 4, 8, 8\)"):
        pipe.generate_latents("x", n=2, latents=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        pipe.generate_latents("x", steps=0)
    with pytest.raises(ValueError, match="cfg_weight must be a finite number"):
        pipe.generate_latents("x", cfg_weight=float("nan"))
    with pytest.raises(ValueError, match="n must be >= 1"):
        pipe.generate_latents("x", n=0)


def test_generate_images_decodes_with_the_vae(pipe, flow_ckpt, tmp_path):
    res = pipe.generate_images("a red circle", n=2, steps=2, seed=1)
    assert [im.size for im in res.images] == [(128, 128)] * 2 and res.latents.shape == (2, 4, 16, 16)
    from januskit.processing.image import to_uint8

    assert (np.asarray(res.images[1]) == to_uint8(pipe.vae.decode(res.latents[1:]))[0]).all()
    assert np.asarray(res.images[1]).std() > 0
    # without a VAE: latents only, and a clear error for images
    bare = init_checkpoint(tmp_path / "bare", arch="janusflow", seed=0, vae=False)
    assert not (bare / "vae").exists()
    p = januskit.load(bare)
    assert p.vae is None
    torch.testing.assert_close(p.generate_latents("a red circle", n=2, steps=2, seed=1), res.latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"JanusFlow decodes its latents with a VAE, and none is loaded: pass vae=DIR"):
        p.generate_images("x", steps=1)
    # vae= names one explicitly
    q = januskit.load(bare, vae=flow_ckpt / "vae")
    assert q.generate_images("a red circle", n=2, steps=2, seed=1).images[1].tobytes() == res.images[1].tobytes()
    with pytest.raises(ValueError, match="vae= is for JanusFlow checkpoints"):
        januskit.load(init_checkpoint(tmp_path / "janus", seed=0), vae=flow_ckpt / "vae")


def test_generate_batch_is_the_janus_signature_and_rows_equal_alone(pipe):
    """One generate_batch for both architectures: per-row seeds and CFG weights, each row as its prompt
    alone (latents within float noise of a lone run); Janus's options are refused by name."""
    import inspect

    from januskit.pipelines.janus import JanusPipeline
    from januskit.sampling.logits import row_generator

    assert inspect.signature(type(pipe).generate_batch) == inspect.signature(JanusPipeline.generate_batch)
    assert inspect.signature(type(pipe).generate_images) == inspect.signature(JanusPipeline.generate_images)
    proc = pipe.processor
    rows = [("a blue square", 7, 2.0, 1), ("a red circle above a green triangle", 3, 3.5, 0)]
    calls = []
    out = pipe.generate_batch([proc.generation_prompt(p) for p, *_ in rows], generators=[row_generator(s, i) for _, s, _, i in rows],
                              cfg_weight=[w for _, _, w, _ in rows], steps=3, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)] and out.tokens is None and out.info["steps"] == 3
    for r, (p, s, w, i) in enumerate(rows):
        alone = pipe.generate_latents(p, n=i + 1, seed=s, cfg_weight=w, steps=3)[i]
        torch.testing.assert_close(out.latents[r], alone, rtol=0, atol=1e-4)
    assert pipe.generate_images("a star", steps=1).info["cfg_weight"] == pipe.default_cfg_weight == 2.0
    with pytest.raises(januskit.UnsupportedOption, match="temperature: JanusFlow samples no tokens"):
        pipe.generate_images("a star", temperature=0.5)
    with pytest.raises(ValueError, match="top_k: JanusFlow samples no tokens"):
        pipe.generate_batch([proc.generation_prompt("x")], generators=[row_generator(0, 0)], top_k=5)
    assert pipe.own_options(temperature=0.5, steps=30) == {"steps": 30}


def test_world_eval_runs_a_janusflow_model():
    """`januskit eval world` on a (random) mini JanusFlow with a mini VAE: the GenEval-style table, the
    judge's ceiling through the VAE, and understanding, at the reference's CFG 2."""
    import warnings

    from januskit.eval.world import EvalSettings, evaluate, format_report
    from januskit.models.vae import LatentVAE, mini_vae_config
    from reference_helpers import check_world_figures

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = januskit.load("mini-janusflow")
    pipe.vae = LatentVAE.from_config(mini_vae_config(), seed=0)
    rep = evaluate(pipe, None, EvalSettings(images_per_prompt=1, prompts_per_category=1, questions_per_type=1, steps=2))
    assert rep.settings["cfg"] == 2.0 and rep.settings["arch"] == "janusflow"
    g = rep.generation
    assert g["images"] == 6 and len(g["categories"]) == 6 and set(g["judge"]) == {"clean", "vq"}
    assert g["judge"]["clean"]["overall"] == 1.0  # the judge reads the rendered scenes perfectly
    check_world_figures(g, rep.understanding)
    assert rep.understanding["questions"] == len(rep.understanding["records"]) == 6
    # Pinned (this run's values): random weights draw no recognisable scene and answer with gibberish.
    assert g["overall"] == 0.0 and rep.understanding["accuracy"] == 0.0
    text = format_report(rep)
    assert "cfg 2.0, 2 Euler steps" in text and "through the VAE" in text
