"""Convert checkpoint folders between the official layout and HF transformers' Janus layout, and
load an HF-layout folder directly. Tensors stream shard by shard: a 7B conversion holds at most one
output shard in memory. Values and dtypes are copied as they are (no casting).

Everything is validated (key names, shapes and floating dtypes against the config, and every file
copied along) before the destination is created, and the destination is written through `atomic_folder`, so a failed conversion leaves no
half-written folder behind.

official -> hf -> official is bit-identical: the official entries HF has no place for (attention-pool
head, `codebook_used`) and the official config.json text travel in a side file
(`januskit-official-extras.safetensors`, tensors + metadata) that transformers never reads.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ConfigError, JanusConfig, folder_file, parse_json_object
from .official_config import detect_arch, janus_from_official, read_config_json, read_guidance_scale, to_official
from ..models.janus import JanusModel
from ..processing.tokenizer import PAD_TOKEN, TextTokenizer
from .hf import (SIDE_FILE, hf_generation_config, hf_to_official_plan, is_unused_official, janus_from_hf_config,
                 janus_to_hf_config, official_to_hf_plan, same_model, Plan)
from .io import (MAX_SHARD_BYTES, CheckpointError, Entry, atomic_folder, iter_tensors, load_into,
                 materialize_buffers, weight_files, write_shards)
from .official import OfficialExtras, check_side_files, copy_side_files, official_key_order, unused_official_shapes

SIDE_CONFIG_KEY = "official_config_json"  # side-file metadata: the source official config.json, verbatim
_HF_ONLY_FILES = (SIDE_FILE, "generation_config.json")  # not carried back to the official layout


def entries_by_key(folder: Path) -> dict[str, Entry]:
    """A folder's lazy entries by key; a key in two weight files is refused."""
    out: dict[str, Entry] = {}
    for e in iter_tensors(weight_files(folder)):
        if e[0] in out:
            raise CheckpointError(f"{folder}: key {e[0]!r} appears twice ({out[e[0]][3].name} and {e[3].name})")
        out[e[0]] = e
    return out


def _apply(plan: Plan, src: dict[str, Entry], key: str) -> torch.Tensor:
    srcs, fn = plan[key]
    return fn(*[src[s][1]() for s in srcs]).contiguous()


_BLOCKS = "vision_model.vision_tower.blocks."


def _is_dropped_block(c: JanusConfig, key: str) -> bool:
    """A SigLIP block that select_layer leaves unbuilt (select_layer -2 style configs): kept aside like
    the unused entries (the reference does not build it; HF has no layer for it)."""
    if not key.startswith(_BLOCKS):
        return False
    i = key[len(_BLOCKS):].split(".", 1)[0]
    return i.isdigit() and c.vision.depth <= int(i) < c.vision.layers


def _set_aside(c: JanusConfig, key: str) -> bool:
    return is_unused_official(key) or _is_dropped_block(c, key)


