"""Float weights to the portable quantised tensors and back (the arithmetic, no kernels).

int8: symmetric, one scale per output channel: w ~ qweight * scales[:, None], qweight in [-127, 127].
int4: asymmetric, one scale and one minimum per group of `group_size` input columns:
w ~ q * scales + mins with q in [0, 15]; qweight (N, K/2) uint8 holds two q per byte, the even column
in the high nibble (the layout torch's CUDA packer and torchao take; the CPU packer's is opaque).
Scales and mins are rounded to the weight's dtype first and q is computed against the rounded values,
so what is stored is exactly what the kernels use. Rows are processed in chunks: the float32
temporaries stay small whatever the matrix (a 7B text head is 400M weights).
"""
from __future__ import annotations

import torch

_CHUNK_WEIGHTS = 1 << 24  # weights per chunk: 64 MB of float32


def _rows_per_chunk(k: int) -> int:
    return max(1, _CHUNK_WEIGHTS // k)


def quantize(w: torch.Tensor, method: str, group_size: int | None) -> dict[str, torch.Tensor]:
    """The portable tensors of one weight (N, K): quantize_int8 or quantize_int4."""
    return quantize_int8(w) if method == "int8" else quantize_int4(w, group_size)


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w (N, K) float -> qweight (N, K) int8, scales (N,) in w's dtype."""
    n, k = w.shape
    qweight = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scales = torch.empty(n, dtype=w.dtype, device=w.device)
    step = _rows_per_chunk(k)
    for r0 in range(0, n, step):
        w32 = w[r0:r0 + step].to(torch.float32, copy=True)  # a copy: worked on in place below
        s = (w32.abs().amax(dim=1) / 127).to(w.dtype)
        scales[r0:r0 + step] = s
        s32 = s.float().masked_fill(s == 0, 1.0)  # an all-zero row: q = 0 whatever the divisor
        qweight[r0:r0 + step] = w32.div_(s32[:, None]).round_().clamp_(-127, 127)
    return {"qweight": qweight, "scales": scales}


def quantize_int4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """w (N, K) float -> qweight (N, K/2) uint8, scales and mins (N, K/group_size) in w's dtype."""
    n, k = w.shape
    groups = k // group_size
    qweight = torch.empty((n, k // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((n, groups), dtype=w.dtype, device=w.device)
    mins = torch.empty((n, groups), dtype=w.dtype, device=w.device)
    step = _rows_per_chunk(k)
    for r0 in range(0, n, step):
        wg = w[r0:r0 + step].to(torch.float32, copy=True).view(-1, groups, group_size)  # (rows, K/g, g), in place below
        lo, hi = torch.aminmax(wg, dim=-1)
        s, m = ((hi - lo) / 15).to(w.dtype), lo.to(w.dtype)
        scales[r0:r0 + step], mins[r0:r0 + step] = s, m
        s32 = s.float().masked_fill(s == 0, 1.0)  # a constant group: q = 0, w = min exactly
        q = wg.sub_(m.float()[..., None]).div_(s32[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        qweight[r0:r0 + step] = pack_nibbles(q.view(-1, k))
    return {"qweight": qweight, "scales": scales, "mins": mins}


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 values 0..15 -> (N, K/2) uint8, column 2j in the high nibble of byte j."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15 (inverse of pack_nibbles)."""
    return torch.stack([qweight >> 4, qweight & 15], dim=-1).view(qweight.shape[0], -1)


def dequantize(parts: dict[str, torch.Tensor], group_size: int | None = None) -> torch.Tensor:
    """The float32 weight the portable tensors stand for (the reference the kernels are tested against)."""
    if "mins" not in parts:
        return parts["qweight"].float() * parts["scales"].float()[:, None]
    q = unpack_nibbles(parts["qweight"]).float()
    n, k = q.shape
    w = q.view(n, k // group_size, group_size) * parts["scales"].float()[..., None] + parts["mins"].float()[..., None]
    return w.view(n, k)
