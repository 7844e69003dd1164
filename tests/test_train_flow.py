"""JanusFlow training: the sample layout (and its CFG dropout) equals what the sampler runs, the
rectified-flow and REPA losses and their gradients, the stage presets, and a run on a JSONL dataset
that resumes bit-identically and exports a generation-ready folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import januskit
from januskit.checkpoint.init import init_checkpoint
from januskit.cli import main
from januskit.train.data.records import Sample
from januskit.train.data.encode import SampleEncoder, fill_latents
from januskit.train.flow import FlowSettings, flow_inputs, flow_loss_sums, noise_and_t
from januskit.train.losses import LossForward, batch_loss, batch_losses
from januskit.train.data.packing import flow_starts, pack, split_rows, unpacked
from januskit.train.stages import apply_stage, get_stage
from januskit.sampling.flow import flow_rows, row_velocities

from test_train_e2e import _config as e2e_config
from test_train_e2e import _dataset


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("jft") / "base", arch="janusflow", seed=0)


def _model(ckpt: Path, **settings):
    """The pipeline and the training loss around its model (the loss holds the settings and h_phi)."""
    pipe = januskit.load(ckpt)
    return pipe, LossForward(pipe.model, FlowSettings(**{"repa_layer": 1, **settings}), seed=0)


def _encode(pipe, caption: str, *, dropped: bool, key: str = "gen.jsonl:0", colour=(200, 40, 40), repa: bool = True):
    from PIL import Image

    enc = SampleEncoder.for_model(pipe.model, pipe.processor, repa=repa, cfg_drop=1.0 if dropped else 0.0, seed=3)
    s = enc(Sample(kind="generation", key=key, caption=caption, images=[Image.new("RGB", (128, 128), colour)]))
    fill_latents([s], lambda px: pipe.vae.encode(px), pipe.config.latent_shape)
    return s


# -- layout ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropped", [False, True])
def test_training_velocity_equals_the_samplers_row(ckpt, dropped):
    """A generation sample's training forward computes exactly the velocity the sampler computes for
    its conditional row, and a CFG-dropped sample exactly the unconditional row's."""
    pipe, loss = _model(ckpt)
    m, proc = pipe.model, pipe.processor
    s = _encode(pipe, "a red circle above a blue square", dropped=dropped)
    prompt = proc.generation_prompt("a red circle above a blue square")
    P = len(prompt) - 1
    assert s.ids[:P].tolist() == (prompt[:-1] if not dropped else [prompt[0]] + [proc.pad_id] * (P - 1))
    assert s.flow_mask.tolist() == [False] * P + [True] * (1 + pipe.config.n_gen_tokens)
    assert s.hidden.tolist() == [False] + [dropped] * (P - 1) + [False] * (1 + pipe.config.n_gen_tokens)
    batch = pack([s], 256, pad_id=proc.pad_id)
    assert batch.doc_ids[0, 1:P].tolist() == [-1 if dropped else 0] * (P - 1)  # hidden = seen by no slot
    with torch.no_grad():
        inputs, skip, t_emb, _ = flow_inputs(m, batch.flow_latents, batch.flow_seeds, loss.flow)
        h = m.splice(batch.input_ids, batch.und_mask, None).masked_scatter(batch.flow_mask[..., None],
                                                                            inputs.reshape(-1, inputs.shape[-1]))
        hidden, _ = m.llm.forward_packed(h, batch.positions, batch.doc_ids)
        grid = batch.flow_mask & ~flow_starts(batch.flow_mask)
        v_train = m.velocity(hidden[grid].view(1, -1, hidden.shape[-1]), skip, t_emb)
        noise, t = noise_and_t(batch.flow_seeds, pipe.config.latent_shape, loss.flow)
        z_t = t * batch.flow_latents + (1 - t) * noise
        ids, valid, pos = flow_rows([prompt])
        v_rows = row_velocities(m, m.llm.embed_tokens(ids), pos, valid, torch.cat([z_t, z_t]), torch.cat([t, t]))
    torch.testing.assert_close(v_train[0], v_rows[1 if dropped else 0], rtol=0, atol=2e-5)
    assert not torch.allclose(v_rows[0], v_rows[1], atol=1e-3)