def official_shapes(c: JanusConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor an official checkpoint of config `c` may hold (meta device, no
    memory): the model's, the known-unused entries, and blocks select_layer leaves unbuilt."""
    with torch.device("meta"):
        sd = JanusModel(c).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    shapes.update(unused_official_shapes(c))
    block0 = {k[len(_BLOCKS) + 2:]: s for k, s in shapes.items() if k.startswith(_BLOCKS + "0.")}
    for i in range(c.vision.depth, c.vision.layers):
        shapes.update({f"{_BLOCKS}{i}.{rest}": s for rest, s in block0.items()})
    return shapes


def _official_order(c: JanusConfig, present: list[str]) -> list[str]:
    """official_key_order plus the unbuilt blocks that are present, where the reference has them."""
    order = official_key_order(c)
    dropped = [k for k in official_shapes(c) if _is_dropped_block(c, k) and k in present]
    i = order.index("vision_model.vision_tower.norm.weight")
    return order[:i] + dropped + order[i:]


def _check_official(c: JanusConfig, entries: dict[str, Entry], src: Path) -> None:
    """Every executed key present with the config's shape; the set-aside entries may be absent."""
    want = official_shapes(c)
    missing = sorted(k for k in set(want) - set(entries) if not _set_aside(c, k))
    unexpected = sorted(f"{k} ({entries[k][3].name})" for k in set(entries) - set(want))
    wrong = sorted(f"{k}: checkpoint {entries[k][2]} vs config {want[k]} ({entries[k][3].name})"
                   for k in set(entries) & set(want) if tuple(entries[k][2]) != want[k])
    _raise_mismatch(src, "official checkpoint", missing, unexpected, wrong)


def _raise_mismatch(src: Path, what: str, missing: list[str], unexpected: list[str], wrong: list[str]) -> None:
    if not (missing or unexpected or wrong):
        return
    lines = []
    for name, items, sep in (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
                             ("wrong shapes", wrong, "; ")):
        if items:
            lines.append(f"{name} ({len(items)}): " + sep.join(items[:20]) + (" ..." if len(items) > 20 else ""))
    raise CheckpointError(f"{src}: {what} does not match its config.json:\n  " + "\n  ".join(lines))


def _float_dtype(entries: dict[str, Entry]) -> str:
    for k, load, _, _ in entries.values():
        if not is_unused_official(k):
            t = load()
            if t.is_floating_point():
                return str(t.dtype).removeprefix("torch.")
    return "bfloat16"


def official_to_hf(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Official folder -> HF transformers Janus folder (config.json, generation_config.json, weights,
    tokenizer and processor files copied, plus the side file for the way back)."""
    src, dst = Path(src), Path(dst)
    cfg_path = src / "config.json"
    raw = read_config_json(cfg_path)
    arch = detect_arch(raw, str(cfg_path))
    if arch != "janus":
        raise ConfigError(f"{cfg_path}: architecture {arch!r} is not an official Janus / Janus-Pro checkpoint")
    c = janus_from_official(raw, str(cfg_path))
    entries = entries_by_key(src)
    _check_official(c, entries, src)
    plan, extras = official_to_hf_plan([k for k in entries if not _is_dropped_block(c, k)])
    extras += [k for k in entries if _is_dropped_block(c, k)]
    tok_path = src / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path}: not found (the HF config needs the special-token ids from it)")
    check_side_files(src, c.vision.image_size)  # before anything is written
    tok = TextTokenizer.from_file(tok_path)
    pad = tok.pad_id if tok.has_token(PAD_TOKEN) else tok.eos_id
    hf_cfg = janus_to_hf_config(c, image_token_id=tok.image_id, pad_token_id=pad, bos_token_id=tok.bos_id,
                                eos_token_id=tok.eos_id, dtype=_float_dtype(entries))
    gen_cfg = hf_generation_config(tok.boi_id, pad, tok.bos_id, tok.eos_id)
    if (w := read_guidance_scale(src)) is not None:  # the model's own CFG weight goes along
        gen_cfg["guidance_scale"] = w
    config_text = cfg_path.read_text(encoding="utf-8")
    with atomic_folder(dst, overwrite=overwrite) as tmp:
        copy_side_files(src, tmp)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        write_shards(list(plan), lambda k: _apply(plan, entries, k), tmp, max_shard_bytes)
        # Kept beside, for a bit-identical way back; transformers never reads this file. One metadata
        # entry only: safetensors writes several in a random order, and conversions must be reproducible.
        save_file({k: entries[k][1]().contiguous() for k in extras}, str(tmp / SIDE_FILE),
                  metadata={SIDE_CONFIG_KEY: config_text})
    return dst


def _side_config(src: Path, c_hf: JanusConfig) -> tuple[JanusConfig, str | None]:
    """The official config stored by `official_to_hf`, when present and still describing the same
    model as the HF config.json; else the config derived from the HF config (and no stored text)."""
    side = src / SIDE_FILE
    if not side.is_file():
        return c_hf, None
    folder_file(src, SIDE_FILE, CheckpointError)
    try:
        with safe_open(str(side), framework="pt") as h:
            text = (h.metadata() or {}).get(SIDE_CONFIG_KEY)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise CheckpointError(f"{side}: unreadable side file ({e})") from e
    if text is None:
        return c_hf, None
    where = f"{side} (stored official config.json)"
    c_off = janus_from_official(parse_json_object(text, where), where)
    if not same_model(c_off, c_hf):
        warnings.warn(f"{side}: the stored official config no longer matches {src / 'config.json'}; "
                      "deriving the official config from the HF config instead", stacklevel=3)
        return c_hf, None
    return c_off, text


def hf_official_entries(src: Path) -> tuple[JanusConfig, dict[str, Entry], str | None]:
    """Official-named lazy entries over an HF-layout folder (plus the side file's, when present), the
    official config, and the stored official config.json text (None when not available)."""
    cfg_path = src / "config.json"
    raw = read_config_json(cfg_path)
    arch = detect_arch(raw, str(cfg_path))
    if arch != "hf-janus":
        raise ConfigError(f"{cfg_path}: architecture {arch!r} is not an HF transformers Janus checkpoint "
                          "(model_type 'janus')")
    c_hf = janus_from_hf_config(raw, str(cfg_path))
    c, config_text = _side_config(src, c_hf)
    hf = entries_by_key(src)
    order = official_key_order(c)
    plan = hf_to_official_plan(list(hf), order)
    want = official_shapes(c)
    out: dict[str, Entry] = {}
    wrong = []
    for k in order:
        if k not in plan:
            continue
        srcs, fn = plan[k]
        try:
            shape = tuple(fn(*[torch.empty(hf[s][2], device="meta") for s in srcs]).shape)
        except RuntimeError as e:  # e.g. q/k/v of different shapes cannot be concatenated
            wrong.append(f"{k} from {', '.join(srcs)}: {e}")
            continue
        if shape != want[k]:
            wrong.append(f"{' + '.join(f'{s} {tuple(hf[s][2])}' for s in srcs)} -> {k} {shape} vs config {want[k]}")
        out[k] = (k, (lambda k=k: _apply(plan, hf, k)), shape, hf[srcs[0]][3])
    _raise_mismatch(src, "HF-layout checkpoint", [], [], wrong)
    side = src / SIDE_FILE
    if side.is_file():
        for e in iter_tensors([side]):
            if not _set_aside(c, e[0]):
                raise CheckpointError(f"{side}: unexpected entry {e[0]!r} (only the unused official entries belong here)")
            if tuple(e[2]) != want[e[0]]:
                raise CheckpointError(f"{side}: entry {e[0]!r} has shape {tuple(e[2])}, expected {want[e[0]]}")
            out[e[0]] = e
    return c, out, config_text


def hf_to_official(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """HF layout -> official layout. The unused official entries and the config.json text come from
    the side file when the folder was made by `official_to_hf`; otherwise the entries are written as
    zeros (the reference never reads them) and config.json is derived from the HF config."""
    src, dst = Path(src), Path(dst)
    c, entries, config_text = hf_official_entries(src)
    check_side_files(src, c.vision.image_size, skip=_HF_ONLY_FILES)  # before anything is written
    dtype = next(e for e in entries.values() if not _set_aside(c, e[0]))[1]().dtype
    zeros = {k: (lambda s=s, k=k: torch.zeros(s, dtype=torch.float32 if "codebook_used" in k else dtype))
             for k, s in unused_official_shapes(c).items()}
    order = _official_order(c, list(entries))

    def produce(k: str) -> torch.Tensor:
        return entries[k][1]().contiguous() if k in entries else zeros[k]()

    with atomic_folder(dst, overwrite=overwrite) as tmp:
        copy_side_files(src, tmp, skip=_HF_ONLY_FILES)
        if (w := read_guidance_scale(src)) is not None:  # of HF's generation settings, only the model's CFG weight
            (tmp / "generation_config.json").write_text(json.dumps({"guidance_scale": w}, indent=1) + "\n")
        (tmp / "config.json").write_text(config_text if config_text is not None
                                         else json.dumps(to_official(c, str(dtype).removeprefix("torch.")), indent=2)
                                         + "\n", encoding="utf-8")
        write_shards(order, produce, tmp, max_shard_bytes)
    return dst


def load_hf_layout(folder: str | Path, dtype: torch.dtype = torch.float32) -> JanusModel:
    """Build our model straight from an HF-layout folder (renames and q/k/v fusing on the fly)."""
    return load_hf_layout_with_extras(folder, dtype)[0]


def load_hf_layout_with_extras(folder: str | Path, dtype: torch.dtype = torch.float32
                               ) -> tuple[JanusModel, OfficialExtras]:
    """load_hf_layout, plus the unused official entries the side file holds (to pass to save_janus)."""
    folder = Path(folder)
    c, entries, _ = hf_official_entries(folder)
    with torch.device("meta"):
        model = JanusModel(c)
    load_into(model, entries.values(), dtype, lambda k: _set_aside(c, k), folder)
    materialize_buffers(model)
    return model.eval(), OfficialExtras({k: str(e[3]) for k, e in entries.items() if is_unused_official(k)})


def convert(src: str | Path, dst: str | Path, to: str, overwrite: bool = False,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    if to == "hf":
        return official_to_hf(src, dst, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    if to == "official":
        return hf_to_official(src, dst, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    raise ValueError(f"--to must be 'hf' or 'official', got {to!r}")
