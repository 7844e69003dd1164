"""`JanusFlowPipeline`: chat as every pipeline, plus rectified-flow text-to-image decoded by a VAE.

The VAE is not part of a JanusFlow checkpoint: it is the folder the user names (`vae=` / `--vae`), or
a `vae/` subfolder of the checkpoint when there is one (the miniature model ships its own).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..models.janusflow import JanusFlowModel
from .base import ImageResult, Pipeline
from ..processing.chat import Processor
from ..processing.image import to_pil
from ..sampling.flow import generate_latents, initial_latents
from ..sampling.logits import row_generator


class JanusFlowPipeline(Pipeline):
    model: JanusFlowModel
    default_cfg = 2.0  # the reference's CFG weight on the velocity

    def __init__(self, model: JanusFlowModel, processor: Processor, source: str | Path = "", vae=None) -> None:
        super().__init__(model, processor, source)
        self.vae = vae  # januskit.models.vae.LatentVAE or None (then only latents can be generated)

    def _packable(self) -> tuple[torch.nn.Module, ...]:
        m = self.model
        return (m.language_model, m.vision_und_enc_aligner, m.vision_gen_enc_aligner, m.vision_gen_dec_aligner)

    def generate_latents(self, prompt: str, n: int = 1, steps: int = 30, cfg: float = 2.0, seed: int = 0,
                         latents: torch.Tensor | None = None, progress: Callable[[int, int], None] | None = None,
                         reuse_prompt_kv: bool = True) -> torch.Tensor:
        """n final latents (n, C, H, W) for one prompt. The initial noise is `latents` when given
        (shape (n, C, H, W), the diffusers convention), else image i's noise comes from (seed, i)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        shape = self.config.latent_shape
        if latents is None:
            latents = initial_latents(shape, [row_generator(seed, i) for i in range(n)])
        else:
            latents = torch.as_tensor(latents)
            if tuple(latents.shape) != (n, *shape):
                raise ValueError(f"latents: expected shape ({n}, {', '.join(map(str, shape))}) for n={n}, "
                                 f"got {tuple(latents.shape)}")
        ids = self.processor.generation_prompt(prompt)
        return generate_latents(self.model, [ids] * n, latents, steps=steps, cfg_weight=cfg,
                                reuse_prompt_kv=reuse_prompt_kv, progress=progress)

    def generate_images(self, prompt: str, n: int = 1, steps: int = 30, cfg: float = 2.0, seed: int = 0,
                        latents: torch.Tensor | None = None, progress: Callable[[int, int], None] | None = None,
                        reuse_prompt_kv: bool = True) -> ImageResult:
        """n images for one prompt (reference defaults: 30 Euler steps, CFG 2 on the velocity)."""
        if self.vae is None:
            raise ValueError(f"{self.source}: JanusFlow decodes its latents with a VAE, and none is loaded: pass "
                             "vae=DIR to januskit.load (--vae DIR on the command line) with a diffusers "
                             "AutoencoderKL folder such as stabilityai/sdxl-vae, or use generate_latents()")
        z = self.generate_latents(prompt, n, steps, cfg, seed, latents, progress, reuse_prompt_kv)
        return ImageResult(images=to_pil(self.decode_latents(z)), seed=seed, latents=z,
                           info=dict(steps=steps, cfg=cfg, latent_shape=list(z.shape[1:])))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) latents -> (n, 3, S, S) float pixels in [-1, 1], one image per VAE call so an
        image's pixels do not depend on the batch it was decoded in."""
        if self.vae is None:
            raise ValueError(f"{self.source}: no VAE loaded (vae=DIR / --vae DIR)")
        return torch.cat([self.vae.decode(z[i:i + 1]) for i in range(z.shape[0])])
