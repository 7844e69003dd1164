"""JanusFlow's latent space: a thin wrapper over diffusers' `AutoencoderKL` (the VAE itself is the
library's; nothing here re-implements it).

JanusFlow runs rectified flow on the latents of the SDXL VAE (`stabilityai/sdxl-vae`: 4 channels,
spatial factor 8, a 384x384 image <-> 4x48x48 latent, scaling_factor 0.13025). The VAE is not part of
a JanusFlow checkpoint: the user names a local folder in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors), and it is only ever read from disk (`local_files_only=True`,
and the folder is checked before diffusers sees it, so nothing can fall through to a hub download).

Latent convention (the official code's, generalised to configs with a `shift_factor`):
    latents = (posterior - shift_factor) * scaling_factor      encode (shift 0 when the config has null)
    pixels  = vae.decode(latents / scaling_factor + shift_factor).sample, clamped to [-1, 1]   decode
Pixels are (N, 3, H, W) in [-1, 1] with H and W multiples of `factor`; latents are
(N, latent_channels, H / factor, W / factor), float32 whatever the VAE's dtype.

The SDXL VAE overflows in float16 (the JanusFlow README runs it in bfloat16); float32 is the default.

diffusers is an optional dependency (`pip install 'januskit[flow]'`), imported only when a VAE is
built or loaded.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("januskit.vae")

CLASS_NAME = "AutoencoderKL"
INSTALL_HINT = "pip install 'januskit[flow]'"
def autoencoder_kl() -> type:
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(f"the JanusFlow latent space needs diffusers' AutoencoderKL, which could not be "
                          f"imported ({e}); install it with: {INSTALL_HINT}") from e
    return AutoencoderKL


def mini_vae_config() -> dict[str, Any]:
    """AutoencoderKL config of the miniature world's latent space: 64x64 RGB <-> 4x16x16 (factor 4,
    three down / up blocks of 16, 32, 64 channels, one resnet each), 0.68M parameters.

    Why 16x16: the miniature SigLIP sees 64 px in 8 px patches (8x8 = 64 tokens), and JanusFlow's
    generation encoder patchifies the latent by 2, so a 16x16 latent gives the same 8x8 token grid
    (REPA aligns the two grids position by position), as 48 / 2 = 384 / 16 = 24 does at full scale.

    `scaling_factor` is 1.0 here, a placeholder: it is fitted after training so that the latents of
    world images have a standard deviation of about 1 (`LatentVAE.calibrate_scaling`, which
    `januskit.train.pretrain.vae.train_vae` calls at its end), and saved in the config like SDXL's 0.13025.

    GroupNorm uses 4 groups, not SDXL's 32: at 16-64 channels, 16 or 32 groups is a per-channel instance
    norm that strips each image's absolute colour statistics, and training to the same reconstruction
    loss took about twice the steps (1, 2 or 4 groups did equally well; 8 was between).
    """
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [16, 32, 64], "layers_per_block": 1,
            "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 4, "sample_size": 64,
            "scaling_factor": 1.0, "shift_factor": None, "force_upcast": False}


def tiny_vae_config() -> dict[str, Any]:
    """A 44K-parameter AutoencoderKL for unit tests (milliseconds per call): factor 2 (two blocks of 8 and 16 channels,
    4 groups), so a 16x16 image <-> a 4x8x8 latent; the mid-block attention is kept so the tests go
    through the same code as real VAEs. scaling_factor 0.5 (any value other than 1 shows whether
    it is applied)."""
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16], "layers_per_block": 1,
            "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 4, "sample_size": 16,
            "scaling_factor": 0.5, "shift_factor": None, "force_upcast": False}


class LatentVAE(torch.nn.Module):
    """A diffusers `AutoencoderKL` (`.vae`) seen as JanusFlow's latent space: scaled latents in,
    [-1, 1] pixels out. See the module docstring for the conventions."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        if not isinstance(vae, autoencoder_kl()):
            raise TypeError(f"LatentVAE wraps a diffusers {CLASS_NAME}, got {type(vae).__name__}")
        self.vae = vae

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> "LatentVAE":
        """A freshly initialised AutoencoderKL (diffusers' own init, drawn from `seed` without touching
        the global RNG): the same config and seed give the same weights."""
        AutoencoderKL = autoencoder_kl()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL.from_config(dict(config))
        return cls(vae if dtype == torch.float32 else vae.to(dtype))

    # -- properties -----------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.vae.config)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """The config's `shift_factor`, 0.0 when it is null (SDXL's case)."""
        shift = self.vae.config.get("shift_factor")
        return 0.0 if shift is None else float(shift)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def factor(self) -> int:
        """Pixels per latent position along each side: one downsampling per block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # -- latents <-> pixels ---------------------------------------------------------------------

    def _check(self, x: torch.Tensor, what: str, channels: int, step: int) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"VAE {what}: expected a float tensor (N, {channels}, H, W), got {got}")
        if x.shape[1] != channels or x.shape[2] % step or x.shape[3] % step:
            raise ValueError(f"VAE {what}: expected shape (N, {channels}, H, W) with H and W multiples of "
                             f"{step}, got {tuple(x.shape)}")

    def posterior(self, pixels: torch.Tensor):
        """diffusers' DiagonalGaussianDistribution of `pixels` ((N, 3, H, W) in [-1, 1]), unscaled.
        Runs in the caller's grad mode (training uses it with gradients)."""
        self._check(pixels, "pixels", int(self.vae.config.in_channels), self.factor)
        return self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist

    def scale(self, raw: torch.Tensor) -> torch.Tensor:
        """Posterior space -> flow latents: (raw - shift) * scale, in float32."""
        return (raw.float() - self.shift_factor) * self.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Flow latents -> the decoder's input space, in float32."""
        return latents.float() / self.scaling_factor + self.shift_factor

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False) -> torch.Tensor:
        """(N, 3, H, W) pixels in [-1, 1] -> (N, C, H/f, W/f) scaled float32 latents: the posterior
        mean, or with `sample=True` a draw from the posterior using `generator` (reproducible).
        Runs in the caller's grad mode; wrap it in torch.no_grad() for a frozen VAE (the result is an
        ordinary tensor, usable as a training target)."""
        dist = self.posterior(pixels)
        return self.scale(dist.sample(generator=generator) if sample else dist.mean)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) scaled latents -> (N, 3, h*f, w*f) float32 pixels clamped to [-1, 1]."""
        self._check(latents, "latents", self.latent_channels, 1)
        z = self.unscale(latents.to(self.device)).to(self.dtype)
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def calibrate_scaling(self, images: torch.Tensor, batch_size: int = 64) -> float:
        """Set `scaling_factor` to 1 / std of the posterior means of `images` (over every element of
        the set, after subtracting `shift_factor`), so that their latents have std 1; written into the
        config (hence saved with it). Returns the new factor."""
        raw = torch.cat([self.posterior(images[i:i + batch_size]).mean.float().cpu()
                         for i in range(0, images.shape[0], batch_size)])
        std = float((raw - self.shift_factor).std())
        if not std > 0:
            raise ValueError(f"VAE calibration: the latents of these images have std {std}, cannot scale them")
        self.vae.register_to_config(scaling_factor=1.0 / std)
        return self.scaling_factor

__all__ = ["LatentVAE", "mini_vae_config", "tiny_vae_config"]
