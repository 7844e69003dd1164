"""What a quantisation is: the method, the group size, and which Linear layers it covers.

`plan` picks the layers (every nn.Linear of the LLM, its text head `lm_head` and the image head
`gen_head`; embeddings, norms, the vision tower, aligners and VQ / VAE stay in the compute dtype) and
sets aside, by name and with the reason, those the kernels cannot run. The same QuantSpec is the
`quantization` entry of a quantised folder's config.json, and names the tensors each layer stores:

    <layer>.qweight  int8 (N, K)           | uint8 (N, K/2), two 4-bit values a byte (codec.py)
    <layer>.scales   (N,) per channel       | (N, K/group_size)
    <layer>.mins     -                      | (N, K/group_size)
    <layer>.bias     unchanged, when the layer has one
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, Fields
from .kernels import INT4_GROUP_SIZES, unsupported

METHODS = {"int8": 8, "int4": 4}  # method -> bits
QUANTIZED_PARTS = ("language_model.", "gen_head.")  # module-name prefixes whose Linear layers are quantised
PART_NAMES = ("qweight", "scales", "mins")  # every tensor name a quantised layer may store (bias aside)
QWEIGHT_DTYPES = {"int8": torch.int8, "int4": torch.uint8}


class QuantizationError(ValueError):
    """A model, layer or folder that cannot be quantised (or used quantised) as asked; names the layer."""


@dataclass(frozen=True)
class QuantSpec:
    method: str  # "int8" | "int4"
    group_size: int | None  # int4: input columns per scale; int8: None (one scale per output channel)
    modules: tuple[str, ...]  # the quantised Linear layers, by module name
    kept: tuple[tuple[str, str], ...] = ()  # (layer, why) left in the compute dtype: the kernels cannot run them

    @property
    def bits(self) -> int:
        return METHODS[self.method]

    def describe(self) -> str:
        return self.method + (f" (group size {self.group_size})" if self.group_size else " (per channel)")

    @property
    def part_names(self) -> tuple[str, ...]:
        return PART_NAMES if self.method == "int4" else PART_NAMES[:2]

    def part_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """The stored tensors of one layer (bias aside) and their shapes."""
        n, k = out_features, in_features
        if self.method == "int8":
            return {"qweight": (n, k), "scales": (n,)}
        return {"qweight": (n, k // 2), "scales": (n, k // self.group_size), "mins": (n, k // self.group_size)}

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "scheme": "symmetric per output channel" if self.method == "int8" else "asymmetric per group",
                "modules": list(self.modules), "kept_in_float": dict(self.kept)}

    @classmethod
    def from_json(cls, d: Any, where: str) -> QuantSpec:
        f = Fields(d, where, "quantization")
        method = f.string("method")
        if method not in METHODS:
            f.fail("method", f"{method!r} is not one of {', '.join(METHODS)}")
        if f.integer("bits", hi=64) != METHODS[method]:
            f.fail("bits", f"must be {METHODS[method]} for {method}")
        group_size = None
        if method == "int4":
            group_size = f.integer("group_size", hi=4096)
            if group_size not in INT4_GROUP_SIZES:
                f.fail("group_size", f"must be one of {INT4_GROUP_SIZES}, got {group_size}")
        elif f.has("group_size"):
            f.fail("group_size", "must be null for int8 (one scale per output channel)")
        modules = f.d.get("modules")
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            f.fail("modules", "must be a non-empty list of layer names")
        if len(set(modules)) != len(modules):
            f.fail("modules", "lists a layer twice")
        kept = f.d.get("kept_in_float") or {}
        if not isinstance(kept, dict) or not all(isinstance(v, str) for v in kept.values()):
            f.fail("kept_in_float", "must be an object of layer name -> reason")
        return cls(method, group_size, tuple(modules), tuple(kept.items()))


def check_method(method: str, group_size: int | None) -> None:
    if method not in METHODS:
        raise QuantizationError(f"unknown quantisation {method!r}; valid: {', '.join(METHODS)}")
    if method == "int4" and group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")


def candidate_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers quantisation covers, by module name (works on a meta-built model)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(QUANTIZED_PARTS)}


def plan(model: nn.Module, method: str, group_size: int | None = 128, strict: bool = False) -> QuantSpec:
    """The QuantSpec for `model`. Layers the kernels cannot run raise with `strict` (and always when no
    layer fits); otherwise they stay in the compute dtype and a warning names each one and why (the
    spec records them)."""
    check_method(method, group_size)
    g = group_size if method == "int4" else None
    modules, kept = [], []
    for name, lin in candidate_linears(model).items():
        why = unsupported(method, lin.out_features, lin.in_features, g)
        if why:
            kept.append((name, why))
        else:
            modules.append(name)
    listing = "; ".join(f"{n}: {why}" for n, why in kept)
    if not modules or (kept and strict):
        raise QuantizationError(f"{len(kept)} layer(s) cannot be quantised to {method}"
                                f"{f' with group size {g}' if g else ''}: {listing or 'the model has no such layer'}")
    if kept:
        warnings.warn(f"{len(kept)} layer(s) kept in the compute dtype, the {method} kernels cannot run them: "
                      f"{listing}", stacklevel=3)
    return QuantSpec(method, g, tuple(modules), tuple(kept))


def check_against(spec: QuantSpec, model: nn.Module, where: str) -> None:
    """A folder's declared spec must name quantisable layers of this model that the kernels can run."""
    linears = candidate_linears(model)
    for name in spec.modules:
        if name not in linears:
            raise ConfigError(f"{where}: quantization.modules lists {name!r}, which is not a quantisable Linear "
                              f"layer of this model (those are the Linear layers under {', '.join(QUANTIZED_PARTS)})")
        lin = linears[name]
        if why := unsupported(spec.method, lin.out_features, lin.in_features, spec.group_size):
            raise ConfigError(f"{where}: quantization.modules lists {name!r}, which {spec.method} cannot run: {why}")


def misplaced(spec: QuantSpec, key: str) -> str | None:
    """Why a tensor `key` does not belong in a folder quantised as `spec` (None: it may): a float
    weight of a quantised layer, or a quantised tensor of a layer the spec does not list."""
    name, _, attr = key.rpartition(".")
    if attr == "weight" and name in spec.modules:
        return (f"a float weight of {name}, which is declared {spec.method}-quantised (stored as "
                f"{', '.join(name + '.' + p for p in spec.part_names)})")
    if attr in PART_NAMES and name not in spec.modules:
        return f"a quantised tensor of {name}, which quantization.modules does not list"
    return None
