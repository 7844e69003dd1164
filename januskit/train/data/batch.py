"""The one batch type training consumes: packed rows of mixed understanding / text / generation / edit samples.

Labels are already shifted: `text_labels[b, t]` is the token the LM head must predict from the hidden
state at slot t (likewise `image_labels` for the gen head); -100 means no loss at that slot.
JanusFlow generation and edit samples instead fill `flow_mask` slots (the timestep token, then the latent grid)
from their clean latents; the noise and t are drawn in the loss from each sample's `flow_seeds`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE = -100


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, T) long: text ids; any id at image slots (their embedding is replaced)
    positions: torch.Tensor  # (B, T) long: RoPE positions, restarting at 0 for every packed sample
    doc_ids: torch.Tensor  # (B, T) long: sample index within its row, -1 on padding
    und_mask: torch.Tensor  # (B, T) bool: slots filled by understanding features (SigLIP -> aligner)
    pixel_values: torch.Tensor | None  # (N, 3, S, S) understanding images, in slot order
    gen_mask: torch.Tensor  # (B, T) bool: slots whose input is a VQ token (gen_embed -> gen_aligner)
    gen_ids: torch.Tensor  # (B, T) long: VQ ids at gen_mask slots, 0 elsewhere
    text_labels: torch.Tensor  # (B, T) long: LM-head targets, IGNORE where no text loss
    image_labels: torch.Tensor  # (B, T) long: gen-head targets, IGNORE where no image loss
    kinds: torch.Tensor | None = None  # (B, T) long: records.KIND_CODE (0 und, 1 text, 2 gen, 3 edit), -1 pad
    flow_mask: torch.Tensor | None = None  # (B, T) bool: per flow sample 1 + n_gen slots [t_emb, grid tokens]
    flow_latents: torch.Tensor | None = None  # (M, C, H, W) clean (scaled) VAE latents, in slot order
    flow_seeds: torch.Tensor | None = None  # (M,) long: seed of each sample's noise and t
    repa_pixels: torch.Tensor | None = None  # (M, 3, S, S) the same images for the understanding encoder (REPA)
    text_weights: torch.Tensor | None = None  # (B, T) float: weight of each text_labels target; None = all 1

    def to(self, device: torch.device | str) -> "TrainBatch":
        return TrainBatch(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                             for f in fields(self)})

    @property
    def n_flow(self) -> int:
        return 0 if self.flow_latents is None else int(self.flow_latents.shape[0])

    @property
    def n_tokens(self) -> int:
        return int((self.doc_ids >= 0).sum())

    @property
    def packing_efficiency(self) -> float:
        """Share of slots holding real tokens (not padding)."""
        return self.n_tokens / self.doc_ids.numel()
