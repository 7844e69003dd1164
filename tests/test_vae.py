"""JanusFlow's latent space (januskit.models.vae.LatentVAE over diffusers' AutoencoderKL) and its
from-scratch training (januskit.train.pretrain.vae), on a tiny random AutoencoderKL: the wrapper agrees
with diffusers called directly, applies scaling and shift as the official code does, saves and loads
losslessly and atomically, refuses bad folders with messages that name the problem, and training is
bit-reproducible and learns."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import need

need("diffusers", "flow")  # the latent space

from januskit.models.vae import LatentVAE, mini_vae_config, tiny_vae_config  # noqa: E402
from januskit.checkpoint.vae import load_vae, read_vae_config, save_vae  # noqa: E402
from januskit.train.pretrain.vae import (VAETrainConfig, check_vae_images, reconstruct,  # noqa: E402
                                         reconstruction_stats, train_vae)
from test_vq_pretrain import flat_images  # noqa: E402


def pixels(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny() -> LatentVAE:
    return LatentVAE.from_config(tiny_vae_config(), seed=0).eval()


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    return save_vae(tiny, tmp_path_factory.mktemp("vae") / "tiny-vae")


# ---------------------------------------------------------------------------------------------
# The wrapper

def test_properties_and_shapes(tiny):
    assert (tiny.factor, tiny.latent_channels, tiny.dtype, tiny.scaling_factor, tiny.shift_factor) == \
        (2, 4, torch.float32, 0.5, 0.0)
    x = pixels()
    z = tiny.encode(x)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    y = tiny.decode(z)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= -1 and float(y.max()) <= 1


def test_roundtrip_equals_diffusers_directly(tiny):
    x = pixels(3)
    with torch.no_grad():
        ref = tiny.vae.decode(tiny.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    assert torch.allclose(tiny.decode(tiny.encode(x)), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [None, 0.25])
def test_scaling_and_shift_applied(shift):
    cfg = {**tiny_vae_config(), "scaling_factor": 0.37, "shift_factor": shift}
    vae = LatentVAE.from_config(cfg, seed=1).eval()
    s = 0.0 if shift is None else shift
    x = pixels(2, seed=3)
    with torch.no_grad():
        mean = vae.vae.encode(x).latent_dist.mean
        z = vae.encode(x)
        assert torch.allclose(z, (mean - s) * 0.37, atol=1e-6, rtol=0)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        ref = vae.vae.decode(latents / 0.37 + s).sample.clamp(-1, 1)
    assert torch.allclose(vae.decode(latents), ref, atol=1e-6, rtol=0)


def test_sampled_encode_is_reproducible(tiny):
    x = pixels()
    a = tiny.encode(x, generator=torch.Generator().manual_seed(7), sample=True)
    b = tiny.encode(x, generator=torch.Generator().manual_seed(7), sample=True)
    c = tiny.encode(x, generator=torch.Generator().manual_seed(8), sample=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        dist = tiny.vae.encode(x).latent_dist
        eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, (dist.mean + dist.std * eps) * tiny.scaling_factor, atol=1e-6, rtol=0)


def test_encode_follows_grad_mode_decode_is_inference(tiny):
    x = pixels()
    assert tiny.encode(x).requires_grad  # differentiable when the caller wants gradients
    with torch.no_grad():
        z = tiny.encode(x)
    assert not z.requires_grad and not z.is_inference()  # an ordinary tensor, usable as a training target
    assert tiny.decode(z).is_inference()


def test_bad_inputs_refused(tiny):
    with pytest.raises(ValueError, match=r"pixels: expected shape \(N, 3, H, W\) with H and W multiples of 2"):
        tiny.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"pixels: expected a float tensor"):
        tiny.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"latents: expected shape \(N, 4, H, W\)"):
        tiny.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError, match="wraps a diffusers AutoencoderKL"):
        LatentVAE(torch.nn.Linear(2, 2))


def test_mini_config_geometry():
    vae = LatentVAE.from_config(mini_vae_config(), seed=0)
    assert (vae.factor, vae.latent_channels, vae.config["sample_size"]) == (4, 4, 64)
    assert sum(p.numel() for p in vae.parameters()) < 2_000_000
    with torch.no_grad():
        assert vae.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 16, 16)


def test_from_config_is_seeded_and_leaves_global_rng(tiny):
    state = torch.random.get_rng_state()
    again = LatentVAE.from_config(tiny_vae_config(), seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    other = LatentVAE.from_config(tiny_vae_config(), seed=1)
    ref = tiny.vae.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.vae.state_dict().items())
    assert not all(torch.equal(v, ref[k]) for k, v in other.vae.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Saving and loading

def test_save_then_load_is_identical(tiny, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary folder left beside it
    loaded = load_vae(saved)
    assert not loaded.training and loaded.scaling_factor == tiny.scaling_factor
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen, as JanusFlow uses it
    ref = tiny.vae.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.vae.state_dict().items())
    x = pixels(2, seed=5)
    assert torch.equal(loaded.encode(x), tiny.encode(x))
    assert torch.equal(loaded.decode(tiny.encode(x)), tiny.decode(tiny.encode(x)))
    assert load_vae(saved, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_save_is_atomic(tiny, saved, tmp_path, monkeypatch):
    with pytest.raises(FileExistsError, match="not empty"):
        save_vae(tiny, saved)
    dst = tmp_path / "out"

    def half_written(folder, **kw):
        (Path(folder) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(tiny.vae, "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_vae(tiny, dst)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


# ---------------------------------------------------------------------------------------------
# Refusals

def _copy(saved, tmp_path, drop: str | None = None, config: str | None = None):
    d = tmp_path / "vae"
    d.mkdir()
    for p in saved.iterdir():
        if p.name != drop:
            (d / p.name).write_bytes(p.read_bytes())
    if config is not None:
        (d / "config.json").write_text(config)
    return d


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist: pass --vae DIR .*stabilityai/sdxl-vae"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"file is not a folder: pass --vae DIR"):
        load_vae(tmp_path / "file")


def test_missing_config(saved, tmp_path):
    d = _copy(saved, tmp_path, drop="config.json")
    with pytest.raises(FileNotFoundError, match=re.escape(str(d)) + r": no config\.json"):
        load_vae(d)


def test_missing_weights(saved, tmp_path):
    d = _copy(saved, tmp_path, drop="diffusion_pytorch_model.safetensors")
    expected = r": weights missing, expected diffusion_pytorch_model\.safetensors .*found config\.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(d)) + expected):
        load_vae(d)


def test_not_an_autoencoder_kl(saved, tmp_path):
    cfg = json.loads((saved / "config.json").read_text())
    d = _copy(saved, tmp_path, config=json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match=r"config\.json: not an AutoencoderKL config \(_class_name 'UNet2DModel'\)"):
        load_vae(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"not an AutoencoderKL config \(no _class_name\)"):
        read_vae_config(d)


def test_malformed_json(saved, tmp_path):
    d = _copy(saved, tmp_path, config='{"_class_name": "AutoencoderKL",')
    with pytest.raises(ValueError, match=re.escape(str(d / "config.json")) + ": malformed JSON"):
        load_vae(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"malformed, expected a JSON object, got list"):
        load_vae(d)


def test_diffusers_missing(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'januskit\[flow\]'"):
        load_vae(saved)
    with pytest.raises(ImportError, match=r"pip install 'januskit\[flow\]'"):
        LatentVAE.from_config(tiny_vae_config())


# ---------------------------------------------------------------------------------------------
# Training

TINY_RUN = VAETrainConfig(steps=4, batch_size=4, lr=2e-3, warmup=1, log_every=2)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return flat_images(32)


def _trained(images, cfg, seed: int = 0) -> LatentVAE:
    vae = LatentVAE.from_config(tiny_vae_config(), seed=seed)
    train_vae(vae, images, cfg, progress=False)
    return vae


def test_training_is_bit_reproducible(images):
    a, b = _trained(images, TINY_RUN), _trained(images, TINY_RUN)
    c = _trained(images, dataclasses.replace(TINY_RUN, seed=1))
    sa, sb, sc = a.vae.state_dict(), b.vae.state_dict(), c.vae.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.scaling_factor == b.scaling_factor
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_loss_falls_and_latents_are_calibrated(images):
    vae = LatentVAE.from_config(tiny_vae_config(), seed=0)
    before = reconstruction_stats(vae, images)
    cfg = VAETrainConfig(steps=60, batch_size=8, lr=3e-3, warmup=5, log_every=10)
    metrics = train_vae(vae, images, cfg, progress=False)
    assert not vae.training
    assert [m["step"] for m in metrics] == list(range(10, 61, 10))
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"], [m["loss"] for m in metrics]
    for m in metrics:
        assert set(m) >= {"step", "lr", "loss", "l1", "l2", "kl", "logvar", "time_s"}
        assert math.isclose(m["loss"], m["l1"] + m["l2"] + cfg.kl_weight * m["kl"], rel_tol=1e-5)
    after = reconstruction_stats(vae, images)
    assert after["psnr"] > before["psnr"] + 3 and after["mae_255"] < before["mae_255"]
    # scaling_factor fitted at the end: the training images' latents have std 1, and it is in the config
    assert metrics[-1]["scaling_factor"] == vae.scaling_factor == vae.config["scaling_factor"]
    with torch.no_grad():
        assert math.isclose(float(vae.encode(images).std()), 1.0, rel_tol=1e-4)


def test_reconstruction_stats(tiny):
    x = flat_images(5)
    stats = reconstruction_stats(tiny, x)
    d = (reconstruct(tiny, x) - x) * 0.5
    assert math.isclose(stats["psnr"], -10 * math.log10(float(d.pow(2).mean())), rel_tol=1e-5)
    assert math.isclose(stats["mae_255"], float(d.abs().mean()) * 255, rel_tol=1e-5)
    assert len(stats["per_image_max_255"]) == 5
    assert stats["max_255"] == max(stats["per_image_max_255"])
    assert math.isclose(stats["per_image_max_255"][2], float(d[2].abs().max()) * 255, rel_tol=1e-6)


def test_training_refuses_bad_images(tiny, saved):
    with pytest.raises(ValueError, match=r"values must be finite and in \[-1, 1\].*to_gen_pixels"):
        check_vae_images(torch.full((2, 3, 16, 16), 255.0), tiny)
    with pytest.raises(ValueError, match=r"expected shape \(N >= 1, 3, H, W\) with H and W multiples of 2"):
        check_vae_images(torch.zeros(2, 1, 16, 16), tiny)
    with pytest.raises(ValueError, match="batch_size 8 is larger than the 4 images"):
        train_vae(tiny, flat_images(4), VAETrainConfig(batch_size=8), progress=False)
    with pytest.raises(ValueError, match=r"no parameter requires grad .*requires_grad_\(True\)"):
        train_vae(load_vae(saved), flat_images(4), VAETrainConfig(batch_size=2), progress=False)
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        VAETrainConfig(kl_weight=-1).validate()
