"""JanusFlow: how the parts connect (official `janusflow` `MultiModalityCausalLM`).

Understanding: pixels -> SigLIP -> Linear -> 576 embeddings, preceded by the learned `beg_of_und_embed`
in the <begin_of_image> slot (detached, as in the reference: no gradient reaches it on this path).
Generation (one rectified-flow velocity evaluation): latent z_t, t -> ShallowUViT encoder -> grid tokens
-> Linear -> LLM input [t_emb, grid tokens] after the prompt; the LLM's outputs at the grid positions
-> RMSNorm -> Linear -> decoder (with the encoder's grid as skip) -> velocity.
Attribute names are the checkpoint's top-level prefixes, in the official construction order.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import JanusFlowConfig
from .layers import RMSNorm
from .llama import LlamaForCausalLM
from .siglip import VisionTower
from .uvit import ShallowUViTDecoder, ShallowUViTEncoder


class JanusFlowModel(nn.Module):
    def __init__(self, c: JanusFlowConfig) -> None:
        super().__init__()
        self.config = c
        d = c.llm.dim
        self.vision_und_enc_model = VisionTower(c.vision)
        self.vision_und_enc_aligner = nn.Linear(c.vision.width, d)
        self.beg_of_und_embed = nn.Parameter(torch.zeros(1, d))
        self.vision_gen_enc_model = ShallowUViTEncoder(c.gen_enc)
        self.vision_gen_enc_aligner = nn.Linear(c.gen_enc.width, d)
        self.vision_gen_dec_model = ShallowUViTDecoder(c.gen_dec)
        self.language_model = LlamaForCausalLM(c.llm)
        self.vision_gen_dec_aligner_norm = RMSNorm(d, c.llm.norm_eps)
        self.vision_gen_dec_aligner = nn.Linear(d, c.gen_dec.in_channels)

    @property
    def llm(self) -> nn.Module:
        return self.language_model.model

    # -- understanding (same interface as JanusModel, so the text sampler and trainer take both) -----
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, 1 + n_und_tokens, dim): beg_of_und_embed, then the projected features."""
        feats = self.vision_und_enc_aligner(self.vision_und_enc_model(pixel_values))
        beg = self.beg_of_und_embed.detach().to(feats.dtype).expand(feats.shape[0], 1, -1)
        return torch.cat([beg, feats], dim=1)

    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def splice(self, input_ids: torch.Tensor, image_mask: torch.Tensor, pixel_values: torch.Tensor | None,
               features: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with each image's slots overwritten: `image_mask` marks the placeholders (as
        the shared processor makes them); the slot just before each run (<begin_of_image>) takes
        beg_of_und_embed, as the reference's images_seq_mask covers it too. `features`: image_embeds'
        output, when given instead of the pixels (an image used by several rows)."""
        if features is not None:
            pixel_values = features
        if pixel_values is None or pixel_values.shape[0] == 0:
            if image_mask.any():
                raise ValueError("image placeholders in the prompt but no images given")
            return self.text_embeds(input_ids)
        starts = image_mask & ~torch.nn.functional.pad(image_mask, (1, 0))[:, :-1]
        if bool(starts[:, 0].any()):
            raise ValueError("an image run starts at slot 0: no <begin_of_image> slot before it")
        mask = image_mask | starts.roll(-1, dims=1)
        feats = self.image_embeds(pixel_values) if features is None else features  # before the text: FSDP unit order
        h = self.text_embeds(input_ids)
        feats = feats.to(h.dtype).reshape(-1, h.shape[-1])
        if feats.shape[0] != int(mask.sum()):
            raise ValueError(f"{int(image_mask.sum())} image placeholder positions but {pixel_values.shape[0]} "
                             f"images give {feats.shape[0] - pixel_values.shape[0]} embeddings")
        return h.masked_scatter(mask[..., None], feats)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    # -- generation -----------------------------------------------------------------------------
    def gen_inputs(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, C, H, W) latents at time t (B,) in [0, 1] -> LLM inputs (B, 1 + n_gen, dim) =
        [t_emb, grid tokens], the encoder grid (the decoder's skip) and t_emb. The encoder takes t on
        the reference's 0..1000 scale."""
        dtype = self.vision_gen_enc_aligner.weight.dtype
        grid, t_emb = self.vision_gen_enc_model(z.to(dtype), t * 1000)
        tokens = self.vision_gen_enc_aligner(grid.flatten(2).transpose(1, 2))  # raster order
        return torch.cat([t_emb[:, None].to(tokens.dtype), tokens], dim=1), grid, t_emb

    def velocity(self, hidden: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """LLM outputs at the n_gen grid positions (B, n_gen, dim) -> velocity (B, C, H, W)."""
        g = self.config.grid
        x = self.vision_gen_dec_aligner(self.vision_gen_dec_aligner_norm(hidden))
        x = x.view(x.shape[0], g, g, -1).permute(0, 3, 1, 2)
        return self.vision_gen_dec_model(x, skip, t_emb)
