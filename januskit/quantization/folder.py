"""Write a quantised checkpoint folder from a float one (`januskit quantize SRC DST --to int4`).

The result is the official layout with each quantised layer's `weight` replaced, in place in the key
order, by its portable tensors (`qweight`, `scales`, `mins`: spec.py, codec.py), config.json plus a
`quantization` entry naming the method, group size and layers, and the source's side files
(tokenizer, processor configs). Tensors stream from the source one layer at a time, in the dtype
they are stored in (scales and mins too); other tensors are copied as they are. januskit.load reads
the folder straight into the kernels' layout, with no float copy of the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint.io import MAX_SHARD_BYTES, atomic_folder, match_entries, write_shards
from ..checkpoint.official import check_side_files, copy_side_files
from ..checkpoint.official_config import detect_arch, read_config_json
from ..config import ConfigError
from ..models import build_model
from .codec import quantize
from .load import float_entries, read_quantization
from .spec import QuantizationError, QuantSpec, misplaced, plan


def quantize_folder(src: str | Path, dst: str | Path, method: str, group_size: int | None = 128, *,
                    strict: bool = False, overwrite: bool = False,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> QuantSpec:
    """Quantise the official-layout float folder `src` into `dst` (atomically); returns the spec written.
    Everything is checked (keys, shapes, side files) before the destination is created."""
    src, dst = Path(src), Path(dst)
    cfg_path = src / "config.json"
    raw = read_config_json(cfg_path)
    if (done := read_quantization(raw, cfg_path)) is not None:
        raise QuantizationError(f"{src}: already quantised ({done.describe()}); quantise the float checkpoint")
    if detect_arch(raw, str(cfg_path)) == "hf-janus":
        raise ConfigError(f"{cfg_path}: an HF-layout folder; convert it first (januskit convert --to official)")
    c, entries, skip = float_entries(src, raw)
    with torch.device("meta"):
        model = build_model(c)
    spec = plan(model, method, group_size, strict)
    by_key = {e[0]: e for e in entries}  # float_entries refused duplicate keys
    keys: list[str] = []
    for key in by_key:
        name, _, attr = key.rpartition(".")
        keys += [f"{name}.{p}" for p in spec.part_names] if attr == "weight" and name in spec.modules else [key]
    seen: set[str] = set()
    for key in keys:  # a layer is stored quantised or as floats, never both
        why = misplaced(spec, key)
        if why is None and key in seen:
            why = "the source already holds this quantised tensor, beside the float weight it is made from"
        if why:
            raise QuantizationError(f"{dst}: refusing to write {key!r}: {why}")
        seen.add(key)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    match_entries(shapes, entries, skip, src)  # strict: a broken source fails before anything is written
    check_side_files(src, c.vision.image_size)

    layer: dict[str, dict[str, torch.Tensor]] = {}  # the one layer being written: its parts not yet taken

    def produce(key: str) -> torch.Tensor:
        name, _, attr = key.rpartition(".")
        if name not in spec.modules or attr == "bias":
            return by_key[key][1]()
        if name not in layer:
            layer.clear()
            with torch.no_grad():
                layer[name] = quantize(by_key[f"{name}.weight"][1](), spec.method, spec.group_size)
        return layer[name].pop(attr)

    config = dict(raw, quantization=spec.to_json())
    with atomic_folder(dst, overwrite=overwrite) as tmp:
        copy_side_files(src, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_shards(keys, produce, tmp, max_shard_bytes)
    return spec
