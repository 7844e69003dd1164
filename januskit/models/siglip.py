"""SigLIP ViT understanding encoder, as the official `CLIPVisionTower` runs it (a timm ViT).

Patch conv, learned absolute positions (no class token), pre-norm blocks with a fused qkv, exact
GELU, LayerNorm eps 1e-6, final LayerNorm; the attention-pool head is never executed and not built.
Keys follow `vision_model.vision_tower.*` of the official checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SigLIPConfig


class PatchEmbed(nn.Module):
    def __init__(self, c: SigLIPConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C), raster order


class Attention(nn.Module):
    def __init__(self, c: SigLIPConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, c: SigLIPConfig) -> None:
        super().__init__()
        hidden = int(c.width * c.mlp_ratio)
        self.fc1 = nn.Linear(c.width, hidden)
        self.fc2 = nn.Linear(hidden, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU: the official code hard-codes nn.GELU


class Block(nn.Module):
    def __init__(self, c: SigLIPConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width, eps=1e-6)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.width, eps=1e-6)
        self.mlp = Mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, c: SigLIPConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(c)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.n_tokens, c.width))
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.width, eps=1e-6)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, N, width) features after the final LayerNorm."""
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype)) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class VisionTower(nn.Module):
    """Wrapper that only exists so keys read `vision_model.vision_tower.*`."""

    def __init__(self, c: SigLIPConfig) -> None:
        super().__init__()
        self.vision_tower = VisionTransformer(c)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixel_values)
