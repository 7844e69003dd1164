"""JanusFlow's generation encoder and decoder around the LLM (official `ShallowUViTEncoder` / `Decoder`).

Encoder: VAE latent (B, 4, 48, 48) -> 2x2 patchify conv -> ConvNeXt blocks modulated by the timestep
embedding -> a (B, 768, 24, 24) grid (576 LLM tokens after the aligner), kept also as the skip.
Decoder: the LLM's grid (RMSNorm) concatenated with the skip -> ConvNeXt blocks -> RMSNorm, 1x1 conv,
pixel shuffle x2 -> velocity (B, 4, 48, 48).
Key names follow the checkpoints (`time_embed.linear_1`, `mid_block.res_blocks.N.depthwise`, ...).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UViTDecoderConfig, UViTEncoderConfig
from .layers import RMSNorm


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps on the 0..1000 scale -> (B, dim) [cos | sin] features, frequencies
    exp(-ln(max_period) * k / (dim/2)) (diffusers `Timesteps(dim, flip_sin_to_cos=True, shift 0)`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC: x * (1 + weight * n) + bias, n = per-channel spatial L2 norm divided by
    its mean over channels. Zero-initialised, so a fresh block starts as the identity here."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(self.bias, self.weight * n + 1, x)


class ConvNextBlock(nn.Module):
    """Depthwise 7x7 -> RMSNorm -> Linear x4 -> GELU -> GRN -> Linear, residual; then the timestep
    modulation x * (1 + scale) + shift, applied after the residual add (as the reference does)."""

    def __init__(self, channels: int, cond_dim: int, eps: float, bias: bool = True, ffn: int = 4) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels, bias=bias)
        self.norm = RMSNorm(channels, eps)
        self.channelwise_linear_1 = nn.Linear(channels, ffn * channels, bias=bias)
        self.channelwise_norm = GlobalResponseNorm(ffn * channels)
        self.channelwise_linear_2 = nn.Linear(ffn * channels, channels, bias=bias)
        self.cond_embeds_mapper = nn.Linear(cond_dim, 2 * channels, bias=bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)  # NHWC for the channel-wise part
        h = self.channelwise_linear_1(self.norm(h))
        h = self.channelwise_linear_2(self.channelwise_norm(F.gelu(h)))
        x = x + h.permute(0, 3, 1, 2)
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)
        return torch.addcmul(shift[:, :, None, None], x, 1 + scale[:, :, None, None])


class MidBlock(nn.Module):
    def __init__(self, channels: int, n: int, cond_dim: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList([ConvNextBlock(channels, cond_dim, eps, bias) for _ in range(n)])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for blk in self.res_blocks:
            x = blk(x, cond)
        return x


def _channel_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Unpatchify(nn.Module):
    """RMSNorm over channels, 1x1 conv to out * 2 * 2 channels, pixel shuffle x2."""

    def __init__(self, in_channels: int, out_channels: int, eps: float, bias: bool, patch: int = 2) -> None:
        super().__init__()
        self.norm = RMSNorm(in_channels, eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch * patch, kernel_size=1, bias=bias)
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.unpatch_conv(_channel_norm(self.norm, x)), self.patch)


class ShallowUViTEncoder(nn.Module):
    def __init__(self, c: UViTEncoderConfig) -> None:
        super().__init__()
        self.time_dim = c.block_out_channels[0]
        self.time_embed = TimestepEmbedding(self.time_dim, c.hidden_size, bias=c.use_bias)
        self.in_conv = nn.Conv2d(c.input_channels, c.block_out_channels[0], kernel_size=c.kernel_size,
                                 stride=c.stride, padding=c.padding)
        self.mid_block = (MidBlock(c.width, c.layers_in_middle, c.hidden_size, c.norm_eps, c.use_bias)
                          if c.use_mid_block else None)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, C, H, W) latents, t (B,) timesteps on the 0..1000 scale -> grid (B, width, H/2, W/2)
        (also the decoder's skip input) and the timestep embedding (B, hidden_size)."""
        t_emb = self.time_embed(timestep_sinusoid(t, self.time_dim).to(z.dtype))
        x = self.in_conv(z)
        if self.mid_block is not None:
            x = self.mid_block(x, t_emb)
        return x, t_emb


class ShallowUViTDecoder(nn.Module):
    def __init__(self, c: UViTDecoderConfig) -> None:
        super().__init__()
        ch = c.in_channels + c.block_out_channels[-1]  # LLM grid + skip, concatenated
        self.mid_block = (MidBlock(ch, c.layers_in_middle, c.hidden_size, c.norm_eps, c.use_bias)
                          if c.use_mid_block else None)
        self.out_convs = nn.ModuleList()
        for i in range(c.upsamples):
            last = i == c.upsamples - 1
            self.out_convs.append(Unpatchify(ch if i == 0 else c.block_out_channels[-1],
                                             c.out_channels if last else c.block_out_channels[-1], c.norm_eps, c.use_bias))
        self.input_norm = RMSNorm(c.in_channels, c.norm_eps)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, h, w) from the LLM, skip = the encoder grid -> velocity (B, C, 2h, 2w)."""
        x = torch.cat([_channel_norm(self.input_norm, x), skip], dim=1)
        if self.mid_block is not None:
            x = self.mid_block(x, t_emb)
        for conv in self.out_convs:
            x = conv(x)
        return x
