"""Checkpoint folders in the official Janus / Janus-Pro / JanusFlow layouts: load (strict), save, and
the known-unused entries that real checkpoints carry (so our folders list exactly the same keys)."""
from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, JanusConfig, JanusFlowConfig, folder_file, read_json_object
from .official_config import (detect_arch, janus_from_official, model_from_official, read_config_json,
                              read_guidance_scale, to_official)
from ..models import build_model, vision_prefix
from ..models.janus import JanusModel
from ..processing.chat import read_processor_files
from ..processing.tokenizer import TextTokenizer
from .hf import is_unused_official
from .io import (CheckpointError, Entry, atomic_folder, iter_tensors, load_into, materialize_buffers, weight_files,
                 write_shards)
from .vae import read_vae_config

CODEBOOK_USED_LEN = 65536  # LlamaGen's usage-statistics buffer, saved but never read at inference


def unused_official_shapes(c: JanusConfig | JanusFlowConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the entries the reference saves but never executes (timm's attention-pool head, and
    for Janus the VQ's codebook-usage buffer)."""
    w, h = c.vision.width, int(c.vision.width * c.vision.mlp_ratio)
    p = vision_prefix(c) + "vision_tower.attn_pool."
    shapes = {p + "latent": (1, 1, w), p + "q.weight": (w, w), p + "q.bias": (w,), p + "kv.weight": (2 * w, w),
              p + "kv.bias": (2 * w,), p + "proj.weight": (w, w), p + "proj.bias": (w,), p + "norm.weight": (w,),
              p + "norm.bias": (w,), p + "mlp.fc1.weight": (h, w), p + "mlp.fc1.bias": (h,),
              p + "mlp.fc2.weight": (w, h), p + "mlp.fc2.bias": (w,)}
    if c.arch == "janus":
        shapes["gen_vision_model.quantize.codebook_used"] = (CODEBOOK_USED_LEN,)
    return shapes


def official_key_order(c: JanusConfig | JanusFlowConfig) -> list[str]:
    """Every key of an official checkpoint of config `c`, in the reference's state-dict order."""
    with torch.device("meta"):
        keys = list(build_model(c).state_dict().keys())
    unused = list(unused_official_shapes(c))
    pool = [k for k in unused if "attn_pool" in k]
    i = keys.index(vision_prefix(c) + "vision_tower.norm.bias") + 1  # timm registers attn_pool after norm
    keys[i:i] = pool
    if c.arch == "janus":
        j = keys.index("gen_vision_model.quantize.embedding.weight")  # buffer registered before the embedding
        keys.insert(j, "gen_vision_model.quantize.codebook_used")
    return keys


def read_janus_config(folder: Path) -> JanusConfig:
    path = Path(folder) / "config.json"
    raw = read_config_json(path)
    arch = detect_arch(raw, str(path))
    if arch != "janus":
        raise ConfigError(f"{path}: architecture {arch!r} is not the official Janus layout")
    return janus_from_official(raw, str(path))


def read_official_config(folder: Path) -> JanusConfig | JanusFlowConfig:
    path = Path(folder) / "config.json"
    return model_from_official(read_config_json(path), str(path))


@dataclass(frozen=True)
class OfficialExtras:
    """The known-unused entries of the files a model was loaded from, by key: the file holding each.
    They stay on disk; save_janus(..., extras=) writes them back, so load -> save is lossless."""

    files: dict[str, str] = field(default_factory=dict)

    def read(self) -> dict[str, torch.Tensor]:
        """The entries' tensors. A file that is gone is reported and its entries are left out (zeros then)."""
        by_file: dict[str, list[str]] = {}
        for k, f in self.files.items():
            by_file.setdefault(f, []).append(k)
        out = {}
        for f, keys in by_file.items():
            try:
                found = {k: load() for k, load, _, _ in iter_tensors([Path(f)]) if k in keys}
            except (CheckpointError, FileNotFoundError) as e:
                warnings.warn(f"{f}: cannot re-read the unused official entries ({e}); writing zeros instead",
                              stacklevel=3)
                continue
            out.update(found)
        return out


def official_skip(c: JanusConfig | JanusFlowConfig) -> Callable[[str], bool]:
    """The entries of an official folder that loading leaves on disk: the known-unused ones, and the
    SigLIP blocks a select_layer=-2 style config does not build."""
    vp = vision_prefix(c)
    extra_blocks = tuple(f"{vp}vision_tower.blocks.{i}." for i in range(c.vision.depth, c.vision.layers))
    return lambda key: is_unused_official(key) or key.startswith(extra_blocks)


def load_official(folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """A Janus / Janus-Pro (JanusModel) or JanusFlow (JanusFlowModel) folder in the official layout:
    build on meta, then fill strictly from the folder's weights (mmap, one tensor at a time)."""
    return load_official_with_extras(folder, dtype, device)[0]


def load_official_with_extras(folder: str | Path, dtype: torch.dtype = torch.float32,
                              device: str = "cpu") -> tuple[torch.nn.Module, OfficialExtras]:
    """load_official, plus the folder's unused official entries (to pass to save_janus)."""
    folder = Path(folder)
    c, entries, extras = official_entries(folder)
    with torch.device("meta"):
        model = build_model(c)
    load_into(model, entries, dtype, official_skip(c), folder)
    materialize_buffers(model, device)
    return model.to(device).eval(), extras


def official_entries(folder: Path) -> tuple[JanusConfig | JanusFlowConfig, list[Entry], OfficialExtras]:
    """A folder's config, its tensors as lazy entries (nothing read yet) and its known-unused entries:
    what loading needs, for a loader that reads whole tensors (load_official) or slices of them
    (januskit.train.sharded)."""
    c = read_official_config(folder)
    entries = list(iter_tensors(weight_files(folder)))
    return c, entries, OfficialExtras({k: str(f) for k, _, _, f in entries if is_unused_official(k)})


def load_janus(folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> JanusModel:
    """A Janus / Janus-Pro folder (load_official, refusing other architectures)."""
    read_janus_config(Path(folder))
    return load_official(folder, dtype, device)


def official_state(model: torch.nn.Module, unused: dict[str, torch.Tensor] | None = None,
                   extras: OfficialExtras | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors plus the known-unused entries, in the official order. The unused entries
    are `unused` when given, else `extras` (those the model was loaded with, re-read; the
    attention-pool head cast to the model dtype), else zeros."""
    sd = model.state_dict()
    shapes = unused_official_shapes(model.config)
    dtype = next(iter(sd.values())).dtype
    if unused is None:
        unused = {k: t if "codebook_used" in k or not t.is_floating_point() else t.to(dtype)
                  for k, t in (extras or OfficialExtras()).read().items()}
    unused = dict(unused)
    for k, s in shapes.items():
        if k not in unused:
            unused[k] = torch.zeros(s, dtype=torch.float32 if "codebook_used" in k else dtype)
        elif tuple(unused[k].shape) != s:
            raise CheckpointError(f"unused entry {k}: shape {tuple(unused[k].shape)} != {s}")
    full = {**sd, **unused}
    return {k: full[k] for k in official_key_order(model.config) if k in full}


def save_janus(model: torch.nn.Module, dst: str | Path, *, copy_from: str | Path | None = None,
               unused: dict[str, torch.Tensor] | None = None, extras: OfficialExtras | None = None,
               files: dict[str, str] | None = None, overwrite: bool = False, skip: tuple[str, ...] = (),
               dtype: torch.dtype | None = None,
               materialize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Write config.json + safetensors in the official layout, atomically. Non-weight files of
    `copy_from` (tokenizer, processor configs) are copied along, except those named in `skip`;
    `files` adds text files by name.
    The known-unused entries: `unused`, else `extras` (from load_official_with_extras), else zeros.
    `dtype`: cast floating tensors to it (default: the model's dtype). `materialize`: makes each tensor whole
    as it is written, one at a time (a sharded model's DTensors: the other ranks take part in official_state's
    order)."""
    dst = Path(dst)
    if any(getattr(m, "packed_for_cpu", False) for m in model.modules()):
        raise ValueError("this model's Linear weights are prepacked for CPU inference (pack_for_cpu); "
                         "save the model loaded without packing")
    state = official_state(model, unused, extras)
    dtype = dtype or next(iter(model.state_dict().values())).dtype
    whole = materialize or (lambda t: t)

    def produce(k: str) -> torch.Tensor:
        t = whole(state[k])
        return t.to(dtype) if t.is_floating_point() and "codebook_used" not in k else t

    with atomic_folder(dst, overwrite=overwrite) as tmp:
        if copy_from is not None:
            copy_side_files(Path(copy_from), tmp, skip)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        name = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(to_official(model.config, name), indent=2) + "\n")
        write_shards(list(state), produce, tmp)
    return dst


# A training run's records in its output folder: they describe that run, not the model, so a folder
# saved from it (the next stage's export, a conversion) must not inherit them.
RUN_RECORDS = ("metrics.jsonl", "loss.png", "reward.png", "kl.png", "run_config.json", "RECIPE_DONE")


def side_files(src: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """What copy_side_files copies: every file that is not weights, config.json or a run record
    (tokenizer.json, processor configs, ...), and a JanusFlow folder's VAE (the vae/ subfolder).
    Each must resolve inside `src` (a symlink out of it would copy an outside file along)."""
    out = []
    for f in sorted(src.iterdir()):
        if (f.is_file() and f.name != "config.json" and f.name not in skip + RUN_RECORDS
                and not _is_weight(f.name)):
            out.append(folder_file(src, f.name, CheckpointError))
        elif f.is_dir() and f.name == "vae" and f.name not in skip:
            for g in (f, *sorted(f.rglob("*"))):  # symlinked folders too: copytree would follow them
                folder_file(src, g.relative_to(src), CheckpointError)
            out.append(f)
    return out


def check_side_files(src: Path, image_size: int, skip: tuple[str, ...] = ()) -> None:
    """Read everything copy_side_files would copy as januskit.load reads it (tokenizer.json, the
    processor configs, generation_config.json, vae/), and any other JSON file as a JSON object, so a
    conversion refuses a broken folder before it writes anything."""
    files = side_files(src, skip)
    names = {f.name for f in files}
    if "tokenizer.json" in names:
        TextTokenizer.from_file(src / "tokenizer.json")
    read_processor_files(src, image_size)
    read_guidance_scale(src)
    if "vae" in names:
        read_vae_config(src / "vae")
    for f in files:
        if f.suffix == ".json" and f.name != "tokenizer.json":  # tokenizer_config.json, special_tokens_map.json, ...
            read_json_object(f, CheckpointError)


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy side_files(src, skip) into `dst`."""
    for f in side_files(src, skip):
        if f.is_dir():
            shutil.copytree(f, dst / f.name, dirs_exist_ok=True)
        else:
            shutil.copy2(f, dst / f.name)


def _is_weight(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name.endswith(".index.json")
