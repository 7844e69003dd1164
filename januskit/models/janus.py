"""Janus / Janus-Pro: how the parts connect (official `MultiModalityCausalLM`).

Understanding: pixels -> SigLIP -> aligner -> embeddings spliced over the image placeholders.
Generation: VQ ids -> gen_embed -> gen_aligner -> LLM -> gen_head -> logits over the codebook.
Attribute names are the checkpoint's top-level prefixes, in the official construction order.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import JanusConfig
from .layers import MlpProjector, VisionHead
from .llama import LlamaForCausalLM
from .siglip import VisionTower
from .vq import VQModel


class JanusModel(nn.Module):
    def __init__(self, c: JanusConfig) -> None:
        super().__init__()
        self.config = c
        self.vision_model = VisionTower(c.vision)
        self.aligner = MlpProjector(c.aligner.input_dim, c.aligner.n_embed, c.aligner.depth)
        self.gen_vision_model = VQModel(c.vq)
        self.gen_aligner = MlpProjector(c.gen_aligner.input_dim, c.gen_aligner.n_embed, c.gen_aligner.depth)
        self.gen_head = VisionHead(c.gen_head.n_embed, c.gen_head.image_token_embed, c.gen_head.image_token_size)
        self.gen_embed = nn.Embedding(c.vq.codebook_size, c.vq.codebook_dim)
        self.language_model = LlamaForCausalLM(c.llm)
        # "vq": understanding reads images through the generation tokenizer (pixels -> VQ ids -> gen_embed
        # -> gen_aligner), the shared-encoder variant of Janus's Table 5; not part of the checkpoint.
        self.und_encoder = "siglip"

    @property
    def llm(self) -> nn.Module:
        return self.language_model.model

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, n_und_tokens, dim) understanding embeddings."""
        if self.und_encoder == "vq":
            with torch.no_grad():  # the VQ stays frozen, as in every stage
                ids = self.gen_vision_model.encode(pixel_values.to(next(self.gen_vision_model.parameters()).dtype))
            return self.gen_embeds(ids)
        return self.aligner(self.vision_model(pixel_values))

    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def splice(self, input_ids: torch.Tensor, image_mask: torch.Tensor, pixel_values: torch.Tensor | None,
               features: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with the image-placeholder positions (image_mask, (B, T) bool) overwritten,
        in order, by the features of `pixel_values` (N images, N*n_tokens == image_mask.sum()), or by
        `features` (N, n_tokens, dim) from image_embeds when given (an image used by several rows)."""
        if features is not None:
            pixel_values = features
        if pixel_values is None or pixel_values.shape[0] == 0:
            if image_mask.any():
                raise ValueError("image placeholders in the prompt but no images given")
            return self.text_embeds(input_ids)
        # The vision tower before the text embedding: under FSDP every rank must gather its units in one order,
        # and a batch without images runs the tower idle before the embedding too (train.losses).
        feats = self.image_embeds(pixel_values) if features is None else features
        h = self.text_embeds(input_ids)
        feats = feats.to(h.dtype).reshape(-1, h.shape[-1])
        if feats.shape[0] != int(image_mask.sum()):
            raise ValueError(f"{int(image_mask.sum())} image placeholder positions but {pixel_values.shape[0]} "
                             f"images give {feats.shape[0]} embeddings")
        return h.masked_scatter(image_mask[..., None], feats)

    def mixed_embeds(self, input_ids: torch.Tensor, und_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                     gen_mask: torch.Tensor, gen_ids: torch.Tensor) -> torch.Tensor:
        """Training inputs: text embeddings, understanding features at `und_mask` slots, and VQ-token
        embeddings (gen_embed -> gen_aligner) of `gen_ids` at `gen_mask` slots."""
        h = self.splice(input_ids, und_mask, pixel_values)
        if bool(gen_mask.any()):
            h = h.masked_scatter(gen_mask[..., None], self.gen_embeds(gen_ids[gen_mask]).to(h.dtype))
        return h

    def gen_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """VQ ids (...,) -> LLM input embeddings (..., dim): the separate learned table, then the MLP."""
        return self.gen_aligner(self.gen_embed(ids))

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gen_head(hidden)
