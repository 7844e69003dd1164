"""The training module for FSDP2 without a full copy on any rank, in torchtitan's order: construct on meta,
shard (parallel.wrap on parallel.shard_plan: decoder layers, vision blocks, towers, embeddings and heads, then
the root; the frozen VQ whole on every rank), allocate only this rank's shards (to_empty), then fill each tensor
from its source, one tensor at a time:
- a checkpoint folder in the official layout, or a run's checkpoint when resuming: this rank's rows, read
  straight from the safetensors file (io.read_rows), so no rank reads the bytes of another rank's rows;
- a random preset: this rank's rows of the seeded draw a single process makes (init.random_values), so a
  sharded run starts from the very weights an unsharded one does;
- tensors that are real before sharding (the JanusFlow REPA head, small, built from the seed): their rows.
Peak host memory per rank: its shards, the replicated buffers, and the tensor being read (a preset draws
whole tensors, so one full tensor at a time).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..checkpoint.init import random_values
from ..checkpoint.io import CheckpointError, Entry, iter_tensors, match_entries, materialize_buffers, read_rows
from ..checkpoint.official import OfficialExtras, official_entries, official_skip
from ..config import PRESET_NAMES, preset
from ..models import build_model
from ..models.janus import JanusModel
from ..quantization import check_trainable
from .config import ModelSection
from .lora import check_structure, checkpoint_has_adapters, has_lora, is_adapter_key, read_adapter, saved_adapter_key

Rows = Callable[[int, int], torch.Tensor]  # (start, stop) -> those rows of the full tensor


def source_folder(spec: ModelSection) -> Path | None:
    """[model] source as a checkpoint folder (checked trainable), or None for a preset; anything else is refused."""
    p = Path(spec.source)
    if p.is_dir():
        check_trainable(p)  # a quantised folder: refused with the reason, not as a key mismatch
        return p
    if spec.source in PRESET_NAMES:
        return None
    raise FileNotFoundError(f"[model] source {spec.source!r}: no such checkpoint folder (a relative path is read "
                            f"from the working directory, {Path.cwd()}), and not a preset ({', '.join(PRESET_NAMES)})")


def build_meta(spec: ModelSection) -> tuple[JanusModel, OfficialExtras]:
    """The model of `spec` (a checkpoint folder or a preset) on meta, and the folder's unused official
    entries (for the export); its values come later, from fill()."""
    folder = source_folder(spec)
    if folder is not None:
        c, _, extras = official_entries(folder)
    else:
        c, extras = preset(spec.source), OfficialExtras()
    with torch.device("meta"):
        return build_model(c), extras


def real_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state entries of `module` that are not on meta (copies): what fill() must put back after to_empty."""
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items() if not v.is_meta}


def row_range(t: torch.Tensor) -> tuple[int, int]:
    """The rows (first dimension) of the full tensor this rank holds: all of a plain tensor, the rank's
    torch.chunk share of a DTensor sharded on dim 0 (FSDP2's layout: ceil(n / ranks) rows each, the last
    ranks fewer or none)."""
    if not isinstance(t, DTensor):
        return 0, t.shape[0] if t.ndim else 0
    if len(t.placements) != 1 or not t.placements[0].is_shard(0):
        raise NotImplementedError(f"sharded fill handles a 1-D mesh sharded on dim 0, got {t.placements}")
    n, mesh = t.shape[0], t.device_mesh
    size = math.ceil(n / mesh.size())
    start = min(n, mesh.get_local_rank() * size)
    return start, min(n, start + size)


@torch.no_grad()
def fill(module: nn.Module, sources: dict[str, Rows], device: torch.device) -> None:
    """Allocate this rank's part of every tensor of the (sharded, meta) `module` on `device` and copy
    into it the rows `sources[name]` gives; every state entry must have a source. Non-persistent buffers
    (RoPE) are rebuilt."""
    state = module.state_dict(keep_vars=True)
    if missing := sorted(set(state) - set(sources)):
        raise CheckpointError(f"no source for {len(missing)} tensor(s): {', '.join(missing[:10])}")
    allocate(module, device)
    for name, t in module.state_dict(keep_vars=True).items():
        local = t.to_local() if isinstance(t, DTensor) else t
        start, stop = row_range(t)
        x = sources[name](start, stop) if t.ndim else sources[name](0, 0)
        if tuple(x.shape) != tuple(local.shape):
            raise CheckpointError(f"{name}: source rows {start}:{stop} have shape {tuple(x.shape)}, this rank "
                                  f"holds {tuple(local.shape)}")
        local.copy_(x)


