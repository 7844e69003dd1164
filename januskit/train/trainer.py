"""Training: `train_step` is one optimiser step, readable top to bottom; `train` is the loop around it
(build, resume, step, log, checkpoint, export). Stage-specific choices live in stages.py, everything
distributed in parallel.py.

Output folder after a run:
    config.json, model.safetensors, tokenizer.json, ...   the trained model, official layout (januskit.load)
    run_config.json   resolved run config       metrics.jsonl   one line per logged step     loss.png
    checkpoints/step-00001000/   model.safetensors (native keys, float32), optimizer.pt, trainer.pt
                                 (scheduler, step, RNG states and data positions of every rank),
                                 run_config.json, config.json (the model), DONE (manifest, written last)
With [lora] enabled (lora.py) checkpoints hold adapter_config.json + adapter_model.safetensors instead
of model.safetensors (the frozen base is rebuilt from [model]), and the output folder is the merged
model in the official layout, or only the adapter files when lora.merge_on_export is false.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ..checkpoint.init import random_model
from ..checkpoint.official import OfficialExtras, load_official_with_extras
from ..checkpoint.official_config import write_generation_settings
from ..config import preset, resolve_dtype
from ..models.janus import JanusModel
from ..quantization import check_trainable
from . import parallel, sharded
from .data.batch import IGNORE, TrainBatch
from .checkpoints import (BackgroundSave, checkpoint_key, export_model, is_sharded_checkpoint, list_checkpoints,
                          load_weights, restore_state, save_checkpoint)
from .config import DataContext, LoraSection, ModelSection, RunConfig, describe_step
from .data.packing import split_rows
from .data.records import KINDS, SHORT
from .flow import FlowSettings
from .loggers import check_available, open_loggers
from .lora import apply_lora
from .losses import N_KINDS, REPA, LossForward, image_tokens, label_counts, progress_postfix
from .optim import decay_groups
from .plot import plot_losses, read_metrics
from .stages import Stage, apply_stage, lr_multiplier

log = logging.getLogger("januskit.train")

TIMING_KEYS = ("time_s", "tok_per_s")  # the only metrics that differ between identical runs


class DataSource(Protocol):
    """What the trainer needs from the data side: an endless iterator of TrainBatch for this rank
    whose owner reports and restores its position. state_dict() must describe the position after the
    last batch the iterator yielded, and hold only tensors and plain Python values (it is loaded with
    weights_only=True). By default each item is one micro-batch and a step takes `grad_accum` of them;
    a source with `per_step = True` yields this rank's whole step batch instead (any number of rows),
    which the trainer splits into micro-batches of `micro_batch_size` rows."""

    def __iter__(self) -> Iterator[TrainBatch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class StepConfig:
    grad_accum: int  # items taken from the batch iterator per optimiser step on each rank
    micro_rows: int | None  # split items into micro-batches of at most this many rows; None = as they come
    n_und_tokens: int  # slots per understanding image (to split pixel_values along with the rows)
    grad_clip: float  # max global grad norm
    device: torch.device
    autocast: torch.dtype | None = None  # bfloat16 autocast, or None for plain float32
    repa: bool = False  # JanusFlow with REPA: report its loss separately


def train_step(model: torch.nn.Module, batches: Iterator[TrainBatch], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: StepConfig) -> dict[str, Any]:
    """One optimiser step with gradient accumulation. `model` is a LossForward, possibly wrapped by
    DDP / FSDP. Returns raw metrics (tensors; reduce_metrics turns them into numbers)."""
    # Fetch the whole step first: the loss divisor is the step's loss-token count over every
    # micro-batch and rank, and the data position stays on a step boundary for checkpoints.
    fetched = [next(batches) for _ in range(cfg.grad_accum)]
    counts = torch.stack([label_counts(b) for b in fetched]).sum(0)  # (N_KINDS,) loss tokens per kind
    slots = torch.tensor([sum(b.n_tokens for b in fetched), sum(b.doc_ids.numel() for b in fetched)])
    counts = parallel.all_reduce_sum(torch.cat([counts, slots]))  # one small collective per step
    micro = [m for b in fetched for m in (split_rows(b, cfg.micro_rows, cfg.n_und_tokens) if cfg.micro_rows else [b])]
    # Every rank runs the same number of forwards (FSDP gathers weights in each): pad with empty rows.
    micro += [empty_batch()] * (parallel.all_reduce_max(len(micro)) - len(micro))
    # DDP / FSDP average gradients over ranks; scaling by world / N makes the result the gradient of
    # the global token mean, whatever the split into ranks and micro-batches.
    scale = parallel.world() / max(1, int(counts[:N_KINDS].sum()))
    lr = optimizer.param_groups[0]["lr"]  # the LR this step uses
    loss_sums = torch.zeros(N_KINDS + 1, device=cfg.device)  # und, text, gen, edit, REPA
    for i, batch in enumerate(micro):
        batch = batch.to(cfg.device)
        with parallel.no_sync(model, enabled=i < len(micro) - 1):  # sync only on the last micro-step
            with torch.autocast(cfg.device.type, cfg.autocast or torch.bfloat16, enabled=cfg.autocast is not None):
                total, by_kind, _ = model(batch)
            (total * scale).backward()
        loss_sums += by_kind
        del total, by_kind, batch  # free this micro-batch before the next forward
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss_sums": loss_sums, "counts": counts, "tokens": counts[N_KINDS], "grad_norm": grad_norm, "lr": lr,
            "repa": cfg.repa}


def empty_batch() -> TrainBatch:
    """One padding slot and no labels: a forward that adds nothing to loss or gradients."""
    z = torch.zeros(1, 1, dtype=torch.long)
    f = torch.zeros(1, 1, dtype=torch.bool)
    return TrainBatch(input_ids=z, positions=z, doc_ids=z - 1, und_mask=f, pixel_values=None, gen_mask=f,
                      gen_ids=z, text_labels=z + IGNORE, image_labels=z + IGNORE, kinds=z - 1)


def reduce_metrics(raw: dict[str, Any], step: int) -> dict[str, Any]:
    """Numbers for one metrics line (collective: every rank calls it on the same steps)."""
    sums = parallel.all_reduce_sum(raw["loss_sums"].detach().float()).cpu()
    c = raw["counts"].cpu()
    n = c[:N_KINDS]  # then the real slots and all slots of the step
    m: dict[str, Any] = {"step": step, "loss": float(sums.sum() / n.sum().clamp(min=1))}
    for i, k in enumerate(KINDS):
        m[f"loss_{SHORT[k]}"] = float(sums[i] / n[i]) if n[i] > 0 else None
    if raw.get("repa"):  # JanusFlow with REPA: loss_gen and loss_edit are then the RF term alone
        m["loss_repa"] = float(sums[REPA] / image_tokens(n)) if image_tokens(n) > 0 else None
    real, slots = c[N_KINDS], c[N_KINDS + 1]
    m.update(lr=raw["lr"], grad_norm=float(parallel.local(raw["grad_norm"])), loss_tokens=int(n.sum()),
             tokens=int(real), packing=round(float(real / slots), 6) if slots > 0 else None)
    return m


# ---------------------------------------------------------------------------------------------
# Building blocks of `train`

def build_model(spec: ModelSection) -> tuple[JanusModel, OfficialExtras]:
    """float32 master weights from a checkpoint folder (official layout) or a preset's random init,
    and the folder's unused official entries (for the export; none for a preset)."""
    folder = sharded.source_folder(spec)
    if folder is not None:
        return load_official_with_extras(folder, torch.float32)
    return random_model(preset(spec.source), spec.seed), OfficialExtras()


