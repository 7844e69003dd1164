"""`JanusPipeline`: chat as every pipeline, plus autoregressive text-to-image (CFG on the logits of
the image head) and the VQ tokenizer both ways."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..models.janus import JanusModel
from ..processing.image import to_gen_pixels, to_pil, to_uint8
from ..sampling.image_ar import cfg_weights, generate_image_tokens, rows_per_chunk
from ..sampling.speculative import DEFAULT_WINDOW, MODES, check_window, speculative_image_tokens
from ..sampling.logits import row_generator
from .base import ImageBatch, ImageResult, Pipeline, Progress, check_strength


class JanusPipeline(Pipeline):
    model: JanusModel
    default_cfg_weight = 5.0  # the reference's CFG weight on the logits
    # speculative: None, "sjd" or "mc-sjd" (sampling/speculative.py); window: its tokens per forward (None: 16)
    image_options = {"temperature": 1.0, "top_k": None, "top_p": None, "speculative": None, "window": None}
    unsupported_option = "only JanusFlow (rectified flow) takes {option}; this model is {arch}"
    progress_unit = ("tok", "image tokens")  # tokens sampled, summed over the images

    def _packable(self) -> tuple[torch.nn.Module, ...]:
        m = self.model
        return (m.language_model, m.aligner, m.gen_aligner, m.gen_head)

    # -- generation ---------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config.vq.image_size

    @property
    def image_positions(self) -> int:
        return self.config.vq.n_tokens

    def _generate(self, prompt_ids: Sequence[Sequence[int]], generators: Sequence[torch.Generator],
                  cfg_weight: float | Sequence[float], options: dict[str, Any], memory_budget_gb: float,
                  progress: Progress | None) -> ImageBatch:
        """The reference algorithm (or speculative Jacobi decoding of it), in chunks of rows that fit
        `memory_budget_gb`; progress counts the tokens of all rows (SJD: of each chunk's slowest image).
        info["llm_forwards"]: the LLM forward passes each image took (ordinary sampling: n_tokens)."""
        if not 0 <= memory_budget_gb < float("inf"):  # also catches NaN
            raise ValueError(f"memory_budget_gb must be a finite number >= 0, got {memory_budget_gb!r}")
        options = dict(options)
        mode, window = options.pop("speculative"), options.pop("window")
        edit, prefix = options.pop("edit", None), options.pop("prefix", None)
        if mode is not None and (edit is not None or prefix is not None):
            raise ValueError("speculative decoding samples text-to-image only; not with source images")
        if mode not in (None, *MODES):
            raise ValueError(f"speculative must be None, {' or '.join(map(repr, MODES))}, got {mode!r}")
        if mode is None and window is not None:
            raise ValueError("window: only speculative decoding (speculative='sjd' or 'mc-sjd') takes a window")
        window = DEFAULT_WINDOW if window is None else check_window(window)
        n, n_tok = len(prompt_ids), self.config.vq.n_tokens
        longest = max(len(p) for p in prompt_ids)  # the KV cache of a big model bounds how many rows run together
        if mode is not None:  # SJD's cache also holds the holes of rejected drafts: n_tokens + window slots more
            longest += n_tok + window
        rows = 2 if edit is None else 3  # guidance rows per image
        chunk = min(n, rows_per_chunk(self.model, longest, int(memory_budget_gb * 1024**3), rows))
        weights = cfg_weights(cfg_weight, n)[:, 0]  # checked, one per row, so that chunks can slice them
        w_img = None if edit is None else cfg_weights(edit.cfg_image, n)[:, 0]
        tokens, forwards = [], []
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            cb = None if progress is None else (lambda i, t, s=start, m=m: progress(s * t + i * m, n * t))
            kw = dict(pad_id=self.processor.pad_id, cfg_weight=weights[start:start + m],
                      generators=generators[start:start + m], progress=cb)
            if mode is None:
                part = None if edit is None else replace(edit, sources=edit.sources[start:start + m],
                                                         cfg_image=w_img[start:start + m])
                tokens.append(generate_image_tokens(self.model, prompt_ids[start:start + m], **kw,
                                                    compile=self.compile_decode, edit=part,
                                                    prefix=None if prefix is None else prefix[start:start + m],
                                                    **options))
                forwards.append(torch.full((m,), n_tok))
            else:
                out = speculative_image_tokens(self.model, prompt_ids[start:start + m], **kw, window=window,
                                               coupling=mode == "mc-sjd", **options)
                tokens.append(out.tokens)
                forwards.append(out.forwards)
        tokens = torch.cat(tokens)
        info = dict(tokens_per_image=n_tok, chunk=chunk, temperature=options["temperature"],
                    llm_forwards=torch.cat(forwards).tolist())
        if mode is not None:
            info |= dict(speculative=mode, window=window)
        return ImageBatch(pixels=self.decode_image_pixels(tokens), tokens=tokens, info=info)

    def image_to_image(self, prompt: str, image: Image.Image | str | Path | bytes, *, strength: float = 0.5,
                       n: int = 1, seed: int = 0, **options: Any) -> ImageResult:
        """Variations of `image`, training-free: its VQ tokens are the first round((1 - strength) x rows)
        rows of every image (given, not sampled), the rest is sampled from `prompt` with CFG as in
        generate_images (strength 1: text-to-image; an empty prompt: the unconditional continuation).
        Image i from generator (seed, i). `options`: generate_batch's (cfg_weight, temperature, ...)."""
        side = math.isqrt(self.config.vq.n_tokens)
        keep = round((1 - check_strength(strength)) * side) * side
        ids = self._generation_prompt(prompt, n)
        prefix = self.encode_image_tokens(image)[:, :keep].expand(n, keep)
        out = self._sample([ids] * n, [row_generator(seed, i) for i in range(n)], {"prefix": prefix}, **options)
        return ImageResult(images=out.pil(), tokens=out.tokens, seed=seed,
                           info={"prompt_tokens": len(ids), "kept_tokens": keep, "strength": strength} | out.info)

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

    @torch.inference_mode()
    def reconstruct_pixels(self, images: Sequence[Image.Image], batch: int = 64) -> torch.Tensor:
        tokens = [self.encode_image_tokens(images[i:i + batch]) for i in range(0, len(images), batch)]
        return self.decode_image_pixels(torch.cat(tokens))

    def decode_image_tokens(self, tokens: torch.Tensor) -> list[Image.Image]:
        return to_pil(self.decode_image_pixels(tokens))

    def decode_image_uint8(self, tokens: torch.Tensor):
        return to_uint8(self.decode_image_pixels(tokens))
