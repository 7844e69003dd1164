"""The RL stage's loop (`januskit train` with [rl] algorithm set): rollout, reward, update, log, checkpoint.

A step, on each rank: take this rank's share of the step's P prompts (prompt j of step s is prompt
s * P + j of the source; ranks take j = rank, rank + world, ...), sample `group_size` images for each
with per-image generators seeded by (seed, global image index), decode and score them, normalise the
rewards within each group, get the reference's log-probs on the same tokens, then `inner_steps`
optimiser steps on the GRPO loss (micro-batches of `micro_batch_size` images, gradients averaged over all
ranks' images by DDP). Everything a step draws follows from the seed and the step number, so a resumed
run continues bit for bit; checkpoints and the export are the supervised trainer's.

Metrics per logged step: reward (weighted total) mean and std and each reward's mean and std, the
share of groups with no signal (all images scored alike), the share of distinct images per group, KL to
the reference, the share of tokens whose ratio was clipped, the sampling entropy, loss, LR, grad norm.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ...checkpoint.init import preset_pipeline_parts
from ...checkpoint.official_config import apply_edit_settings, read_guidance_scale
from ...config import resolve_dtype
from ...checkpoint.vae import load_vae
from ...pipelines.janus import JanusPipeline
from ...pipelines.janusflow import JanusFlowPipeline
from ...processing.chat import Processor
from ...processing.edit import DEFAULT_CFG_IMAGE, EditInputs
from ...processing.image import load_image, to_pil
from ...sampling.flow import initial_latents
from ...sampling.logits import row_generator
from .. import parallel
from ..checkpoints import (export_model, is_sharded_checkpoint, list_checkpoints, load_weights, restore_state,
                           save_checkpoint)
from ..config import RunConfig
from ..lora import adapters_disabled, has_lora
from ..loggers import check_available, open_loggers
from ..plot import plot_losses, read_metrics
from ..stages import lr_multiplier
from ..trainer import build_model, build_optimizer, set_trainable
from .flow_grpo import FlowGRPOObjective, rollout_trajectory
from .grpo import GRPOLoss, GRPOObjective, group_advantages, rollout_tokens
from .prompts import prompt_source
from .rewards import RewardSet

log = logging.getLogger("januskit.train")


LATER_SETTINGS = ("cfg_image",)  # [rl] keys that checkpoints written before them do not record


class StepPosition:
    """The data position a checkpoint records: RL draws follow from the step, so this is only a check."""

    def __init__(self, settings: dict[str, Any]) -> None:
        # a setting added later and left unset is left out, so checkpoints written before it still resume
        self.settings = {k: v for k, v in settings.items() if not (k in LATER_SETTINGS and v is None)}

    def state_dict(self) -> dict[str, Any]:
        return {"rl": json.dumps(self.settings, sort_keys=True)}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        now = self.state_dict()["rl"]
        if st.get("rl") != now:
            raise ValueError(f"cannot resume: the checkpoint's [rl] settings were {st.get('rl')}, now {now} (the "
                             "rollouts would differ)")


def _processor(source: str, model) -> Processor:
    p = Path(source)
    if p.is_dir():  # edit prompts built as the folder's model was trained to read them
        proc = Processor.from_folder(p, model.config.vision.image_size, model.config.vision.n_tokens)
        apply_edit_settings(proc, p, model.config)
        return proc
    return preset_pipeline_parts(source, dtype=torch.float32)[1]  # a preset: its synthetic processor


@dataclass
class Collector:
    """What differs between the algorithms: the objective, how a rollout samples, how it becomes images."""

    objective: nn.Module  # GRPOObjective or FlowGRPOObjective: .model, .logprobs, forward
    rollout: Callable[..., torch.Tensor]  # (prompt rows, generators[, edit=EditInputs]) -> samples
    images: Callable[[torch.Tensor], list[Image.Image]]
    # an edit prompt's source images -> the (k, 3, S, S) pixels its sampler takes; None: no edits (JanusFlow)
    source_pixels: Callable[[list[Image.Image]], torch.Tensor] | None = None


def _collector(cfg: RunConfig, model, proc: Processor, cfg_weight: float) -> Collector:
    rl = cfg.rl
    loss = GRPOLoss(clip=rl.clip, kl_weight=rl.kl_weight)
    if rl.algorithm == "flow_grpo":
        src = Path(cfg.model.source)
        if not (src / "vae").is_dir():
            raise ValueError(f"[rl] flow_grpo: {cfg.model.source} has no vae/ folder; the rewards score decoded "
                             "images (a JanusFlow model folder with its VAE in vae/)")
        pipe = JanusFlowPipeline(model, proc, src, load_vae(src / "vae"))
        objective = FlowGRPOObjective(model, loss, cfg_weight=cfg_weight, noise_level=rl.noise_level,
                                      steps=rl.sde_steps)

        def rollout(rows, gens):
            z0 = initial_latents(model.config.latent_shape, gens)
            return rollout_trajectory(model, rows, z0, steps=rl.sde_steps, cfg_weight=cfg_weight,
                                      noise_level=rl.noise_level, generators=gens)
        return Collector(objective, rollout, lambda traj: to_pil(pipe.decode_latents(traj[:, -1])))
    pipe = JanusPipeline(model, proc, cfg.model.source)
    objective = GRPOObjective(model, loss, pad_id=proc.pad_id, cfg_weight=cfg_weight, temperature=rl.temperature,
                              mode=rl.logprob)

    def rollout(rows, gens, edit=None):  # looks rollout_tokens up at call time (tests replace it)
        return rollout_tokens(model, rows, pad_id=proc.pad_id, cfg_weight=cfg_weight, temperature=rl.temperature,
                              generators=gens, edit=edit)
    return Collector(objective, rollout, lambda tokens: to_pil(pipe.decode_image_pixels(tokens)),
                     lambda ims: torch.stack([pipe.source_pixels(load_image(im)) for im in ims]))


def edit_inputs(texts: list, group_size: int, proc: Processor, collect: Collector, cfg_image: float | None,
                algorithm: str) -> EditInputs | None:
    """The rows' sources when the step's prompts are edits (their meta holds "images"), else None. Each group's
    pixels are one tensor shared by its rows (the sampler encodes it once)."""
    has = [bool(x.meta.get("images")) for x in texts]
    if not any(has):
        return None
    if not all(has):
        raise ValueError("[rl] prompts: a step mixes edit prompts (with source images) and text prompts; use one kind")
    if collect.source_pixels is None:
        raise ValueError(f"[rl] algorithm {algorithm!r} does not take edit prompts (source images); GRPO on a Janus "
                         "model does")
    tok = proc.tokenizer
    pixels = [collect.source_pixels(list(x.meta["images"])) for x in texts]
    return EditInputs([p for p in pixels for _ in range(group_size)],
                      DEFAULT_CFG_IMAGE if cfg_image is None else cfg_image, tok.image_id, tok.boi_id, tok.eoi_id,
                      via=proc.edit_source)


def _rows(e: EditInputs | None, c: slice) -> dict[str, Any]:
    """Keyword arguments for the rows `c` of a step: their sources when it is an edit step."""
    return {} if e is None else {"edit": dataclasses.replace(e, sources=e.sources[c])}


def train_rl(cfg: RunConfig, *, resume: bool = False) -> Path:
    info = parallel.init(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    try:
        if cfg.rl.algorithm == "dpo":
            from .dpo import run_dpo

            return run_dpo(cfg, info, resume)
        return _run(cfg, info, resume)
    finally:
        parallel.teardown()


def start(cfg: RunConfig, info, resume: bool, arch: str) -> tuple[Path, Path | None, Any, Any, Processor]:
    """Output folder, the checkpoint to resume (or None), the float32 model and its extras, the processor."""
    stage = cfg.resolved_stage()
    out = Path(cfg.train.out)
    done = list_checkpoints(out / "checkpoints")
    if done and not resume:
        raise FileExistsError(f"{out}: holds checkpoints up to step {done[-1][0]}; pass --resume "
                              "(resume=True) to continue, or choose another output folder")
    if stage.batch_size % info.world:
        raise ValueError(f"[stage] batch_size {stage.batch_size} (prompts or pairs per step) must be a multiple of "
                         f"the {info.world} ranks: each rank takes whole groups")
    parallel.seed_everything(cfg.train.seed)
    model, extras = build_model(cfg.model)
    if model.config.arch != arch:
        raise ValueError(f"[rl] algorithm {cfg.rl.algorithm!r} is for "
                         f"{'JanusFlow' if arch == 'janusflow' else 'Janus / Janus-Pro'}; {cfg.model.source} is "
                         f"{model.config.arch}" + ("" if arch == "janusflow" else " (use algorithm = \"flow_grpo\")"))
    return out, done[-1][1] if resume and done else None, model, extras, _processor(cfg.model.source, model)


@dataclass
class Trainable:
    """What every RL loop updates: the frozen reference, the wrapped objective, optimiser and schedule."""

    reference: nn.Module | None  # a frozen copy of the initial model, or None with LoRA (adapters switched off)
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int  # optimiser steps already done (restored from the checkpoint)

    def reference_mode(self, model: nn.Module):
        """Context in which `self.reference or model` computes the reference policy."""
        return adapters_disabled(model) if self.reference is None else nullcontext()


def prepare(cfg: RunConfig, objective: nn.Module, ckpt: Path | None, position: Any) -> Trainable:
    """Trainable parts (the stage's, or LoRA), the reference (the initial model, made before any checkpoint is
    loaded), the DDP wrapper, AdamW and the schedule, and the restored state when resuming."""
    stage, model = cfg.resolved_stage(), objective.model
    set_trainable(objective, stage, cfg.lora, cfg.train.seed)
    reference = None if has_lora(model) else copy.deepcopy(model).requires_grad_(False).eval()
    if ckpt is not None and not is_sharded_checkpoint(ckpt):  # a sharded one's weights: restore_state loads them
        load_weights(objective, ckpt)
    wrapped = parallel.wrap(objective, cfg.train.parallel, parallel.shard_plan(model))
    optimizer = build_optimizer(objective, stage, fused=cfg.train.fused_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, stage))
    step = restore_state(ckpt, objective, optimizer, scheduler, position) if ckpt is not None else 0
    return Trainable(reference, wrapped, optimizer, scheduler, step)


def open_metrics(cfg: RunConfig, out: Path, resumed: bool, step: int) -> Path:
    """metrics.jsonl with the lines up to `step` (those after the checkpoint are dropped); run_config.json."""
    path = out / "metrics.jsonl"
    history = [m for m in read_metrics(path) if m["step"] <= step] if resumed else []
    if parallel.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        path.write_text("".join(json.dumps(m) + "\n" for m in history))
    return path


def autocast_context(cfg: RunConfig, device: torch.device) -> Callable[[], Any]:
    dtype = None if cfg.train.autocast == "none" else resolve_dtype(cfg.train.autocast)
    return (lambda: torch.autocast(device.type, dtype)) if dtype is not None else nullcontext


def optimizer_step(cfg: RunConfig, t: Trainable) -> torch.Tensor:
    """Clip, step, schedule, zero; returns the gradient norm before clipping."""
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.resolved_stage().grad_clip)
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def finish(cfg: RunConfig, model: nn.Module, extras: Any, out: Path, metrics_path: Path,
           plots: list[tuple[str, list[str], str]]) -> Path:
    """Export (official layout; the source's generation_config.json kept) and the plots (file, keys, title)."""
    export_model(model, out, cfg.model, resolve_dtype(cfg.train.export_dtype), extras,
                 adapter_only=cfg.lora.enabled and not cfg.lora.merge_on_export)
    if parallel.is_main():
        gen_cfg = Path(cfg.model.source) / "generation_config.json"
        if gen_cfg.is_file():
            (out / "generation_config.json").write_bytes(gen_cfg.read_bytes())
        if cfg.train.plot:
            lines = read_metrics(metrics_path)
            for name, keys, title in plots:
                plot_losses(lines, out / name, keys=keys, title=title)
    parallel.barrier()
    return out


def _run(cfg: RunConfig, info, resume: bool) -> Path:
    rl, stage = cfg.rl, cfg.resolved_stage()
    arch = "janusflow" if rl.algorithm == "flow_grpo" else "janus"
    if parallel.resolve_mode(cfg.train.parallel) == "fsdp":  # before loading anything
        raise ValueError(f"[train] parallel = \"fsdp\" with [rl] algorithm {rl.algorithm!r}: its rollouts sample "
                         "from the policy outside a training forward, where FSDP's weights are shards; use parallel = \"ddp\" "
                         "(every rank holds the whole policy) or LoRA to fit it")
    check_available(cfg.train)  # an optional logger that is not installed: stop before loading
    out, ckpt, model, extras, proc = start(cfg, info, resume, arch)
    folder_w = read_guidance_scale(cfg.model.source) if Path(cfg.model.source).is_dir() else None
    default_w = JanusFlowPipeline.default_cfg_weight if arch == "janusflow" else JanusPipeline.default_cfg_weight
    cfg_weight = float(rl.cfg_weight if rl.cfg_weight is not None else folder_w if folder_w is not None else default_w)
    collect = _collector(cfg, model, proc, cfg_weight)
    objective = collect.objective
    position = StepPosition(cfg.to_dict()["rl"] | {"cfg_weight": cfg_weight, "seed": cfg.train.seed})
    t = prepare(cfg, objective, ckpt, position)
    step = t.step  # optimiser steps so far; a rollout makes inner_steps of them
    rewards = RewardSet.from_table(rl.rewards)
    prompts = prompt_source(rl.prompts, cfg.train.seed, rl.prompt_categories)
    amp = autocast_context(cfg, info.device)
    metrics_path = open_metrics(cfg, out, ckpt is not None, step)
    loggers = open_loggers(cfg.train, out, step, enabled=parallel.is_main(), rl=True)  # beside metrics.jsonl
    if parallel.is_main():
        log.info("rl %s: %d steps from step %d; %d prompts x %d images per step on %d ranks, CFG %g, reward %s",
                 rl.algorithm, stage.steps, step, stage.batch_size, rl.group_size, info.world, cfg_weight,
                 ", ".join(rewards.names))
    bar = tqdm(total=stage.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (parallel.is_main() and cfg.train.progress))
    t0 = time.perf_counter()
    G, P = rl.group_size, stage.batch_size
    while step < stage.steps:
        rollout_index = step // rl.inner_steps
        groups = list(range(rollout_index * P + info.rank, (rollout_index + 1) * P, info.world))
        texts = [prompts(g) for g in groups]
        edit = edit_inputs(texts, G, proc, collect, rl.cfg_image, rl.algorithm)
        ids = [proc.generation_prompt(x) if edit is None else proc.edit_prompt(x, len(x.meta["images"])) for x in texts]
        rows = [i for i in ids for _ in range(G)]
        row_texts = [x for x in texts for _ in range(G)]
        gens = [row_generator(cfg.train.seed, g * G + k) for g in groups for k in range(G)]
        model.eval()
        with amp():  # VQ ids (Janus) or SDE trajectories (JanusFlow)
            samples = collect.rollout(rows, gens, **_rows(edit, slice(None)))
        images = collect.images(samples)
        total, each = rewards(row_texts, images)
        adv = group_advantages(total, G, rl.adv_eps)
        micro = max(1, cfg.train.micro_batch_size)
        chunks = [slice(a, min(a + micro, len(rows))) for a in range(0, len(rows), micro)]
        with torch.no_grad(), amp(), t.reference_mode(model):
            ref = [tuple(x.float() for x in objective.logprobs(rows[c], samples[c], t.reference, **_rows(edit, c)))
                   for c in chunks]
        model.train()
        old_lp: list[torch.Tensor | None] = [None] * len(chunks)
        n_images = len(rows) * info.world
        for _ in range(rl.inner_steps):
            lr = t.optimizer.param_groups[0]["lr"]
            sums = torch.zeros(4, dtype=torch.float64)  # loss, kl, clipped, entropy (sums over images)
            for j, c in enumerate(chunks):
                with parallel.no_sync(t.wrapped, enabled=j < len(chunks) - 1), amp():
                    per_image, lp, stats = t.wrapped(rows[c], samples[c], adv[c], old_lp[j], ref[j], **_rows(edit, c))
                    (per_image.float().sum() * (info.world / n_images)).backward()
                if old_lp[j] is None:
                    old_lp[j] = lp.float()
                sums += torch.stack([per_image.detach().double().sum(), stats["kl"].double().sum(),
                                     stats["clipped"].double().sum(), stats["entropy"].double().sum()])
            grad_norm = optimizer_step(cfg, t)
            step += 1
            if step % cfg.train.log_every == 0 or step == stage.steps:
                m = _metrics(step, lr, grad_norm, sums, total, each, images, G, n_images)
                m.update(time_s=round(time.perf_counter() - t0, 3))
                if parallel.is_main():
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(m) + "\n")
                    loggers.log(m)
                    bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.4f}")
            # Checkpoints fall on rollout boundaries: a resumed run re-samples its next rollout from the
            # weights that sampled it the first time.
            if (step % cfg.train.save_every == 0 and step % rl.inner_steps == 0) or step == stage.steps:
                save_checkpoint(out / "checkpoints", step, objective, t.optimizer, t.scheduler, position, cfg)
            bar.update(1)
            if step >= stage.steps:
                break
    bar.close()
    loggers.close()
    return finish(cfg, model, extras, out, metrics_path,
                  [("reward.png", ["reward"] + [f"reward_{n}" for n in rewards.names],
                    f"{rl.algorithm} reward ({cfg.model.source})"),
                   ("kl.png", ["kl"], f"{rl.algorithm} KL to the reference")])