def test_noise_and_t_are_per_sample_logit_normal():
    s = FlowSettings(t_mean=0.5, t_std=0.8)
    seeds = torch.arange(4000) * 7919
    noise, t = noise_and_t(seeds, (2, 3, 3), s)
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 0.5) < 0.05 and abs(float(logit.std()) - 0.8) < 0.05
    assert abs(float(noise.std()) - 1) < 0.02
    n1, t1 = noise_and_t(seeds[10:12], (2, 3, 3), s)  # a sample's draw depends on its seed alone
    assert torch.equal(n1, noise[10:12]) and torch.equal(t1, t[10:12])
    with pytest.raises(ValueError, match="t_std must be > 0"):
        FlowSettings(t_std=0)
    with pytest.raises(ValueError, match="repa_layer is 1-based"):
        FlowSettings(repa_layer=0)


# -- losses ---------------------------------------------------------------------------------------------

def _flow_batch(pipe, loss, n=2, dropped=False, context=256):
    caps = ["a red circle", "two blue squares", "a green star on the left"][:n]
    cols = [(200, 40, 40), (40, 40, 200), (40, 200, 40)]
    items = [_encode(pipe, c, dropped=dropped, key=f"gen.jsonl:{i}", colour=cols[i], repa=loss.repa_head is not None)
             for i, c in enumerate(caps)]
    return items, pack(items, context, pad_id=pipe.processor.pad_id)


def test_rf_loss_is_the_mse_to_x_minus_noise_at_z_t(ckpt, monkeypatch):
    pipe, loss = _model(ckpt, repa_weight=0.0)
    m = pipe.model
    assert loss.repa_head is None and not hasattr(m, "repa_head")
    _, batch = _flow_batch(pipe, loss)
    seen = {}
    orig = m.gen_inputs

    def spy(z, t):
        seen["z"], seen["t"] = z.clone(), t.clone()
        return orig(z, t)

    monkeypatch.setattr(m, "gen_inputs", spy)
    with torch.no_grad():
        mean, per = batch_loss(m, batch, loss.flow, loss.repa_head)
    noise, t = noise_and_t(batch.flow_seeds, pipe.config.latent_shape, loss.flow)
    x = batch.flow_latents
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["z"], t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise)
    # recompute the velocity independently and compare the loss
    monkeypatch.setattr(m, "gen_inputs", orig)
    with torch.no_grad():
        inputs, skip, t_emb, target = flow_inputs(m, x, batch.flow_seeds, loss.flow)
        torch.testing.assert_close(target, x - noise)
        h = m.splice(batch.input_ids, batch.und_mask, None).masked_scatter(batch.flow_mask[..., None],
                                                                            inputs.reshape(-1, inputs.shape[-1]))
        hidden, _ = m.llm.forward_packed(h, batch.positions, batch.doc_ids)
        grid = batch.flow_mask & ~flow_starts(batch.flow_mask)
        v = m.velocity(hidden[grid].view(2, -1, hidden.shape[-1]), skip, t_emb)
    want = ((v - (x - noise)) ** 2).mean().detach()
    assert per["gen"] == pytest.approx(float(want), rel=1e-5)
    assert "repa" not in per and float(mean) == pytest.approx(float(want), rel=1e-5)


