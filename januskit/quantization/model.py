"""Quantise a loaded model in place: each covered nn.Linear becomes a QuantLinear (spec.plan picks
them). The streaming loader (load.py) builds the very same layers from the same codec, so a model
quantised here and one loaded quantised are bit-identical."""
from __future__ import annotations

import torch
from torch import nn

from .codec import quantize
from .qlinear import QuantLinear, from_parts
from .spec import QuantizationError, QuantSpec, plan


def quantize_model(model: nn.Module, method: str, group_size: int | None = 128, strict: bool = False) -> QuantSpec:
    """Replace the LLM's Linear layers, its text head and the image head of a JanusModel /
    JanusFlowModel by `method` ("int8" | "int4") layers computing in each layer's dtype; returns what
    was done. Layers the kernels cannot run stay as they are, with a warning (`strict`: raise)."""
    if any(getattr(m, "packed_for_cpu", False) for m in model.modules()):
        raise QuantizationError("this model is prepacked for oneDNN (pack_for_cpu): quantise before packing")
    if done := quantized_modules(model):
        raise QuantizationError(f"this model is already quantised ({len(done)} layers, e.g. {done[0]})")
    spec = plan(model, method, group_size, strict)
    for name in spec.modules:
        lin = model.get_submodule(name)
        with torch.no_grad():
            parts = quantize(lin.weight, spec.method, spec.group_size)
        set_module(model, name, from_parts(spec, parts, lin.bias, lin.weight.dtype, lin.weight.device))
    return spec


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the model's QuantLinear layers (empty: not quantised)."""
    return [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)
