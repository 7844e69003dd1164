"""Linear layers with int8 or int4 weights, for inference (torch's weight-only kernels, kernels.py).

A QuantLinear holds its weight in the kernel's layout (the int4 one is opaque and differs between CPU
and CUDA), so it has no state-dict form: state_dict() raises, naming the layer, instead of silently
leaving the weights out of a save. Quantised folders are written from the float checkpoint
(januskit.quantization.quantize_folder) and read back through `from_parts`.
"""
from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .spec import QuantizationError, QuantSpec


class QuantLinear(nn.Module):
    """y = x W^T + b with W quantised; x of any shape (..., in_features) and any float dtype (cast to
    the layer's compute dtype and back). Subclasses provide `_mm` on (rows, in_features)."""

    method = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype), persistent=False)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._mm(x.reshape(-1, self.in_features).to(self.dtype).contiguous())  # (rows, K) -> (rows, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the scales' (model.to(dtype) casts them, never the integer weights)."""
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        raise QuantizationError(f"{prefix.rstrip('.')} is {self.method}-quantised for inference: its weights are "
                                "in the kernel's layout, with no state-dict form (nothing can save or train this "
                                "model); write a quantised folder from the float checkpoint instead "
                                "(`januskit quantize SRC DST`)")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    method = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias, dtype)
        self.register_buffer("qweight", kernels.aligned(qweight), persistent=False)  # (N, K) int8: the kernel's layout too
        self.register_buffer("scales", kernels.aligned(scales.to(dtype)), persistent=False)  # (N,)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_mm(x, self.qweight, self.scales)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype


class Int4Linear(QuantLinear):
    method = "int4"

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, group_size: int,
                 bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(in_features, scales_and_zeros.shape[1], bias, dtype)
        self.group_size = group_size
        self.layout = packed.device.type  # the packed layout is the device's own: CPU and CUDA differ
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)  # (K/g, N, 2)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.layout:
            raise QuantizationError(f"this int4 layer was packed for {self.layout}, not {x.device.type}: the "
                                    "kernels' layouts differ; quantise the model on the device it runs on")
        return kernels.int4_mm(x, self.packed, self.group_size, self.scales_and_zeros)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def from_parts(spec: QuantSpec, parts: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> QuantLinear:
    """The layer for the portable tensors of one Linear (codec.py), computing in `dtype` on `device`
    (the CUDA int4 kernel takes bfloat16 only: its layers compute in bfloat16 whatever `dtype`)."""
    device = torch.device(device)
    bias = None if bias is None else bias.to(device)
    if spec.method == "int8":
        return Int8Linear(parts["qweight"].to(device), parts["scales"].to(device), bias, dtype)
    if device.type == "cuda":
        dtype = torch.bfloat16
    packed = kernels.int4_pack(parts["qweight"], device)
    sz = kernels.int4_scales_and_zeros(parts["scales"], parts["mins"], dtype).to(device)
    return Int4Linear(packed, sz, parts["qweight"].shape[1] * 2, spec.group_size, bias, dtype)