def test_repa_value_and_gradients(ckpt):
    pipe, loss = _model(ckpt, repa_layer=1, repa_weight=0.5)
    m, c = pipe.model, pipe.config
    _, batch = _flow_batch(pipe, loss)
    inputs, skip, t_emb, target = flow_inputs(m, batch.flow_latents, batch.flow_seeds, loss.flow)
    h = m.splice(batch.input_ids, batch.und_mask, None).masked_scatter(batch.flow_mask[..., None],
                                                                        inputs.reshape(-1, inputs.shape[-1]))
    hidden, captured = m.llm.forward_packed(h, batch.positions, batch.doc_ids, capture_layer=1)
    grid = batch.flow_mask & ~flow_starts(batch.flow_mask)
    rf, repa = flow_loss_sums(m, hidden, captured, grid, skip, t_emb, target, batch.repa_pixels, loss.repa_head,
                              loss.flow.repa_weight)
    assert rf.requires_grad and rf.shape == repa.shape == (2,)  # per sample
    repa = repa.sum()
    # the value: 0.5 * sum over positions of (1 - cos(h_phi(layer-1 output), SigLIP(clean image)))
    with torch.no_grad():
        feats = m.vision_und_enc_model(batch.repa_pixels)
        pred = loss.repa_head(captured[grid].view(2, c.n_gen_tokens, -1))
        want = 0.5 * (1 - torch.nn.functional.cosine_similarity(pred, feats, dim=-1)).sum()
    assert float(repa.detach()) == pytest.approx(float(want), rel=1e-5)
    # REPA's target pixels are the generated crop, as the understanding encoder normalises it
    assert batch.repa_pixels.shape == (2, 3, c.vision.image_size, c.vision.image_size)
    torch.testing.assert_close(batch.repa_pixels[0, :, 0, 0], torch.tensor([200, 40, 40]) / 127.5 - 1, atol=0.01, rtol=0)
    loss.zero_grad(set_to_none=True)
    repa.backward()
    g = {n.removeprefix("model."): p.grad for n, p in loss.named_parameters()}
    assert g["repa_head.layers.0.weight"].abs().sum() > 0
    assert g["language_model.model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0  # layers up to k
    assert g["vision_gen_enc_model.in_conv.weight"].abs().sum() > 0  # through the grid tokens
    assert g["language_model.model.layers.1.self_attn.q_proj.weight"] is None  # after layer k: untouched
    assert g["vision_gen_dec_model.out_convs.0.unpatch_conv.weight"] is None
    assert all(g[n] is None for n in g if n.startswith("vision_und_enc_model."))  # stop-gradient target
    loss.zero_grad(set_to_none=True)


def test_split_rows_and_packing_keep_the_flow_loss(ckpt):
    pipe, loss = _model(ckpt)
    items, batch = _flow_batch(pipe, loss, n=3, context=100)  # one sample per row
    with torch.no_grad():
        whole = batch_losses(pipe.model, batch, loss.flow, loss.repa_head)
        parts = [batch_losses(pipe.model, b, loss.flow, loss.repa_head)
                 for b in split_rows(batch, 1, pipe.config.vision.n_tokens)]
        alone = batch_losses(pipe.model, unpacked(items, pad_id=pipe.processor.pad_id), loss.flow, loss.repa_head)
    assert batch.input_ids.shape[0] == 3 and all(b.n_flow == 1 for b in split_rows(batch, 1, 64))
    for other in (sum(p.by_kind for p in parts), alone.by_kind):
        torch.testing.assert_close(other, whole.by_kind, rtol=1e-5, atol=1e-5)
    assert int(whole.count[2]) == 3 * pipe.config.n_gen_tokens


def test_flow_stages_follow_the_paper_table():
    s1, s2, s3 = (get_stage(f"janusflow/{i}") for i in (1, 2, 3))
    assert [(s.lr, s.warmup, s.steps, s.batch_size) for s in (s1, s2, s3)] == [
        (1e-4, 2000, 10_000, 512), (1e-4, 2000, 390_000, 512), (2e-5, 1000, 26_000, 256)]
    # paper order und:gen:text = 50:50:0, 14:80:6, 21:70:9 -> ours und:text:gen
    assert [s.ratio for s in (s1, s2, s3)] == [(50, 0, 50), (14, 6, 80), (21, 9, 70)]
    assert get_stage("janusflow/2-early").ratio == (30, 20, 50)
    assert all(s.schedule == "constant" and s.weight_decay == 0 and s.betas == (0.9, 0.95) for s in (s1, s2, s3))


@pytest.mark.parametrize("name", ["janusflow/1", "janusflow/2", "janusflow/3"])
def test_flow_stage_gradients_reach_exactly_the_trainable_parts(ckpt, name):
    from PIL import Image

    pipe, loss = _model(ckpt)
    m = pipe.model
    apply_stage(m, get_stage(name), extra={"repa_head": loss.repa_head})
    items, _ = _flow_batch(pipe, loss, n=2)
    enc = SampleEncoder.for_model(m, pipe.processor, repa=True)
    und = enc(Sample(kind="understanding", key="und.jsonl:0", images=[Image.new("RGB", (64, 64), (9, 9, 200))],
                     messages=[januskit.processing.chat.Message("user", "<image_placeholder>\nWhat colour?"),
                               januskit.processing.chat.Message("assistant", "Blue.")]))
    batch = pack(items + [und], 512, pad_id=pipe.processor.pad_id)
    loss.zero_grad(set_to_none=True)
    loss(batch)[0].backward()
    for n, p in loss.named_parameters():  # the model's and h_phi's
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} trains but got no gradient"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"
    loss.zero_grad(set_to_none=True)


