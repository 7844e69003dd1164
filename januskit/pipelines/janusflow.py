"""`JanusFlowPipeline`: chat as every pipeline, plus rectified-flow text-to-image decoded by a VAE.

The VAE is not part of a JanusFlow checkpoint: it is the folder the user names (`vae=` / `--vae`), or
a `vae/` subfolder of the checkpoint when there is one (the miniature model ships its own).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..models.janusflow import JanusFlowModel
from ..processing.chat import Processor
from ..processing.image import load_image, to_gen_pixels
from ..sampling.flow import generate_latents, initial_latents
from ..sampling.logits import row_generator
from .base import ImageBatch, ImageResult, Pipeline, Progress, check_strength


class JanusFlowPipeline(Pipeline):
    model: JanusFlowModel
    default_cfg_weight = 2.0  # the reference's CFG weight on the velocity
    image_options = {"steps": 30, "latents": None, "reuse_prompt_kv": True}
    unsupported_option = "JanusFlow samples no tokens for images; use steps and cfg_weight"
    progress_unit = ("step", "ODE steps")  # Euler steps (all rows step together)

    def __init__(self, model: JanusFlowModel, processor: Processor, source: str | Path = "", vae=None) -> None:
        super().__init__(model, processor, source)
        self.vae = vae  # januskit.models.vae.LatentVAE or None (then only latents can be generated)

    def _packable(self) -> tuple[torch.nn.Module, ...]:
        m = self.model
        return (m.language_model, m.vision_und_enc_aligner, m.vision_gen_enc_aligner, m.vision_gen_dec_aligner)

    # -- generation ---------------------------------------------------------------------------
    @property
    def image_size(self) -> int | None:
        return None if self.vae is None else self.config.latent_size * self.vae.factor

    @property
    def image_positions(self) -> int:
        return 1 + self.config.n_gen_tokens  # the timestep token, then the latent grid

    def generate_latents(self, prompt: str, *, n: int = 1, seed: int = 0, cfg_weight: float | None = None,
                         steps: int | None = None, latents: torch.Tensor | None = None,
                         reuse_prompt_kv: bool | None = None, progress: Progress | None = None) -> torch.Tensor:
        """n final latents (n, C, H, W) for one prompt, no VAE needed. The initial noise is `latents`
        when given (shape (n, C, H, W), the diffusers convention), else image i's noise comes from
        (seed, i). The options are generate_batch's."""
        ids = self._generation_prompt(prompt, n)
        options = self.image_option_values(steps=steps, latents=latents, reuse_prompt_kv=reuse_prompt_kv)
        options["edit"] = None
        return self._latents([ids] * n, [row_generator(seed, i) for i in range(n)], self._cfg_weight(cfg_weight),
                             options, progress)

    def _latents(self, prompt_ids: Sequence[Sequence[int]], generators: Sequence[torch.Generator],
                 cfg_weight: float | Sequence[float], options: dict[str, Any], progress: Progress | None) -> torch.Tensor:
        n, shape, z0 = len(prompt_ids), self.config.latent_shape, options["latents"]
        if z0 is None:
            z0 = initial_latents(shape, generators)
        else:
            z0 = torch.as_tensor(z0)
            if tuple(z0.shape) != (n, *shape):
                raise ValueError(f"latents: expected shape ({n}, {', '.join(map(str, shape))}) for n={n}, "
                                 f"got {tuple(z0.shape)}")
        return generate_latents(self.model, prompt_ids, z0, steps=options["steps"], cfg_weight=cfg_weight,
                                reuse_prompt_kv=options["reuse_prompt_kv"], progress=progress,
                                edit=options.get("edit"), pad_id=self.processor.pad_id, start=options.get("start", 0))

    def _generate(self, prompt_ids: Sequence[Sequence[int]], generators: Sequence[torch.Generator],
                  cfg_weight: float | Sequence[float], options: dict[str, Any], memory_budget_gb: float,
                  progress: Progress | None) -> ImageBatch:
        """Euler steps from `latents` or the generators' noise, then the VAE, one image per call."""
        if self.vae is None:
            raise ValueError(f"{self.source}: JanusFlow decodes its latents with a VAE, and none is loaded: pass "
                             "vae=DIR to januskit.load (--vae DIR on the command line) with a diffusers "
                             "AutoencoderKL folder such as stabilityai/sdxl-vae, or use generate_latents()")
        z = self._latents(prompt_ids, generators, cfg_weight, options, progress)
        return ImageBatch(pixels=self.decode_latents(z), latents=z,
                          info=dict(steps=options["steps"], latent_shape=list(z.shape[1:])))

    @torch.inference_mode()
    def image_to_image(self, prompt: str, image: Image.Image | str | Path | bytes, *, strength: float = 0.5,
                       n: int = 1, seed: int = 0, steps: int | None = None, **options: Any) -> ImageResult:
        """img2img, training-free (SDEdit on the rectified flow): the source's VAE latent x, noised to
        z = t0 x + (1 - t0) noise at t0 = 1 - strength (rounded to a step), integrated from there to t = 1
        with CFG as in generate_images (strength 1: text-to-image). Image i's noise from generator
        (seed, i). `options`: generate_batch's (cfg_weight, reuse_prompt_kv, ...)."""
        if self.vae is None:
            raise ValueError(f"{self.source}: img2img encodes the source with the VAE, and none is loaded (--vae DIR)")
        steps = self.image_options["steps"] if steps is None else steps
        start = min(steps - 1, round((1 - check_strength(strength)) * steps))
        x = self.vae.encode(to_gen_pixels(load_image(image), self.image_size)[None]).float()
        gens = [row_generator(seed, i) for i in range(n)]
        t0 = start / steps
        z = t0 * x + (1 - t0) * initial_latents(self.config.latent_shape, gens)
        ids = self._generation_prompt(prompt, n)
        out = self._sample([ids] * n, gens, {"edit": None, "start": start}, steps=steps, latents=z, **options)
        return ImageResult(images=out.pil(), seed=seed, latents=out.latents,
                           info={"prompt_tokens": len(ids), "start_step": start, "strength": strength} | out.info)

    @torch.inference_mode()
    def reconstruct_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = torch.stack([to_gen_pixels(i, self.config.vision.image_size) for i in images])
        return self.decode_latents(self.vae.encode(x))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) latents -> (n, 3, S, S) float pixels in [-1, 1], one image per VAE call so an
        image's pixels do not depend on the batch it was decoded in."""
        if self.vae is None:
            raise ValueError(f"{self.source}: no VAE loaded (vae=DIR / --vae DIR)")
        return torch.cat([self.vae.decode(z[i:i + 1]) for i in range(z.shape[0])])
