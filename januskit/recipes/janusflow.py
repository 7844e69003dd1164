"""The miniature JanusFlow: the same world, the JanusFlow architecture and its three stages.

It starts where the Janus-Pro recipe (recipe.py) has trained what both models share, as the paper's
JanusFlow starts from a pretrained SigLIP and LLM: the world, the tokenizer, the SigLIP encoder
(sigmoid loss) and the text-pretrained LLM of a `januskit world build` work folder. Then:
    vae      a small AutoencoderKL trained on the world's images (64 px <-> 4x16x16; the SDXL VAE's
             stand-in), its scaling factor fitted so the latents have std 1
    init     mini-janusflow with SigLIP and the LLM copied in, the new parts freshly initialised
    flow1..3 the JanusFlow stages (januskit.train.stages janusflow/1..3) with REPA, scaled to minutes
and `januskit eval world` scores the result with the same judge. The REPA ablation (`repa=False`)
runs flow2 and flow3 again from the same flow1 with repa_weight 0, everything else equal.
Every step writes RECIPE_DONE, so a rerun continues; seeds are fixed.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..checkpoint.official import copy_side_files, load_official, save_janus
from ..config import preset
from ..models.janusflow import JanusFlowModel
from ..checkpoint.vae import save_vae
from ..models.vae import LatentVAE, mini_vae_config
from ..processing.image import to_gen_pixels
from ..train.checkpoints import BASE_RECORDS
from ..train.config import RunConfig
from ..train.flow import FlowSettings
from ..train.pretrain.vae import VAETrainConfig, reconstruction_stats, train_vae
from .chain import done, export_and_evaluate, mark_done, run_stages
from .default_model import (Recipe, StagePlan, _jsonl, _recipe_json, build, placed_processor_config, stage_config,
                            text_start)


@dataclass(frozen=True)
class FlowRecipe:
    seed: int = 0
    preset: str = "mini-janusflow"
    vae: VAETrainConfig = field(default_factory=lambda: VAETrainConfig(steps=600, batch_size=8))
    vae_images: int = 4096
    # REPA after layer 1 of 4: the paper's 6 of 24, the same quarter of the depth.
    flow: FlowSettings = field(default_factory=lambda: FlowSettings(repa_layer=1, repa_weight=1.0))
    stages: tuple[StagePlan, ...] = (
        StagePlan("flow1", "janusflow/1", steps=200, batch_size=32, lr=2e-3, warmup=20),
        StagePlan("flow2", "janusflow/2", steps=1400, batch_size=32, lr=2e-3, warmup=50),
        StagePlan("flow3", "janusflow/3", steps=1200, batch_size=32, lr=8e-4, schedule="cosine"),
    )
    base: Recipe = field(default_factory=Recipe)  # what the shared first steps come from

    def smoke(self) -> "FlowRecipe":
        return dataclasses.replace(
            self, vae=dataclasses.replace(self.vae, steps=4, batch_size=4, log_every=2), vae_images=64,
            stages=tuple(dataclasses.replace(s, steps=2, batch_size=8, warmup=0) for s in self.stages),
            base=self.base.smoke())


def _world_images(world: Path, n: int, size: int) -> torch.Tensor:
    rows = _jsonl(world / "train" / "generation.jsonl")[:n]
    return torch.stack([to_gen_pixels(Image.open(world / "train" / r["image"]).convert("RGB"), size) for r in rows])


def build_vae(world: Path, dst: Path, r: FlowRecipe) -> dict[str, Any]:
    c = preset(r.preset)
    images = _world_images(world, r.vae_images, c.vision.image_size)
    vae = LatentVAE.from_config(mini_vae_config(), seed=r.seed)
    t = time.perf_counter()
    hist = train_vae(vae, images, dataclasses.replace(r.vae, seed=r.seed), progress=True)
    if tuple(vae.encode(images[:1]).shape[1:]) != c.latent_shape:
        raise ValueError(f"the world VAE gives latents of shape {tuple(vae.encode(images[:1]).shape[1:])}, "
                         f"{r.preset} expects {c.latent_shape}")
    report = {"seconds": round(time.perf_counter() - t, 1), "last": hist[-1] if hist else {},
              "reconstruction": {k: v for k, v in reconstruction_stats(vae, images[:512]).items()
                                 if k != "per_image_max_255"}, "scaling_factor": vae.scaling_factor}
    save_vae(vae, dst, overwrite=True)
    return report


def init_flow(text_stage: Path, vae: Path, dst: Path, r: FlowRecipe) -> Path:
    """mini-janusflow with SigLIP and the LLM (embeddings, layers, lm_head) of the Janus-Pro recipe's
    text stage, and the JanusFlow-only parts from a seeded N(0, 0.02) init (zero biases, unit norms,
    the GRN's zeros as in the reference)."""
    c = preset(r.preset)
    janus = load_official(text_stage, torch.float32)
    model = JanusFlowModel(c)
    g = torch.Generator().manual_seed(r.seed + 10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "channelwise_norm" in name or name == "beg_of_und_embed":
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.vision_und_enc_model.load_state_dict(janus.vision_model.state_dict())
        model.language_model.load_state_dict(janus.language_model.state_dict())
    save_janus(model, dst, overwrite=True)
    copy_side_files(text_stage, dst, skip=BASE_RECORDS)  # tokenizer and processor configs; a new model: no records
    # it learns conversations from the written split, image first, whatever layout the shared components were for
    (dst / "processor_config.json").write_text(placed_processor_config(dst, False), encoding="utf-8")
    shutil.copytree(vae, dst / "vae", dirs_exist_ok=True)
    return dst


def flow_stage_config(plan: StagePlan, source: Path, out: Path, world: Path, r: FlowRecipe, repa: bool) -> RunConfig:
    # the written split's images and conversations (image first)
    cfg = stage_config(plan, source, out, world, dataclasses.replace(r.base, data="files", question_first=False))
    cfg.data.options["generation"] = str(world / "train" / "generation.jsonl")  # images, encoded by the VAE
    cfg.flow = r.flow if repa else dataclasses.replace(r.flow, repa_weight=0.0)
    return cfg


def build_flow(out: str | Path, work: str | Path, recipe: FlowRecipe = FlowRecipe(), *, repa: bool = True,
               evaluate_model: bool = True, eval_settings: Any = None) -> Path:
    """Run (or continue) the chain; `work` is (or becomes) a `januskit world build` work folder, whose
    world, components and text stage are reused. `repa=False`: the ablation's branch (flow2 and flow3
    without REPA, in work/flow2-norepa, work/flow3-norepa)."""
    out, work = Path(out), Path(work)
    torch.set_num_threads(recipe.base.threads)
    text = work / recipe.base.text_plan.name
    if not done(text):  # the shared steps: world, components, text-pretrained LLM
        build(work / "janus-model", work, text_start(recipe.base), evaluate_model=False)
    world = work / "world"
    times: dict[str, float] = {}
    t = time.perf_counter()
    vae = work / "vae"
    if not (vae / "config.json").is_file():
        report = build_vae(world, vae, recipe)
        (work / "vae-report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    times["vae"] = time.perf_counter() - t
    source = work / "flow-init"
    if not done(source):
        init_flow(text, vae, source, recipe)
        mark_done(source)

    def stage(plan: StagePlan) -> tuple[str, Callable[[Path, Path], RunConfig]]:
        # Stage 1 trains without REPA in both branches, so the ablation branches after it.
        first = plan.stage == "janusflow/1"
        name = plan.name if repa or first else f"{plan.name}-norepa"
        return name, lambda src, dst: flow_stage_config(plan, src, dst, world, recipe, repa and not first)

    source = run_stages(work, source, [stage(p) for p in recipe.stages], times)
    return export_and_evaluate(source, out, world, _recipe_json(recipe, times) | {"repa": repa},
                               evaluate_model=evaluate_model, eval_settings=eval_settings, label="flow recipe")