def allocate(module: nn.Module, device: torch.device) -> None:
    """This rank's part of every tensor, uninitialised (a sharded checkpoint's load fills it), and the
    non-persistent buffers (RoPE) rebuilt."""
    module.to_empty(device=device)
    materialize_buffers(module, device)


def file_sources(entries: list[Entry], shapes: dict[str, tuple[int, ...]], where: str | Path,
                 to_name: Callable[[str], str] = lambda k: k,
                 skip: Callable[[str], bool] = lambda k: False) -> dict[str, Rows]:
    """Sources reading rows of a folder's tensors: strictly one entry per name of `shapes` (the full
    shapes, keyed by the file's keys), as load_into checks them; `to_name` maps a file key to the module's name."""
    plan, _ = match_entries(shapes, entries, skip, where)
    return {to_name(e[0]): _rows_of_entry(e) for e in plan}


def _rows_of_entry(e: Entry) -> Rows:
    return lambda a, b: read_rows(e, a, b) if e[2] else e[1]()  # a 0-d tensor has no rows


def tensor_sources(tensors: dict[str, torch.Tensor]) -> dict[str, Rows]:
    """Sources slicing tensors held in memory (small ones: the REPA head)."""
    return {k: (lambda a, b, v=v: v[a:b] if v.ndim else v) for k, v in tensors.items()}


def random_sources(model: nn.Module, seed: int, prefix: str = "") -> dict[str, Rows]:
    """Sources with the values random_model(config, seed) gives every parameter, drawn in the same order from
    the same generator. The draw is sequential, so the sources must be read in state-dict order (fill does):
    each is drawn when it is first read, and an earlier one read after a later one is refused."""
    draws = random_values(model, seed)
    names = [n for n, _ in model.named_parameters()]
    current: dict[str, torch.Tensor] = {}

    def rows(name: str, a: int, b: int) -> torch.Tensor:
        while name not in current:
            n, x = next(draws, (None, None))
            if n is None:
                raise RuntimeError(f"random source {name!r} read out of order")
            current.clear()
            current[n] = x
        return current[name][a:b]

    return {prefix + n: (lambda a, b, n=n: rows(n, a, b)) for n in names}


def sources_for(loss: nn.Module, spec: ModelSection, held: dict[str, torch.Tensor], ckpt: Path | None,
                checkpoint_key: Callable[[str], str]) -> dict[str, Rows]:
    """Where every tensor of the training module `loss` (model.*, repa_head.*) comes from: a run's checkpoint
    (all of them) when resuming, else the model source (a folder's tensors or a preset's draw) and `held`.
    With LoRA the frozen base always comes from the model source (`...q_proj.base_layer.weight` read as the
    source's `...q_proj.weight`), the adapters from `held` (drawn at build time) or, resuming, from the
    checkpoint's adapter file."""
    shapes = {k: tuple(v.shape) for k, v in loss.state_dict(keep_vars=True).items()}
    model = loss.get_submodule("model")
    lora = has_lora(model)
    if ckpt is not None and not checkpoint_has_adapters(ckpt, lora):
        by_key = {checkpoint_key(k): k for k in shapes}
        f = ckpt / "model.safetensors"
        return file_sources(list(iter_tensors([f])), {checkpoint_key(k): s for k, s in shapes.items()}, f,
                            to_name=lambda k: by_key[k])
    out = tensor_sources(held)
    if ckpt is not None:  # LoRA: the trained adapters replace the drawn ones
        check_structure(model, ckpt)
        saved = read_adapter(model, ckpt)
        out.update(tensor_sources({"model." + n: saved[saved_adapter_key(n)]
                                   for n in model.state_dict() if is_adapter_key(n)}))
    # the base's tensors by their official names (an adapted Linear's weight is `base_layer.weight` here)
    by_official = {k.removeprefix("model.").replace(".base_layer.", "."): k for k in shapes
                   if k.startswith("model.") and not is_adapter_key(k)}
    src = Path(spec.source)
    if src.is_dir():
        c, entries, _ = official_entries(src)
        out.update(file_sources(entries, {o: shapes[k] for o, k in by_official.items()}, src,
                                to_name=lambda o: by_official[o], skip=official_skip(c)))
    else:
        plain = model
        if lora:  # the draw follows the unadapted model's parameters (names, order), as random_model's does
            with torch.device("meta"):
                plain = build_model(model.config)
        out.update({by_official[k]: f for k, f in random_sources(plain, spec.seed).items()})
    return out