def test_stage1_trains_only_the_new_parts(ckpt):
    pipe, loss = _model(ckpt)
    counts = apply_stage(pipe.model, get_stage("janusflow/1"), extra={"repa_head": loss.repa_head})
    assert counts["language_model"][0] == 0 and counts["vision_und_enc_model"][0] == 0
    assert counts["vision_gen_enc_model"][0] == counts["vision_gen_enc_model"][1] > 0
    assert counts["repa_head"][0] > 0 and counts["beg_of_und_embed"][0] == 0
    counts = apply_stage(januskit.load(ckpt).model, get_stage("janusflow/3"))  # no REPA head: still valid
    assert "repa_head" not in counts and counts["vision_und_enc_model"][0] > 0


# -- a run ------------------------------------------------------------------------------------------------

def _config(tmp: Path, model: Path, data: Path, steps: int, stage: str = "janusflow/3") -> Path:
    return e2e_config(tmp, model, data, steps, stage=stage, extra="[flow]\nrepa_layer = 1\n")


def test_flow_run_resumes_bit_identically_and_exports(tmp_path: Path, ckpt: Path):
    _dataset(tmp_path / "data")
    cfg = _config(tmp_path, ckpt, tmp_path / "data", steps=4)
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss_gen"] is not None and 0 <= r["loss_repa"] <= 2 for r in rows)
    exported = januskit.load(out)
    assert (out / "vae" / "config.json").is_file() and exported.vae is not None  # generation-ready
    assert len(exported.generate_images("a red square", steps=2).images) == 1
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("repa_head") for k in f.keys())
    # h_phi belongs to the loss, yet checkpoints keep it, and its optimizer state, under repa_head.*
    last = out / "checkpoints" / "step-00000004"
    with safe_open(str(last / "model.safetensors"), "pt") as f:
        assert "repa_head.layers.0.weight" in f.keys() and "language_model.lm_head.weight" in f.keys()
    optim = torch.load(last / "optimizer.pt", weights_only=True)
    assert optim["param_groups"][0]["params"][-1] == "repa_head.layers.4.weight"  # registered last, listed last
    base = januskit.load(ckpt).model
    assert not torch.equal(exported.model.vision_gen_enc_model.in_conv.weight, base.vision_gen_enc_model.in_conv.weight)

    cfg6 = _config(tmp_path, ckpt, tmp_path / "data", steps=6)
    assert main(["train", str(cfg6), "--resume"]) == 0
    straight = tmp_path / "straight"
    straight.mkdir()
    assert main(["train", str(_config(straight, ckpt, tmp_path / "data", steps=6))]) == 0
    a, b = januskit.load(out).model, januskit.load(straight / "out").model
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n


def test_flow_settings_are_refused_for_janus(tmp_path: Path):
    janus = init_checkpoint(tmp_path / "janus", seed=0)
    _dataset(tmp_path / "data")
    cfg = _config(tmp_path, janus, tmp_path / "data", steps=1, stage="janus-pro/3")
    assert main(["train", str(cfg)]) == 2  # [flow] repa_layer = 1 differs from the defaults


def test_flow_lora_run_exports_a_merged_official_checkpoint(tmp_path: Path, ckpt: Path):
    """[lora] on a JanusFlow run: only the adapters train (LLM linears and the generation-out aligner),
    the REPA head stays training-only, and the export is the merged model under exactly the base's keys."""
    from safetensors.torch import load_file

    from conftest import need

    need("peft", "lora")
    _dataset(tmp_path / "data")
    cfg = e2e_config(tmp_path, ckpt, tmp_path / "data", 2, stage="janusflow/3",
                     extra="[flow]\nrepa_layer = 1\n[lora]\nenabled = true\nr = 4\n")
    assert main(["train", str(cfg)]) == 0
    base, out = load_file(str(ckpt / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(base)  # no repa_head, no lora_A / lora_B: merged into the official keys
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(out[q], base[q])  # adapted and merged
    assert not torch.equal(out["vision_gen_dec_aligner.weight"], base["vision_gen_dec_aligner.weight"])
    for k in ("vision_und_enc_model.vision_tower.blocks.0.attn.qkv.weight", "vision_gen_enc_model.in_conv.weight",
              "language_model.model.embed_tokens.weight"):
        assert torch.equal(out[k], base[k]), k  # not adapted: untouched even in stage 3
    assert len(januskit.load(tmp_path / "out").generate_images("a red square", steps=2).images) == 1
