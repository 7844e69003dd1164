"""VQ tokenizer pre-training (januskit.train.pretrain.vq) on a tiny VQConfig and 16x16 flat-colour
images: the loss falls, gradients flow where the straight-through estimator says they should, the
trained model's `encode` picks the codes training used, dead-code restarts revive a collapsed codebook,
runs are bit-reproducible, and bad inputs are refused with a message that names the problem."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from januskit.config import VQConfig
from januskit.models.vq import VQModel
from januskit.train.pretrain.vq import (VQTrainConfig, check_images, reconstruction_psnr, reconstruction_stats,
                                        train_vq, vq_forward)

TINY = VQConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 2), z_channels=32, num_res_blocks=1,
                image_size=16)
PALETTE = torch.tensor([(220, 40, 40), (245, 145, 20), (40, 85, 225), (45, 165, 65)], dtype=torch.float32)


def flat_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: white with one or two axis-aligned blocks of a palette colour."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, size, size), 255.0)
    for i in range(n):
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            y0, x0 = (int(v) for v in torch.randint(0, size - 4, (2,), generator=g))
            h, w = (int(v) for v in torch.randint(3, size // 2, (2,), generator=g))
            x[i, :, y0:y0 + h, x0:x0 + w] = PALETTE[int(torch.randint(len(PALETTE), (1,), generator=g))].view(3, 1, 1)
    return x / 127.5 - 1.0


def nearest_by_hand(model: VQModel, x: torch.Tensor) -> torch.Tensor:
    """(B, grid*grid) ids by the definition, not through the quantiser: per latent vector (row-major),
    the codebook row of largest cosine similarity."""
    z = model.quant_conv(model.encoder(x))
    cos = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1) @ F.normalize(
        model.quantize.embedding.weight, dim=1).t()
    return cos.argmax(1).view(x.shape[0], -1)


def tiny_model(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(TINY)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return flat_images(64)


def test_loss_falls_and_psnr_rises(images):
    model = tiny_model()
    before = reconstruction_psnr(model, images)
    cfg = VQTrainConfig(steps=80, batch_size=8, lr=2e-3, warmup=5, log_every=10, restart_after=10)
    metrics = train_vq(model, images, cfg, progress=False)
    assert not model.training
    assert [m["step"] for m in metrics] == list(range(10, 81, 10))
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"], [m["loss"] for m in metrics]
    assert metrics[-1]["recon"] < 0.5 * metrics[0]["recon"]
    for m in metrics:
        assert set(m) >= {"step", "lr", "loss", "recon", "l1", "l2", "codebook", "commit", "usage", "perplexity",
                          "restarted"}
        assert math.isclose(m["loss"], m["recon"] + m["codebook"] + m["commit"], rel_tol=1e-5)
        assert math.isclose(m["commit"], cfg.beta * m["codebook"], rel_tol=1e-5)  # same value, beta-weighted
        assert 0 < m["usage"] <= 1 and 1 <= m["perplexity"] <= TINY.codebook_size
    after = reconstruction_psnr(model, images)
    assert after > before + 3, (before, after)
    stats = reconstruction_stats(model, images)
    assert math.isclose(stats["psnr"], after) and 0 <= stats["mae_255"] <= stats["max_255"] <= 255


def test_straight_through_gradients(images):
    model = tiny_model()
    x = images[:4]
    enc = model.encoder.conv_in.weight
    emb = model.quantize.embedding.weight

    def grads(pick) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        out = vq_forward(model, x)
        pick(out).backward()
        return enc.grad, emb.grad, model.decoder.conv_out.weight.grad

    # Reconstruction: the decoder and (straight through the quantiser) the encoder learn; the codebook
    # does not (its rows only move through the codebook loss).
    g_enc, g_emb, g_dec = grads(lambda o: F.l1_loss(o.recon, x) + F.mse_loss(o.recon, x))
    assert g_enc is not None and g_enc.abs().sum() > 0
    assert g_dec is not None and g_dec.abs().sum() > 0
    assert g_emb is None or g_emb.abs().sum() == 0

    # Codebook loss ||sg(z) - e||^2: only the codebook, and only the rows that were picked.
    out = vq_forward(model, x)
    used = torch.zeros(TINY.codebook_size, dtype=torch.bool)
    used[out.ids.flatten()] = True
    g_enc, g_emb, _ = grads(lambda o: o.codebook_loss)
    assert g_emb is not None
    assert (g_emb[used].abs().sum(1) > 0).all() and g_emb[~used].abs().sum() == 0
    assert g_enc is None or g_enc.abs().sum() == 0

    # Commitment ||z - sg(e)||^2: only the encoder.
    g_enc, g_emb, _ = grads(lambda o: o.commit_loss)
    assert g_enc is not None and g_enc.abs().sum() > 0
    assert g_emb is None or g_emb.abs().sum() == 0

    # Forward value of the straight-through path: the nearest codes (as encode picks them), decoded from
    # the normalised codebook rows.
    model.eval()
    with torch.no_grad():
        out = vq_forward(model, x)
        ids = nearest_by_hand(model, x)
        assert torch.equal(out.ids, ids) and torch.equal(model.encode(x), ids)
        e = F.normalize(model.quantize.embedding.weight, dim=1)[ids].view(4, 8, 8, TINY.codebook_dim)
        want = model.decoder(model.post_quant_conv(e.permute(0, 3, 1, 2)))
        torch.testing.assert_close(out.recon, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(ids), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.z.norm(dim=1), torch.ones(4, 8, 8))


def test_trained_encode_picks_training_codes(images):
    model = tiny_model()
    train_vq(model, images, VQTrainConfig(steps=30, batch_size=8, lr=2e-3, warmup=5, log_every=30,
                                          restart_after=5), progress=False)
    with torch.no_grad():  # training's codes and encode's are both the nearest normalised codebook rows
        want = nearest_by_hand(model, images)
        assert torch.equal(vq_forward(model, images).ids, want)
        assert torch.equal(model.encode(images), want)


def test_dead_code_restart_revives_collapsed_codebook(images):
    def run(restart_after: int | None) -> tuple[float, int]:
        model = tiny_model()
        with torch.no_grad():  # collapse: every row the same direction, one row slightly closer to everything
            w = model.quantize.embedding.weight
            w.copy_(torch.ones_like(w) + 1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
        cfg = VQTrainConfig(steps=20, batch_size=8, lr=1e-3, warmup=2, log_every=20, restart_after=restart_after)
        m = train_vq(model, images, cfg, progress=False)[-1]
        norms = model.quantize.embedding.weight.norm(dim=1)
        if restart_after is not None:  # re-seeded rows are normalised latents (the collapsed ones have norm ~2.8)
            assert ((norms - 1).abs() < 0.05).any()
        return reconstruction_stats(model, images)["usage"], m["restarted"]

    usage_off, restarted_off = run(None)
    usage_on, restarted_on = run(3)
    assert restarted_off == 0 and restarted_on > 0
    assert usage_on > 2 * usage_off, (usage_on, usage_off)


def test_reproducible(images):
    cfg = VQTrainConfig(steps=12, batch_size=8, lr=2e-3, warmup=3, log_every=4, restart_after=2, seed=7)

    def run(c: VQTrainConfig) -> tuple[dict[str, torch.Tensor], list[dict]]:
        model = tiny_model()
        metrics = train_vq(model, images, c, progress=False)
        return model.state_dict(), [{k: v for k, v in m.items() if k != "time_s"} for m in metrics]

    a, ma = run(cfg)
    b, mb = run(cfg)
    assert ma == mb and any(m["restarted"] for m in ma)
    assert list(a) == list(tiny_model().state_dict())  # parameter names untouched (official layout)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c, _ = run(VQTrainConfig(**{**cfg.__dict__, "seed": 8}))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_lr_schedule():
    cfg = VQTrainConfig(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert cfg.lr_at(1) == pytest.approx(1e-4) and cfg.lr_at(10) == pytest.approx(1e-3)
    assert cfg.lr_at(100) == pytest.approx(1e-4)
    assert all(cfg.lr_at(s) >= cfg.lr_at(s + 1) for s in range(10, 100))
    assert VQTrainConfig(steps=5, warmup=0, min_lr_ratio=1.0).lr_at(3) == pytest.approx(1e-3)


@pytest.mark.parametrize("bad, words", [
    (lambda x: x[:, :, :, 0], ["shape (N, 3, H, W)", "(8, 3, 16)"]),
    (lambda x: x[:, :1], ["shape (N, 3, H, W)"]),
    (lambda x: F.interpolate(x, size=8), ["16x16", "got 8x8"]),
    (lambda x: (x + 1) * 127.5, ["[-1, 1]", "0-255", "to_gen_pixels"]),
    (lambda x: (x + 1) / 2, ["[-1, 1]", "[0, 1]"]),
    (lambda x: x * 1.5, ["[-1, 1]", "got range [-1.265, 1.5]"]),
    (lambda x: ((x + 1) * 127.5).to(torch.uint8), ["float", "torch.uint8"]),
    (lambda x: x[:0], ["empty"]),
    (lambda x: torch.where(x > 0.99, torch.nan, x), ["NaN"]),
])
def test_bad_images_are_refused(images, bad, words):
    model = tiny_model()
    with pytest.raises(ValueError) as e:
        train_vq(model, bad(images[:8]), VQTrainConfig(steps=1, batch_size=1), progress=False)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    with pytest.raises(ValueError):
        check_images(bad(images[:8]), model)


def test_bad_config_is_refused(images):
    model = tiny_model()
    with pytest.raises(ValueError, match="batch_size 9 is larger than the 8 images"):
        train_vq(model, images[:8], VQTrainConfig(steps=1, batch_size=9), progress=False)
    with pytest.raises(ValueError, match=r"VQTrainConfig.steps must be >= 1, got 0"):
        train_vq(model, images[:8], VQTrainConfig(steps=0), progress=False)
    with pytest.raises(ValueError, match=r"VQTrainConfig.restart_after"):
        train_vq(model, images[:8], VQTrainConfig(steps=1, batch_size=1, restart_after=0), progress=False)


def test_attention_off_holds_every_attention_block_at_the_identity(images):
    """VQTrainConfig.attention=False: each AttnBlock's output projection is zero and stays so, the whole block
    is frozen (its other weights keep their initial values), and the block passes its input through exactly;
    the layout (state-dict names) is unchanged. The default trains the blocks."""
    from januskit.models.vq import AttnBlock

    model, init = tiny_model(), tiny_model().state_dict()
    train_vq(model, images, VQTrainConfig(steps=4, batch_size=8, warmup=1, log_every=2, attention=False),
             progress=False)
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, AttnBlock)}
    assert len(blocks) == 5  # encoder: last level (1) and mid (1); decoder: mid (1) and first level (2)
    x = torch.randn(2, 64, 4, 4)
    for n, b in blocks.items():
        assert not b.proj_out.weight.any() and not b.proj_out.bias.any(), n
        assert not any(p.requires_grad for p in b.parameters()), n
        assert torch.equal(b.q.weight, init[f"{n}.q.weight"]), n
        assert torch.equal(b(x[:, :b.q.in_channels]), x[:, :b.q.in_channels]), n
    assert list(model.state_dict()) == list(init)
    # the rest trains
    assert not torch.equal(model.state_dict()["encoder.conv_in.weight"], init["encoder.conv_in.weight"])

    on = tiny_model()
    train_vq(on, images, VQTrainConfig(steps=4, batch_size=8, warmup=1, log_every=2), progress=False)
    name = next(iter(blocks))
    assert not torch.equal(on.state_dict()[f"{name}.proj_out.weight"], init[f"{name}.proj_out.weight"])


def test_decoder_training_keeps_every_id_and_learns_the_empty_canvas(images):
    """train_vq_decoder: only post_quant_conv and the decoder change (encoder, quant_conv and codebook are bit for
    bit the trained VQ's, so every image keeps its ids); the reconstruction of what it trains on improves,
    including an image the VQ never saw (an empty white canvas); requires_grad flags come back as they were;
    the same seed gives the same weights."""
    from januskit.train.pretrain.vq import DECODER_SIDE, train_vq_decoder

    model = tiny_model()
    train_vq(model, images, VQTrainConfig(steps=40, batch_size=8, lr=2e-3, warmup=5, log_every=10), progress=False)
    blank = torch.ones(1, 3, 16, 16)
    mixed = torch.cat([images, blank.expand(8, -1, -1, -1)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = model.encode(mixed)
    empty_before = reconstruction_stats(model, blank, blank_ok=True)["psnr"]
    model.quantize.embedding.weight.requires_grad_(False)  # a flag of the caller's, to be restored
    cfg = VQTrainConfig(steps=60, batch_size=8, lr=2e-3, warmup=5, log_every=20)
    metrics = train_vq_decoder(model, mixed, cfg, progress=False)
    assert [m["step"] for m in metrics] == [20, 40, 60] and set(metrics[0]) == {"step", "lr", "loss", "l1", "l2", "time_s"}
    assert math.isclose(metrics[0]["loss"], metrics[0]["l1"] + metrics[0]["l2"], rel_tol=1e-5)
    assert metrics[-1]["loss"] < metrics[0]["loss"] and not model.training
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(DECODER_SIDE) for k in changed), sorted(changed)
    assert any(k.startswith("decoder.") for k in changed) and any(k.startswith("post_quant_conv.") for k in changed)
    assert torch.equal(model.encode(mixed), ids)
    assert reconstruction_stats(model, blank, blank_ok=True)["psnr"] > empty_before + 3
    with pytest.raises(ValueError, match="none is negative"):  # without blank_ok an all-white batch looks like [0, 1]
        reconstruction_stats(model, blank)
    assert not model.quantize.embedding.weight.requires_grad and model.decoder.conv_in.weight.requires_grad
    assert model.encoder.conv_in.weight.requires_grad
    # deterministic: the same start, images and config give the same decoder
    again = tiny_model()
    again.load_state_dict(before)
    train_vq_decoder(again, mixed, cfg, progress=False)
    assert all(torch.equal(again.state_dict()[k], after[k]) for k in after)
    with pytest.raises(ValueError, match="batch_size 9 is larger than the 8 images"):
        train_vq_decoder(model, images[:8], VQTrainConfig(steps=1, batch_size=9), progress=False)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_vq_decoder(model, images[:8] * 3, VQTrainConfig(steps=1, batch_size=1), progress=False)
