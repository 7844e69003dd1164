"""VQ-16 image tokenizer (the LlamaGen tokenizer Janus uses for generation).

Encoder: conv_in, five levels of ResnetBlocks (attention at the last level), four stride-2
downsamplings (factor 16), mid (res, attn, res), GN, swish, conv_out, quant_conv to the 8-dim code
space. Quantiser: codes and codebook both L2-normalised, nearest neighbour. Decoder mirrors it with
one more ResnetBlock per level and nearest x2 upsampling. Keys follow `gen_vision_model.*`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQ_NORMS, VQConfig


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, scale C^-0.5, 1x1 conv projections."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only, as the reference


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest is exact in any dtype; the reference's detour through float32 then bfloat16 gives the
        # same values in bf16 and breaks fp16, so we stay in the input dtype.
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: `res` blocks, optional `attn` blocks after each, optional resampler."""

    def __init__(self, cin: int, cout: int, n: int, attn: bool, resample: type[nn.Module] | None, name: str) -> None:
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout) for i in range(n)])
        self.attn = nn.ModuleList([AttnBlock(cout) for _ in range(n)] if attn else [])
        if resample is not None:
            self.add_module(name, resample(cout))
        self._resample = name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self._resample)(x) if self._resample else x


def _mid(c: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])


class Encoder(nn.Module):
    def __init__(self, c: VQConfig) -> None:
        super().__init__()
        n = len(c.ch_mult)
        chans = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList([
            Level(c.ch if i == 0 else chans[i - 1], chans[i], c.num_res_blocks, attn=i == n - 1,
                  resample=Downsample if i < n - 1 else None, name="downsample")
            for i in range(n)])
        self.mid = _mid(chans[-1])
        self.norm_out = _norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VQConfig) -> None:
        super().__init__()
        n = len(c.ch_mult)
        chans = [c.ch * m for m in reversed(c.ch_mult)]  # 512, 256, 256, 128, 128 for VQ-16
        self.conv_in = nn.Conv2d(c.z_channels, chans[0], 3, padding=1)
        self.mid = _mid(chans[0])
        self.conv_blocks = nn.ModuleList([
            Level(chans[0] if i == 0 else chans[i - 1], chans[i], c.num_res_blocks + 1, attn=i == 0,
                  resample=Upsample if i < n - 1 else None, name="upsample")
            for i in range(n)])
        self.norm_out = _norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, c: VQConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(c.codebook_size, c.codebook_dim)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents -> (B, H*W) ids: argmin of squared distance between L2-normalised vectors."""
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), p=2, dim=-1)
        e = self.codebook()
        # Same expansion as the reference (|z|^2 + |e|^2 - 2 z.e), so ties resolve identically.
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
        return d.argmin(1).view(z.shape[0], -1)

    def lookup(self, ids: torch.Tensor, grid: int) -> torch.Tensor:
        """(B, grid*grid) ids -> (B, C, grid, grid) normalised code vectors (row-major token order)."""
        z = self.codebook()[ids]
        return z.view(ids.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


class PositionNorm(nn.GroupNorm):
    """GroupNorm's parameters (same state-dict entries), statistics over the channels at each position: no
    statistic spans the image (VQConfig.norm = "position")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class AffineOnly(nn.GroupNorm):
    """GroupNorm's parameters, no statistics: x * weight + bias per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _position_norms(module: nn.Module, outputs: type[nn.GroupNorm]) -> None:
    """Every GroupNorm becomes a PositionNorm, except the encoder's and decoder's norm_out (on the main path,
    not in a residual branch), which become `outputs`."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            kind = outputs if name == "norm_out" else PositionNorm
            setattr(module, name, kind(child.num_groups, child.num_channels, eps=child.eps))
        else:
            _position_norms(child, outputs)


class VQModel(nn.Module):
    def __init__(self, c: VQConfig) -> None:
        super().__init__()
        if c.norm not in VQ_NORMS:
            raise ValueError(f"VQConfig.norm: {c.norm!r} is not one of {', '.join(VQ_NORMS)}")
        self.config = c
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.norm != "group":
            _position_norms(self, PositionNorm if c.norm == "position" else AffineOnly)
        self.quantize = VectorQuantizer(c)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_dim, c.z_channels, 1)

    def encode_latent(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(pixel_values))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels in [-1, 1] -> (B, (S / factor)^2) token ids (factor 16 for the real models)."""
        return self.quantize.nearest(self.encode_latent(pixel_values.to(self.quant_conv.weight.dtype)))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, n_tokens) ids -> (B, 3, S, S) pixels, nominally in [-1, 1]."""
        grid = int(round(ids.shape[1] ** 0.5))
        if grid * grid != ids.shape[1]:
            raise ValueError(f"image tokens: {ids.shape[1]} tokens per image is not a square grid")
        return self.decoder(self.post_quant_conv(self.quantize.lookup(ids, grid)))
