"""Optional CPU inference speed-up: Linear weights prepacked in oneDNN's blocked layout.

Decoding is bound by reading weights, and plain F.linear with the 2-8 rows of a CFG decode step
reaches only a third of this CPU's bandwidth; prepacked weights roughly double it (bench/README.md).
Applied from outside to a loaded model, in place; a packed model is for inference only (its weights
are in an opaque layout, so saving it is refused). The ops are private to torch: when they are
missing, or the CPU cannot pack the weights' dtype (bf16 without native bf16), `pack_linears` leaves
the model unchanged and returns 0.
"""
from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    def __init__(self, lin: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(w, rows_hint), persistent=False)
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed_weight, self.bias,
                                               "none", [None], "")
        return y.view(*x.shape[:-1], self.out_features)


def available() -> bool:
    return (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.mkldnn.is_available())


def supports(dtype: torch.dtype) -> bool:
    """Whether this CPU packs weights of `dtype`: float32 wherever the ops exist; bfloat16 only with native
    bf16 support (oneDNN refuses the bf16 reorder on an AVX2-only CPU)."""
    if not available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def pack_linears(module: nn.Module, rows_hint: int = 2) -> int:
    """Replace every CPU nn.Linear below `module` whose dtype this CPU packs (`supports`) by a
    PackedLinear; returns how many were replaced (0: the model is left as it was)."""
    if not available():
        return 0
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.weight.device.type == "cpu" and supports(child.weight.dtype):
            setattr(module, name, PackedLinear(child, rows_hint))
            n += 1
        else:
            n += pack_linears(child, rows_hint)
    module.packed_for_cpu = n > 0 or getattr(module, "packed_for_cpu", False)
    return n
