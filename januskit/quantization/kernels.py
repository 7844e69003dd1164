"""torch's weight-only matmul kernels, wrapped: int8 per output channel, and int4 in groups along K.

The ops are private to torch (aten `_weight_int8pack_mm`, `_weight_int4pack_mm[_for_cpu]`) and their
shape limits are nowhere documented; `unsupported` states the ones found by testing torch 2.13 on CPU,
so a layer is refused before the kernel sees it (the int8 kernel does not raise on a bad K: it
crashes the process). The int4 kernels dequantise as (q - 8) * scale + zero: zero = min + 8 * scale.
"""
from __future__ import annotations

import functools

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what both int4 kernels accept
_PACK_ROWS = 64  # the CPU int4 packer lays rows out in blocks of 64 (when N is a multiple of 64)
_CHUNK_WEIGHTS = 1 << 22  # weights per packing chunk: bounds the int32 temporary at 16 MB


def unsupported(method: str, out_features: int, in_features: int, group_size: int | None) -> str | None:
    """Why the kernels cannot run a Linear of this shape, or None when they can."""
    if method == "int8":
        if in_features % 16:  # the CPU kernel reads K in blocks of 16 and segfaults otherwise
            return f"in_features {in_features} is not a multiple of 16 (int8 kernel)"
        return None
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of the group size {group_size}"
    if out_features % 16:  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
        return f"out_features {out_features} is not a multiple of 16 (int4 kernel)"
    return None


# The CPU int8 kernel reads its weight and activations with aligned vector loads and segfaults on data
# that does not start on a 16-byte boundary (past ~16 rows; found by testing): a tensor mapped from a
# safetensors file may not, nor a contiguous view at an odd offset. Such tensors are copied (the
# allocator aligns to 64 bytes).

def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it when its data does not start on a 64-byte boundary (a layer's weights)."""
    return t if t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


def _aligned_input(x: torch.Tensor) -> torch.Tensor:
    """Activations: checked as `aligned` does, except under torch.compile, which cannot trace a data
    pointer: there they always go through a buffer of the compiled graph's own (usually fused into the
    op that makes them)."""
    return x.clone() if torch.compiler.is_compiling() else aligned(x)


# -- int8 -----------------------------------------------------------------------------------------

def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (rows, K) @ (qweight (N, K) int8 * scales (N,))^T; x and scales in the same dtype."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int8pack_mm(_aligned_input(x), qweight, scales)
    # off the CPU (not tested here): dequantise, a temporary float copy of the layer per call
    return torch.nn.functional.linear(x, qweight.to(x.dtype) * scales[:, None])


# -- int4 -----------------------------------------------------------------------------------------

def int4_pack(qweight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The kernel's opaque layout on `device` from the portable one: qweight (N, K/2) uint8, two
    4-bit values per byte, the even column in the high nibble (codec.pack_nibbles)."""
    if device.type == "cuda":
        # the CUDA packer takes exactly this uint8 layout; inner k-tiles: the most K allows
        k = qweight.shape[1] * 2
        tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        return torch.ops.aten._convert_weight_to_int4pack(qweight.to(device).contiguous(), tiles)
    n = qweight.shape[0]
    if n % _PACK_ROWS or not _rows_pack_alone():
        return _cpu_pack(qweight)
    # Row blocks are packed independently, so pack in chunks: the int32 input the op wants would
    # otherwise be 8x the packed layer (1.6 GB for a 7B text head).
    step = max(_PACK_ROWS, _CHUNK_WEIGHTS // (2 * qweight.shape[1]) // _PACK_ROWS * _PACK_ROWS)
    out = None
    for r0 in range(0, n, step):
        part = _cpu_pack(qweight[r0:r0 + step])
        if out is None:
            out = torch.empty((n, *part.shape[1:]), dtype=part.dtype)
        out[r0:r0 + part.shape[0]] = part
    return out


def _cpu_pack(qweight: torch.Tensor) -> torch.Tensor:
    q = torch.empty((qweight.shape[0], qweight.shape[1] * 2), dtype=torch.int32)  # (N, K) values 0..15
    q[:, 0::2], q[:, 1::2] = qweight >> 4, qweight & 15
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


@functools.cache
def _rows_pack_alone() -> bool:
    """Whether this torch packs each block of 64 rows on its own (checked once, on a small matrix),
    which chunked packing relies on; the layout is private to torch and may change."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (2 * _PACK_ROWS, 32), dtype=torch.uint8, generator=g)
    return torch.equal(_cpu_pack(q), torch.cat([_cpu_pack(q[:_PACK_ROWS]), _cpu_pack(q[_PACK_ROWS:])]))


def int4_scales_and_zeros(scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(K/g, N, 2) [scale, zero] in `dtype` from the portable (N, K/g) scales and mins; the kernel's
    zero is the value of q = 8 (it computes (q - 8) * scale + zero)."""
    s, m = scales.float(), mins.float()
    return torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x (rows, K) @ dequantised weight^T; x and scales_and_zeros in the same dtype (bf16 on CUDA)."""
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
