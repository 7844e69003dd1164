"""Load a model quantised, tensor by tensor: a float folder (official or HF layout) quantised as it
is read, or a quantised folder (config.json's `quantization`, written by quantize_folder) repacked
for the kernels. The model is built on the meta device and each covered Linear becomes a QuantLinear
as soon as its tensors are read: the float model never exists in memory, and every safetensors
tensor is read through its own mapping (checkpoint.io), so peak memory is the quantised model plus
about one float layer. (A `.bin` file stays mapped until it is done: its pages add up meanwhile.)
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.convert import entries_by_key, hf_official_entries
from ..checkpoint.io import (CheckpointError, Entry, assign_tensor, iter_tensors, match_entries, materialize_buffers,
                             weight_files)
from ..checkpoint.official import official_skip
from ..checkpoint.official_config import detect_arch, model_from_official, read_config_json
from ..config import ConfigError, JanusConfig, JanusFlowConfig
from ..models import build_model
from .codec import quantize
from .model import set_module
from .qlinear import from_parts
from .spec import QWEIGHT_DTYPES, QuantizationError, QuantSpec, check_against, misplaced, plan


def read_quantization(raw: dict[str, Any], where: str | Path) -> QuantSpec | None:
    """The `quantization` entry of a config.json dict (None: a float checkpoint)."""
    return None if raw.get("quantization") is None else QuantSpec.from_json(raw["quantization"], str(where))


def float_entries(folder: Path, raw: dict[str, Any]
                  ) -> tuple[JanusConfig | JanusFlowConfig, list[Entry], Callable[[str], bool]]:
    """Config, lazy official-named entries and the keys to leave on disk, of a float folder in the
    official or the HF layout."""
    where = str(folder / "config.json")
    if detect_arch(raw, where) == "hf-janus":
        c, entries, _ = hf_official_entries(folder)
        return c, list(entries.values()), official_skip(c)
    c = model_from_official(raw, where)
    return c, list(entries_by_key(folder).values()), official_skip(c)


def load_quantized(folder: str | Path, dtype: torch.dtype, quantize_to: str | None = None,
                   group_size: int | None = 128, strict: bool = False) -> nn.Module:
    """A quantised folder as it was quantised (`quantize_to`, when given, must agree with it), or a
    float folder quantised to `quantize_to` while loading. Non-quantised tensors, scales and biases
    are cast to `dtype`, the compute dtype."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    raw = read_config_json(cfg_path)
    spec = read_quantization(raw, cfg_path)
    if spec is None:
        if quantize_to is None:
            raise ValueError(f"{folder}: not a quantised folder, and no quantisation asked for")
        c, entries, skip = float_entries(folder, raw)
        with torch.device("meta"):
            model = build_model(c)
        spec = plan(model, quantize_to, group_size, strict)
        stored = False
    else:
        if quantize_to is not None and (quantize_to != spec.method or
                                        (spec.method == "int4" and group_size != spec.group_size)):
            raise QuantizationError(f"{folder}: already quantised to {spec.describe()}; it cannot be requantised "
                                    f"to {quantize_to}{f' (group size {group_size})' if quantize_to == 'int4' else ''}: "
                                    "load the float checkpoint with that quantisation instead")
        if detect_arch(raw, str(cfg_path)) not in ("janus", "janusflow"):
            raise ConfigError(f"{cfg_path}: a quantised folder must be in the official layout")
        c = model_from_official(raw, str(cfg_path))
        with torch.device("meta"):
            model = build_model(c)
        check_against(spec, model, str(cfg_path))
        entries = list(iter_tensors(weight_files(folder), integer=lambda k: k.endswith(".qweight")))
        for key, _, _, f in entries:
            if why := misplaced(spec, key):
                raise CheckpointError(f"{f}: tensor {key!r} does not match config.json's quantization: {why}")
        skip, stored = official_skip(c), True
    stream_into(model, entries, dtype, skip, folder, spec, stored)
    materialize_buffers(model)
    return model.eval()


def stream_into(model: nn.Module, entries: list[Entry], dtype: torch.dtype, skip: Callable[[str], bool],
                where: str | Path, spec: QuantSpec, stored: bool) -> None:
    """Fill a meta-built float model strictly (checkpoint.io.match_entries), turning each layer of
    `spec` into a QuantLinear once its tensors are in: the float weight quantised on arrival, or the
    stored parts (`stored`) checked and kept until the layer is complete."""
    linears = {name: model.get_submodule(name) for name in spec.modules}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    if stored:
        for name, lin in linears.items():
            del shapes[f"{name}.weight"]
            shapes.update({f"{name}.{p}": s for p, s in spec.part_shapes(lin.out_features, lin.in_features).items()})
    todo, _ = match_entries(shapes, entries, skip, where)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, load, _, f in todo:
        name, _, attr = key.rpartition(".")
        t = load()
        if name not in linears:
            assign_tensor(model, key, t.to(dtype) if t.is_floating_point() else t)
            continue
        parts = pending.setdefault(name, {})
        if attr == "weight":
            with torch.no_grad():
                parts.update(quantize(t.to(dtype), spec.method, spec.group_size))
        elif attr == "bias":
            parts["bias"] = t.to(dtype)
        else:
            _check_part_dtype(spec, key, t, f)
            parts[attr] = t
        del t  # the float weight's mapping goes with it
        if len(parts) == len(spec.part_names) + (linears[name].bias is not None):
            bias = parts.pop("bias", None)
            set_module(model, name, from_parts(spec, parts, bias, dtype))
            del pending[name]
            _trim_heap()
    assert not pending, f"incomplete layers after a strict match: {sorted(pending)}"


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def _trim_heap() -> None:
    """Give the freed heap back to the OS after each layer. A layer's temporaries are freed between
    long-lived packed weights, and glibc returns only the top of a heap by itself: how much stays
    resident then depends on the allocation order (a 7B int4 load ended between 5.4 and 6.1 GiB
    without this; docs/quantization.md). No-op without glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _check_part_dtype(spec: QuantSpec, key: str, t: torch.Tensor, f: Path) -> None:
    if key.endswith(".qweight"):
        ok, want = t.dtype == QWEIGHT_DTYPES[spec.method], str(QWEIGHT_DTYPES[spec.method])
    else:
        ok, want = t.is_floating_point(), "floating point"
    if not ok:
        raise CheckpointError(f"{f}: tensor {key!r} has dtype {t.dtype}; an {spec.method} folder stores it as "
                              f"{want.removeprefix('torch.')}")
