"""Everything distributed, in one module: process-group init from torchrun's environment, rank
helpers, seeding, DDP / FSDP2 wrapping, gradient-sync suppression, small collectives, full
(rank-0) state dicts for checkpoints, and teardown. The rest of the trainer only calls these.

Backends: gloo on CPU, nccl on CUDA. FSDP2 (`fully_shard` per decoder layer, then the root) works on
CPU with gloo in torch 2.13 and is tested there against single-process training.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so teardown destroys it


_info = DistInfo()


def init(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), or run as
    a single process when WORLD_SIZE is unset or 1. An already initialised group is reused."""
    global _info
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    elif device == "cuda":
        dev = torch.device(f"cuda:{local_rank}")
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        _info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)
    else:
        _info = DistInfo(0, 1, 0, dev, False)
    return _info


def info() -> DistInfo:
    return _info


def rank() -> int:
    return _info.rank


def world() -> int:
    return _info.world


def is_main() -> bool:
    """Only rank 0 writes files."""
    return _info.rank == 0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch with `seed + rank`: ranks must differ wherever randomness is
    per-sample (dropout-like noise), while weights come from the checkpoint and DDP broadcasts them."""
    s = seed + _info.rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain Python values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                          "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                                    "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(_tuples(st["python"]))
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "ddp" if _info.world > 1 else "none"
    if mode == "none" and _info.world > 1:
        raise ValueError(f"parallel = 'none' but {_info.world} processes were launched; use ddp or fsdp")
    return mode


# Parts of a Janus / JanusFlow model that are FSDP units of their own besides the decoder layers and the vision
# towers' blocks (all listed after their children): whatever is left in the root unit is gathered whole on every
# rank for the whole forward, and at the 7B width these are most of it (the embeddings and the text head are
# 0.42B parameters each, SigLIP 0.3B). Absent names (the other architecture) are skipped.
UNITS = ("vision_model", "vision_und_enc_model", "vision_gen_enc_model", "vision_gen_dec_model",
         "language_model.model.embed_tokens", "language_model.lm_head", "gen_head")
# Frozen image tokenizers kept out of FSDP, whole on every rank: no stage trains the VQ, and the data pipeline
# encodes images with it between steps, outside any FSDP forward, where sharded weights cannot be used.
REPLICATED = ("gen_vision_model",)


@dataclass(frozen=True)
class ShardPlan:
    units: list[nn.Module]  # fully_shard'ed in this order (children before parents), then the root
    ignored: set[nn.Parameter]  # replicated, never sharded nor reduced (frozen parameters only)


def shard_plan(model: nn.Module) -> ShardPlan:
    """The FSDP units of a Janus / JanusFlow `model` (set requires_grad first): each decoder layer, each
    vision block, then the towers, embeddings and heads in UNITS; the frozen tokenizers of REPLICATED are
    left out of FSDP (one that trains is sharded as a unit instead, so its gradients are reduced)."""
    units: list[nn.Module] = list(model.llm.layers)
    ignored: set[nn.Parameter] = set()
    for name in ("vision_model", "vision_und_enc_model"):
        tower = getattr(model, name, None)
        if tower is not None:
            units += list(tower.vision_tower.blocks)
    for name in UNITS:
        try:
            units.append(model.get_submodule(name))
        except AttributeError:
            continue
    for name in REPLICATED:
        tower = getattr(model, name, None)
        if tower is None:
            continue
        params = list(tower.parameters())
        if any(p.requires_grad for p in params):
            units.append(tower)
        else:
            ignored |= set(params)
    return ShardPlan(units, ignored)


def wrap(module: nn.Module, mode: str, plan: ShardPlan | None = None, *, param_dtype: str = "float32",
         reduce_dtype: str = "float32", offload: bool = False) -> nn.Module:
    """Wrap the training module for data parallelism. Set requires_grad (apply_stage) first: both
    wrappers record which parameters train. fsdp shards each of `plan.units` (shard_plan: decoder layers,
    vision blocks, towers, embeddings, heads), then the root, so one unit's weights are gathered at a time,
    and leaves `plan.ignored` whole on every rank; `param_dtype`, `reduce_dtype`, `offload`: its
    mixed-precision and offload policies ([train] fsdp_*), refused in the other modes."""
    mode = resolve_mode(mode)
    fsdp_opts = {"fsdp_param_dtype": param_dtype != "float32", "fsdp_reduce_dtype": reduce_dtype != "float32",
                 "fsdp_offload": offload}
    if mode != "fsdp" and any(fsdp_opts.values()):
        raise ValueError(f"[train] {', '.join(k for k, v in fsdp_opts.items() if v)}: FSDP2 settings, but parallel "
                         f"resolves to {mode!r}; set parallel = \"fsdp\" or leave them at their defaults")
    if offload and _info.device.type != "cuda":
        raise ValueError("[train] fsdp_offload: keeps the shards in host memory for CUDA devices; this run is on "
                         f"{_info.device.type} (its shards are in host memory already)")
    if not any(t.is_meta for t in module.state_dict(keep_vars=True).values()):  # a meta module is sharded first
        module.to(_info.device)
    if mode == "none":
        return module
    if mode == "ddp":
        # Every trainable parameter is in every graph (losses.batch_losses runs idle branches on empty
        # inputs), so no unused-parameter search; buffers are constants (RoPE), built identically.
        ids = [_info.device.index] if _info.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=False, forward_sync_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(_info.device.type, (_info.world,))
    policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype),
                                                reduce_dtype=getattr(torch, reduce_dtype)),
              "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    plan = plan or ShardPlan([], set())
    if trained := [n for n, p in module.named_parameters() if p in plan.ignored and p.requires_grad]:
        raise ValueError(f"{trained[0]}: trains, but the shard plan replicates it (its gradients would never be "
                         "reduced across ranks)")
    for unit in plan.units:
        fully_shard(unit, mesh=mesh, **policy)
    fully_shard(module, mesh=mesh, ignored_params=plan.ignored or None, **policy)
    return module


@contextmanager
def no_sync(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Suppress the gradient all-reduce / reduce-scatter (accumulation micro-steps but the last)."""
    if not enabled:
        yield
    elif isinstance(module, DDP):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity on one process); returns a tensor on t's device."""
    if _info.world == 1:
        return t
    x = t.to(_info.device).clone()
    dist.all_reduce(x)
    return x.to(t.device)