def set_trainable(loss: LossForward, stage: Stage, lora: LoraSection, seed: int) -> None:
    """The stage's parts (apply_stage; the REPA head counts as the part "repa_head"), or with [lora]
    enabled LoRA adapters on an otherwise frozen model and a frozen REPA head: the stage then only
    gives the optimiser numbers, the schedule and the data ratios. The adapters' init comes from
    `seed` alone, so every rank builds the same ones."""
    head = {} if loss.repa_head is None else {"repa_head": loss.repa_head}
    if lora.enabled:
        apply_lora(loss.model, lora, seed=seed)
        for m in head.values():
            m.requires_grad_(False)  # only the adapters train
    else:
        apply_stage(loss.model, stage, extra=head)


def build_optimizer(module: torch.nn.Module, stage: Stage, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (a LossForward's: the model's, then the REPA head's);
    weight decay on matrices and embeddings only (norm scales and biases are not decayed, the usual
    practice; the papers decay only in Janus Stage III). `fused`: PyTorch's fused kernel (one pass over
    each tensor; other rounding than the default multi-tensor one)."""
    groups = decay_groups(module, stage.weight_decay)
    if not groups:
        raise ValueError(f"stage {stage.name}: no trainable parameters")
    return torch.optim.AdamW(groups, lr=stage.lr, betas=stage.betas, **({"fused": True} if fused else {}))


def accumulation(stage: Stage, micro_batch_size: int, world: int) -> int:
    """Micro-batches per rank per step; the stage batch is rounded up to a multiple of micro x world."""
    return max(1, math.ceil(stage.batch_size / (micro_batch_size * world)))


def warn_rounded_batch(stage: Stage, micro_batch_size: int, world: int, accum: int) -> None:
    """A source of packed rows (not per_step) rounds the stage batch up to micro x world x accum rows."""
    per = micro_batch_size * world
    if accum * per != stage.batch_size:
        log.warning("batch size %d (packed rows) is not a multiple of micro_batch_size x world = %d; using %d",
                    stage.batch_size, per, accum * per)


def build_data(cfg: RunConfig, stage: Stage, model: JanusModel, grad_accum: int, repa: bool = False) -> DataSource:
    """Call the [data] builder ("module:function") with the run's DataContext and the table's options."""
    mod, _, fn = cfg.data.builder.partition(":")
    try:
        builder = getattr(importlib.import_module(mod), fn) if fn else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"[data] builder {cfg.data.builder!r} cannot be imported ({e})") from None
    if builder is None:
        raise ValueError(f"[data] builder {cfg.data.builder!r}: expected 'module:function'")
    ctx = DataContext(ratio=stage.ratio, batch_size=stage.batch_size, grad_accum=grad_accum,
                      micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.train.seq_len, seed=cfg.train.seed,
                      rank=parallel.rank(), world=parallel.world(), model_config=model.config,
                      source=cfg.model.source, model=model, repa=repa)
    return builder(ctx, **cfg.data.options)


def _write_metrics(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(m) + "\n" for m in lines))


def keep_freed_memory() -> bool:
    """glibc's malloc: serve allocations below 32 MB from the heap instead of fresh mmaps and never give the
    heap back (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), for the rest of the process. PyTorch has no
    caching allocator on CPU, so otherwise every large activation or gradient buffer of every step is a new
    mapping whose pages fault in on first touch. False where there is no glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


@dataclass
class Run:
    """What a stage's steps need, built by `build_run` (`train` runs them; bench/bench_train_step.py times them)."""

    stage: Stage
    model: JanusModel
    extras: OfficialExtras
    loss: LossForward  # the objective around `model` (its state dict is what checkpoints hold)
    wrapped: torch.nn.Module  # what train_step calls: `loss`, wrapped for DDP / FSDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: DataSource
    step_cfg: StepConfig
    step: int  # steps already done (resumed from `ckpt`), else 0


def build_run(cfg: RunConfig, *, ckpt: Path | None = None, data: DataSource | None = None,
              prepare: Callable[[JanusModel], None] | None = None) -> Run:
    """Seed, build the model, its trainable parts, the wrapper, optimizer, schedule and data, and restore
    `ckpt` when given (parallel.init first). `data`, `prepare`: as for `train`."""
    info = parallel.info()
    stage = cfg.resolved_stage()
    if cfg.train.keep_memory and not keep_freed_memory():
        log.warning("train.keep_memory: not glibc (no mallopt); ignored")
    parallel.seed_everything(cfg.train.seed)
    # FSDP builds on meta and each rank reads only its shards (sharded.py); LoRA's adapters are drawn real at
    # build time (lora.apply_lora), the frozen base is read shard by shard like any other weight
    meta = parallel.resolve_mode(cfg.train.parallel) == "fsdp"
    model, extras = sharded.build_meta(cfg.model) if meta else build_model(cfg.model)
    flow = model.config.arch == "janusflow"
    if not flow and cfg.flow != FlowSettings():
        raise ValueError(f"[flow] is for JanusFlow models; {cfg.model.source} is {model.config.arch}")
    loss = LossForward(model, cfg.flow if flow else None, seed=cfg.train.seed)
    if prepare is not None:
        prepare(model)
        check_trainable(model)
    set_trainable(loss, stage, cfg.lora, cfg.train.seed)
    held = sharded.real_tensors(loss) if meta else {}
    dcp_ckpt = ckpt is not None and is_sharded_checkpoint(ckpt)  # restore_state loads its weights
    if ckpt is not None and not meta and not dcp_ckpt:
        load_weights(loss, ckpt)
    model.llm.gradient_checkpointing = cfg.train.gradient_checkpointing
    model.llm.packed_attention = cfg.train.attention
    if cfg.train.compile == "layers":  # each decoder layer (the same code, fused); batch shapes vary, so dynamic
        for layer in model.llm.layers:
            layer.compile(dynamic=True)
    loss.train()
    t = cfg.train
    wrapped = parallel.wrap(loss, t.parallel, parallel.shard_plan(model), param_dtype=t.fsdp_param_dtype,
                            reduce_dtype=t.fsdp_reduce_dtype, offload=t.fsdp_offload)
    if meta and dcp_ckpt:
        sharded.allocate(loss, info.device)
    elif meta:
        sharded.fill(loss, sharded.sources_for(loss, cfg.model, held, ckpt, checkpoint_key), info.device)
    optimizer = build_optimizer(loss, stage, fused=cfg.train.fused_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, stage))
    accum = accumulation(stage, cfg.train.micro_batch_size, info.world)
    repa = loss.repa_head is not None
    data = data if data is not None else build_data(cfg, stage, model, accum, repa)
    if getattr(data, "per_step", False):  # a per-step source yields whole steps of exactly batch_size samples
        accum = 1
    else:
        warn_rounded_batch(stage, cfg.train.micro_batch_size, info.world, accum)
    step = restore_state(ckpt, loss, optimizer, scheduler, data) if ckpt is not None else 0
    if cfg.train.autocast == "bfloat16" and info.device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning("train.autocast = bfloat16 on a CPU without native bf16 (%s): PyTorch's bf16 matmul falls back "
                    "to a reference kernel here, many times slower than float32; set autocast = \"none\"",
                    torch.backends.cpu.get_cpu_capability())
    step_cfg = StepConfig(grad_accum=accum, micro_rows=cfg.train.micro_batch_size,
                          n_und_tokens=model.config.vision.n_tokens, grad_clip=stage.grad_clip, device=info.device,
                          autocast=None if cfg.train.autocast == "none" else resolve_dtype(cfg.train.autocast),
                          repa=repa)
    return Run(stage, model, extras, loss, wrapped, optimizer, scheduler, data, step_cfg, step)


