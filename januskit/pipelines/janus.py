"""`JanusPipeline`: chat as every pipeline, plus autoregressive text-to-image (CFG on the logits of
the image head) and the VQ tokenizer both ways."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..models.janus import JanusModel
from ..processing.image import to_gen_pixels, to_pil, to_uint8
from ..sampling.image_ar import generate_image_tokens, rows_per_chunk
from ..sampling.logits import row_generator
from .base import ImageResult, Pipeline


class JanusPipeline(Pipeline):
    model: JanusModel
    default_cfg = 5.0  # the reference's CFG weight on the logits

    def _packable(self) -> tuple[torch.nn.Module, ...]:
        m = self.model
        return (m.language_model, m.aligner, m.gen_aligner, m.gen_head)

    # -- generation ---------------------------------------------------------------------------
    def generate_images(self, prompt: str, n: int = 1, cfg: float = 5.0, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                        progress: Callable[[int, int], None] | None = None,
                        memory_budget_gb: float = 4.0) -> ImageResult:
        """n images for one prompt (reference algorithm, default CFG 5, temperature 1).
        Images are made in chunks that fit `memory_budget_gb`; image i depends only on (seed, i)."""
        if not 0 <= memory_budget_gb < float("inf"):  # also catches NaN
            raise ValueError(f"memory_budget_gb must be a finite number >= 0, got {memory_budget_gb!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        ids = self.processor.generation_prompt(prompt)
        chunk = min(n, rows_per_chunk(self.model, len(ids), int(memory_budget_gb * 1024**3)))
        n_tok = self.config.vq.n_tokens
        tokens = []
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            cb = None if progress is None else (lambda i, t, s=start, m=m: progress(s * t + i * m, n * t))
            tokens.append(generate_image_tokens(
                self.model, [ids] * m, pad_id=self.processor.pad_id, cfg_weight=cfg, temperature=temperature,
                top_k=top_k, top_p=top_p, generators=[row_generator(seed, start + j) for j in range(m)], progress=cb))
        tokens = torch.cat(tokens)
        return ImageResult(images=self.decode_image_tokens(tokens), tokens=tokens, seed=seed,
                           info=dict(prompt_tokens=len(ids), tokens_per_image=n_tok, chunk=chunk))

    # -- VQ tokenizer -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image_tokens(self, image: Image.Image | str | Path | bytes | Sequence) -> torch.LongTensor:
        """Image(s) -> (n, tokens_per_image) VQ ids (short side resized, centre crop, [-1, 1])."""
        imgs = list(image) if isinstance(image, (list, tuple)) else [image]
        size = self.config.vq.image_size
        x = torch.stack([to_gen_pixels(i, size) for i in imgs]).to(self.dtype)
        return self.model.gen_vision_model.encode(x)

    @torch.inference_mode()
    def decode_image_pixels(self, tokens: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """(n, tokens_per_image) ids -> (n, 3, S, S) float pixels in about [-1, 1]. One image per
        decoder call by default: conv results vary with batch size in the last bits, and uint8
        truncation would turn that into pixels that depend on the batch (decode is <1% of the time)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim == 1:
            tokens = tokens[None]
        n_tok, size = self.config.vq.n_tokens, self.config.vq.codebook_size
        if tokens.ndim != 2:
            raise ValueError(f"image tokens: expected shape (n, {n_tok}), got {tuple(tokens.shape)}")
        if tokens.shape[1] != n_tok:
            raise ValueError(f"image tokens: expected {n_tok} per image, got {tokens.shape[1]}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= size):
            raise ValueError(f"image tokens: ids must be in [0, {size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        vq = self.model.gen_vision_model
        return torch.cat([vq.decode(tokens[i:i + batch]).float() for i in range(0, tokens.shape[0], batch)])

    def decode_image_tokens(self, tokens: torch.Tensor) -> list[Image.Image]:
        return to_pil(self.decode_image_pixels(tokens))

    def decode_image_uint8(self, tokens: torch.Tensor):
        return to_uint8(self.decode_image_pixels(tokens))