def _metrics(step: int, lr: float, grad_norm: torch.Tensor, sums: torch.Tensor, total: torch.Tensor,
             each: dict[str, torch.Tensor], images: list[Image.Image], G: int, n_images: int) -> dict[str, Any]:
    """One metrics line, over all ranks (collective)."""
    r = torch.stack([total, *each.values()]).double()  # (1 + rewards, n)
    g = r[0].view(-1, G)
    flat = (g.std(-1, unbiased=False) == 0).double().sum()
    distinct = sum(len({im.tobytes() for im in images[i:i + G]}) / G for i in range(0, len(images), G))
    local = torch.cat([sums, r.sum(-1), (r * r).sum(-1), torch.stack([flat, torch.tensor(float(distinct))])])
    tot = parallel.all_reduce_sum(local)
    k = len(each) + 1
    s, rs, rss, (flat_n, distinct_n) = tot[:4], tot[4:4 + k], tot[4 + k:4 + 2 * k], tot[4 + 2 * k:]
    groups = n_images / G
    mean = rs / n_images
    std = (rss / n_images - mean * mean).clamp(min=0).sqrt()
    m: dict[str, Any] = {"step": step, "loss": float(s[0] / n_images), "reward": float(mean[0]),
                         "reward_std": float(std[0])}
    for i, name in enumerate(each, 1):
        m[f"reward_{name}"], m[f"reward_{name}_std"] = float(mean[i]), float(std[i])
    m.update(kl=float(s[1] / n_images), clipped=float(s[2] / n_images), entropy=float(s[3] / n_images),
             flat_groups=float(flat_n / groups), distinct=float(distinct_n / groups), lr=lr,
             grad_norm=float(parallel.local(grad_norm)), images=n_images)
    return m
