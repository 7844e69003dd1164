"""Small pieces shared by the Janus and JanusFlow models: RMSNorm and the MLP projector (aligner)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, scale in the input dtype (same rounding as transformers)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MlpProjector(nn.Module):
    """Official `MlpProjector` of type mlp_gelu: Linear, then (depth-1) x [exact GELU, Linear].

    Kept as a Sequential named `layers` so the keys are `layers.0`, `layers.2` as in the checkpoints.
    """

    def __init__(self, input_dim: int, n_embed: int, depth: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Linear(input_dim, n_embed)]
        for _ in range(depth - 1):
            mods += [nn.GELU(), nn.Linear(n_embed, n_embed)]
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VisionHead(nn.Module):
    """Official `vision_head`: LLM hidden -> image-token logits (Linear, exact GELU, Linear)."""

    def __init__(self, n_embed: int, image_token_embed: int, image_token_size: int) -> None:
        super().__init__()
        self.output_mlp_projector = nn.Linear(n_embed, image_token_embed)
        self.vision_head = nn.Linear(image_token_embed, image_token_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_head(torch.nn.functional.gelu(self.output_mlp_projector(x)))