def all_reduce_max(n: int) -> int:
    """Largest `n` over ranks (identity on one process)."""
    if _info.world == 1:
        return n
    x = torch.tensor([n], device=_info.device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP grad norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (used for per-rank RNG and data positions)."""
    if _info.world == 1:
        return [obj]
    out: list[Any] = [None] * _info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (identity on one process)."""
    if _info.world == 1:
        return obj
    box = [obj if _info.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` was wrapped by wrap(..., "fsdp"): its state is DTensor shards, one part per rank."""
    return isinstance(module, FSDPModule)


def barrier() -> None:
    if _info.world > 1:
        dist.barrier()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Full, unsharded CPU state dict in the model's own key space (no wrapper prefixes). Collective
    under FSDP; on ranks > 0 it may be empty. `trainable_only`: the parameters that train (LoRA's adapters),
    without the frozen ones and the buffers."""
    if trainable_only:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=True))
    return get_model_state_dict(model, options=_FULL)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by parameter name (so it survives re-sharding). Collective under FSDP."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Every rank passes the full state; each keeps its own shard."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def spawn(fn: Callable[..., Any], ranks: int, *args: Any) -> None:
    """Run `fn(*args)` in `ranks` fresh processes that join one group, as `torchrun --nproc-per-node ranks`
    would start them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR / MASTER_PORT on a free local port): e.g.
    `spawn(train, 2, cfg)` for two data-parallel ranks of one run (gloo on CPU, one thread each unless
    train.threads says otherwise). `fn` and `args` must be picklable. Raises if a rank fails; the others
    are then stopped (they would wait for it in a collective forever)."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spawned, args=(rank, ranks, port, fn, args)) for rank in range(ranks)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                if p.is_alive():
                    p.terminate()
            break
        time.sleep(0.2)
    for p in procs:
        p.join()
    failed = {rank: p.exitcode for rank, p in enumerate(procs) if p.exitcode != 0}
    if failed:
        raise RuntimeError(f"spawn: rank(s) failed with exit codes {failed} (see their output above)")


def _spawned(rank: int, ranks: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)


def teardown() -> None:
    global _info
    if _info.owns_group and dist.is_initialized():
        dist.barrier()  # nobody leaves while another rank still writes through the group
        dist.destroy_process_group()
    _info = DistInfo()