def background_saves(cfg: RunConfig) -> Any:
    """[train] async_checkpoint: the process group BackgroundSave's writer thread uses (one of its own, gloo, so
    its collectives never interleave with the step's), or None to save blocking. Refused outside FSDP; a LoRA run
    (adapters alone, small) and a single process save blocking."""
    if not cfg.train.async_checkpoint:
        return None
    mode = parallel.resolve_mode(cfg.train.parallel)
    if mode != "fsdp":
        raise ValueError(f"[train] async_checkpoint: writes FSDP's sharded checkpoints in the background, but parallel "
                         f"resolves to {mode!r}; set parallel = \"fsdp\" or leave it false")
    if cfg.lora.enabled or not torch.distributed.is_initialized():
        log.info("async_checkpoint: %s, so checkpoints are written at once",
                 "a LoRA run's checkpoint is its adapters alone" if cfg.lora.enabled else "one process")
        return None
    return torch.distributed.new_group(backend="gloo")


def busy_threads(samples: int = 5, source: Path = Path("/proc/loadavg")) -> float | None:
    """Threads of other processes running right now: the kernel's runnable count (/proc/loadavg's
    "running/total") less this reader, the median of a few samples; None where there is no /proc. Not the
    load average, which still counts this process's own previous stage for a minute."""
    counts = []
    for _ in range(samples):
        try:
            counts.append(int(source.read_text().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return None
        time.sleep(0.02)
    return float(statistics.median(counts))


def warn_if_oversubscribed(threads: int, busy: float | None = None) -> bool:
    """Warn when the cores are already busy: more runnable threads than cores makes OpenMP's spinning threads
    wait on each other, and a CPU step then takes many times longer (measured here: 1.4 s -> 13-19 s a step
    with two 2-thread jobs on 2 cores). Returns whether it warned."""
    busy = busy_threads() if busy is None else busy
    cores = os.cpu_count() or 1
    if busy is None or busy + threads <= cores:
        return False
    log.warning("the machine is busy (%g other running thread(s) on %d cores) and this run adds %d: oversubscribed "
                "CPU training can be many times slower; wait for the other jobs or set [train] threads lower",
                busy, cores, threads)
    return True


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (oneDNN's avx512_bf16 / AMX kernels)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fastest_autocast() -> str:
    """bf16 autocast where the CPU has native bf16 (about 2x float32's tokens/s), else float32 ("none"):
    for studies and tests, whose figures are per machine anyway; the default model's recipe fixes its own."""
    return "bfloat16" if cpu_has_fast_bf16() else "none"


# ---------------------------------------------------------------------------------------------

def train(cfg: RunConfig, *, data: DataSource | None = None, resume: bool = False,
          prepare: Callable[[JanusModel], None] | None = None) -> Path:
    """Run (or, with resume=True, continue from the newest complete checkpoint) one stage. `data`
    overrides [data] (a DataSource for this rank); `prepare` changes the built model in place before
    anything else sees it (e.g. an ablation's rewiring that keeps the state dict). Returns the output folder.
    With [rl] algorithm set, the stage is online RL instead (januskit.train.rl.loop; no [data])."""
    if cfg.rl.enabled:
        if data is not None or prepare is not None:
            raise ValueError("an [rl] stage draws its own prompts: data= and prepare= are for supervised stages")
        from .rl.loop import train_rl

        return train_rl(cfg, resume=resume)
    info = parallel.init(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if info.device.type == "cpu" and parallel.is_main():
        warn_if_oversubscribed(torch.get_num_threads() * info.world)
    try:
        stage = cfg.resolved_stage()
        out = Path(cfg.train.out)
        ckpt_root = out / "checkpoints"
        done = list_checkpoints(ckpt_root)
        if done and not resume:
            raise FileExistsError(f"{out}: holds checkpoints up to step {done[-1][0]}; pass --resume "
                                  "(resume=True) to continue, or choose another output folder")
        ckpt = done[-1][1] if resume and done else None
        check_available(cfg.train)  # an optional logger that is not installed: stop before building
        background = background_saves(cfg)  # a process group for the checkpoint writer thread, or None
        run = build_run(cfg, ckpt=ckpt, data=data, prepare=prepare)
        stage, model, loss, data, step = run.stage, run.model, run.loss, run.data, run.step
        optimizer, scheduler = run.optimizer, run.scheduler
        accum = run.step_cfg.grad_accum

        metrics_path = out / "metrics.jsonl"
        history = [m for m in read_metrics(metrics_path) if m["step"] <= step] if ckpt is not None else []
        if parallel.is_main():
            out.mkdir(parents=True, exist_ok=True)
            (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            _write_metrics(metrics_path, history)  # drop lines logged after the checkpoint we resume from
            log.info("stage %s: %d steps from step %d; %s", stage.name, stage.steps, step,
                     describe_step(stage.batch_size, info.world, accum, cfg.train.micro_batch_size, cfg.train.seq_len,
                                   per_step=getattr(data, "per_step", False)))

        pending: BackgroundSave | None = None
        loggers = open_loggers(cfg.train, out, step, enabled=parallel.is_main())  # beside metrics.jsonl
        batches = iter(data)
        bar = tqdm(total=stage.steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=not (parallel.is_main() and cfg.train.progress))
        t0, tokens = time.perf_counter(), 0
        while step < stage.steps:
            raw = train_step(run.wrapped, batches, optimizer, scheduler, run.step_cfg)
            step += 1
            tokens += int(raw["tokens"])
            if step % cfg.train.log_every == 0 or step == stage.steps:
                m = reduce_metrics(raw, step)
                dt = time.perf_counter() - t0
                m.update(time_s=round(dt, 3), tok_per_s=round(tokens / dt, 1) if dt > 0 else None)
                if parallel.is_main():
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(m) + "\n")
                    loggers.log(m)  # TensorBoard (loggers.py): the same line
                    bar.set_postfix(progress_postfix(m))
            if pending is not None and pending.ready():  # committed a step after its shards are all written
                pending.commit()
                pending = None
            if step % cfg.train.save_every == 0 or step == stage.steps:
                if pending is not None:  # one checkpoint in flight at a time
                    pending.commit()
                    pending = None
                if background is not None:
                    pending = BackgroundSave(ckpt_root, step, loss, optimizer, scheduler, data, cfg, background)
                else:
                    save_checkpoint(ckpt_root, step, loss, optimizer, scheduler, data, cfg)
            bar.update(1)
        if pending is not None:
            pending.commit()
        bar.close()
        loggers.close()

        export_model(model, out, cfg.model, resolve_dtype(cfg.train.export_dtype), run.extras,
                     adapter_only=cfg.lora.enabled and not cfg.lora.merge_on_export)
        if parallel.is_main() and getattr(data, "model_settings", None):  # e.g. edit_source "vq"
            write_generation_settings(out, data.model_settings)
        if parallel.is_main() and cfg.train.plot:
            plot_losses(read_metrics(metrics_path), out / "loss.png", title=f"{stage.name} ({cfg.model.source})")
        parallel.barrier()
        return out
    finally:
        parallel.teardown()
