"""Convert checkpoint folders between the official layout and HF transformers' Janus layout, and
load an HF-layout folder directly. Tensors stream shard by shard: a 7B conversion holds at most one
output shard in memory. Values and dtypes are copied as they are (no casting)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import JanusConfig, detect_arch, janus_from_official, read_config_json, ConfigError
from ..models.janus import JanusModel
from ..processing.tokenizer import TextTokenizer
from .hf import SIDE_FILE, hf_to_official_plan, janus_from_hf_config, janus_to_hf_config, official_to_hf_plan, Plan
from .io import (MAX_SHARD_BYTES, CheckpointError, Entry, atomic_folder, iter_tensors, load_into,
                 materialize_buffers, weight_files, write_shards)
from .official import copy_side_files, official_key_order


def _entries(folder: Path) -> dict[str, Entry]:
    return {e[0]: e for e in iter_tensors(weight_files(folder))}


def _apply(plan: Plan, src: dict[str, Entry], key: str) -> torch.Tensor:
    srcs, fn = plan[key]
    return fn(*[src[s][1]() for s in srcs]).contiguous()


def official_to_hf(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    src, dst = Path(src), Path(dst)
    raw = read_config_json(src / "config.json")
    if detect_arch(raw, str(src / "config.json")) != "janus":
        raise ConfigError(f"{src}/config.json: not an official Janus / Janus-Pro checkpoint")
    c = janus_from_official(raw, str(src / "config.json"))
    entries = _entries(src)
    plan, extras = official_to_hf_plan(list(entries))
    _check_complete(c, entries, src)
    tok = TextTokenizer.from_file(src / "tokenizer.json")
    hf_cfg = janus_to_hf_config(c, image_token_id=tok.image_id, pad_token_id=tok.pad_id if tok.has_token("<｜▁pad▁｜>") else None,
                                bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    with atomic_folder(dst, overwrite=overwrite) as tmp:
        copy_side_files(src, tmp)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        write_shards(list(plan), lambda k: _apply(plan, entries, k), tmp, max_shard_bytes)
        if extras:  # kept beside, for a bit-identical way back; transformers never reads this file
            save_file({k: entries[k][1]().contiguous() for k in extras}, str(tmp / SIDE_FILE), metadata={"format": "pt"})
    return dst


def _check_complete(c: JanusConfig, entries: dict[str, Entry], src: Path) -> None:
    expected = set(official_key_order(c))
    missing = sorted(expected - set(entries) - {k for k in expected if "attn_pool" in k or "codebook_used" in k})
    unexpected = sorted(set(entries) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{src}: not a complete official checkpoint: missing {missing[:10]}, unexpected {unexpected[:10]}")


def hf_official_entries(src: Path) -> tuple[JanusConfig, dict[str, Entry]]:
    """Official-named lazy entries over an HF-layout folder (plus the side file, when present)."""
    raw = read_config_json(src / "config.json")
    if detect_arch(raw, str(src / "config.json")) != "hf-janus":
        raise ConfigError(f"{src}/config.json: not an HF transformers Janus checkpoint (model_type 'janus')")
    c = janus_from_hf_config(raw, str(src / "config.json"))
    hf = _entries(src)
    plan = hf_to_official_plan(list(hf), official_key_order(c))
    out: dict[str, Entry] = {}
    for k in official_key_order(c):
        if k in plan:
            srcs, fn = plan[k]
            shape = tuple(fn(*[torch.empty(hf[s][2], device="meta") for s in srcs]).shape)
            out[k] = (k, (lambda k=k: _apply(plan, hf, k)), shape, hf[srcs[0]][3])
    side = src / SIDE_FILE
    if side.is_file():
        for e in iter_tensors([side]):
            out[e[0]] = e
    return c, out


def hf_to_official(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """HF layout -> official layout. The unused official entries come from the side file when the
    folder was made by `official_to_hf`, else they are written as zeros (the reference never reads them)."""
    src, dst = Path(src), Path(dst)
    c, entries = hf_official_entries(src)
    from .official import unused_official_shapes
    dtype = next(iter(entries.values()))[1]().dtype
    zeros = {k: (lambda s=s, k=k: torch.zeros(s, dtype=torch.float32 if "codebook_used" in k else dtype))
             for k, s in unused_official_shapes(c).items()}
    order = official_key_order(c)

    def produce(k: str) -> torch.Tensor:
        return entries[k][1]().contiguous() if k in entries else zeros[k]()

    with atomic_folder(dst, overwrite=overwrite) as tmp:
        copy_side_files(src, tmp, skip=(SIDE_FILE,))
        (tmp / "config.json").write_text(json.dumps(c.to_official_dict(), indent=2) + "\n")
        write_shards(order, produce, tmp, max_shard_bytes)
    return dst


def load_hf_layout(folder: str | Path, dtype: torch.dtype = torch.float32) -> JanusModel:
    folder = Path(folder)
    c, entries = hf_official_entries(folder)
    with torch.device("meta"):
        model = JanusModel(c)
    from .hf import is_unused_official
    load_into(model, entries.values(), dtype, is_unused_official, folder)
    materialize_buffers(model)
    return model.eval()


def convert(src: str | Path, dst: str | Path, to: str, overwrite: bool = False) -> Path:
    if to == "hf":
        return official_to_hf(src, dst, overwrite=overwrite)
    if to == "official":
        return hf_to_official(src, dst, overwrite=overwrite)
    raise ValueError(f"--to must be 'hf' or 'official', got {to!r}")
