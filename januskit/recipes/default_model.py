"""The default model from nothing, in one call: world -> tokenizer -> SigLIP -> VQ -> the three Janus-Pro
stages -> GRPO on the world's judge -> evaluation. `januskit world build` runs it.

Every step writes its own folder under `work/` and is skipped when that folder is complete, so an
interrupted build continues where it stopped; every step is seeded, so the same recipe on the same
machine gives the same weights.

The stages are the Janus-Pro recipe (januskit.train.stages) at miniature scale: the same trainable
parts and data ratios (I: adaptors + image head on und:gen 1:3; II: + LLM on und:text:gen 2:3:5;
III: + SigLIP on 5:1:4), AdamW (0.9, 0.95), clip 1.0. Steps and batches are set by the CPU budget, and
the LRs are higher than the papers' (a 3M-parameter LLM trained for thousands of steps, not a 1B one
for 100K+): Stages II and III use the paper's LRs times the same factor 20, so their ratio is kept;
Stage I trains randomly initialised adaptors as the paper's does. Departures, all because the budget
is tiny: Stage III decays its LR to 0 on a cosine (the papers keep it constant; at this scale the
anneal is worth more than the last constant-LR steps); every sample is a newly rendered scene (no
sample repeats) with captions weighted towards binding (the "v3" mix); an understanding conversation asks
one question, before the image; the LLM starts untrained at Stage I (no text-only pretraining); bf16
autocast where the CPU has it natively; and the CFG weight is chosen on the val split and shipped in the
model folder.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..checkpoint.init import processor_files
from ..checkpoint.official import load_janus, load_official_with_extras, save_janus
from ..config import JanusConfig, preset
from ..models.janus import JanusModel
from ..processing.image import ImageTransform, to_gen_pixels
from ..processing.tokenizer import TextTokenizer
from ..processing.synthetic_tokenizer import build_synthetic_tokenizer
from ..train.config import RunConfig
from ..train.pretrain.siglip import SigLIPTrainConfig, init_vision_tower, train_siglip
from ..train.data.vq_cache import cache_vq_ids
from ..train.pretrain.vq import VQTrainConfig, reconstruction_stats, train_vq, train_vq_decoder
from ..train.checkpoints import PROVENANCE, list_checkpoints
from ..train.trainer import fastest_autocast, train
from ..world.dataset import held_out, write_world
from ..world.prompts import describe, scene_from_json
from ..world.render import render
from ..world.scene import PATCH_CLASSES, patch_labels
from ..world.variants import variants
from .chain import done, export_and_evaluate, log, mark_done, run_stages, step_seconds
from .rl_world import RLPlan, rl_run_config

PRESET = "mini-janus-pro"
SYSTEM_PROMPT = ""  # the world's chats carry no system prompt (written to processor_config.json)


@dataclass(frozen=True)
class StagePlan:
    name: str  # output subfolder
    stage: str  # row of januskit.train.stages.STAGES: trainable parts and data ratio
    steps: int
    batch_size: int  # samples per optimiser step
    lr: float
    warmup: int = 0
    ratio: tuple[float, ...] | None = None  # None = the stage's own; a fourth weight draws edits (world.edits)
    schedule: str | None = None  # None = the stage's own ("constant" in Janus-Pro); "cosine" decays to min_lr_ratio
    min_lr_ratio: float = 0.0


# The build's RL step (the Step 8 study in docs/rl.md picked it): 900 steps of 8 training prompts x 8 images,
# log-probs of the conditional distribution, LR 2e-4, KL 0.04; prompts drawn with position, colour attribution
# (the categories supervised training leaves lowest) and colours with a relation (the README's kind of prompt)
# twice as often as the others.
RL_PLAN = RLPlan(steps=900, prompts_per_step=8, group_size=8, lr=2e-4, kl_weight=0.04, logprob="cond",
                 categories=("single_object", "two_object", "counting", "colors", "position", "position",
                             "color_attr", "color_attr", "color_position", "color_position"), eval_every=150)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    preset: str = PRESET
    world_scale: float = 1.0  # size of the train split (1 = januskit.world.dataset.SIZES)
    component_images: int = 8000  # train images used to pretrain SigLIP and the VQ
    # SigLIP's batches: 0 = random train images; k > 0 = groups of a train scene and k minimal-contrast variants
    # (world.variants: colours swapped between objects, places traded, an object moved, recoloured or reshaped),
    # drawn into one batch, so that telling the captions apart takes which colour is which shape where.
    siglip_variants: int = 0
    # SigLIP's dense objective beside the sigmoid loss (SigLIPTrainConfig.dense_classes): every patch learns the
    # shape and colour of the object in its grid cell and the cell (world.scene.patch_labels), so each patch
    # token carries its object whole, as web-scale pretraining gives the real SigLIP; the LLM then has a lookup
    # to make, not a binding to work out.
    # On in the recipe since the December 4th build with token weighting (800 SigLIP steps at LR 2e-3, which the
    # dense heads need to reach 1.000): after SFT GenEval-style 0.626 and QA 0.726, after GRPO 0.723 and 0.724,
    # against the earlier recipe's 0.549 / 0.644 and 0.646 / 0.656 (docs/miniature-world.md). With "turn"
    # weighting it had come out lower: the two levers do not stack.
    siglip_dense: bool = True
    siglip: SigLIPTrainConfig = field(default_factory=lambda: SigLIPTrainConfig(steps=800, batch_size=128, lr=2e-3,
                                                                                 warmup=30))
    vq: VQTrainConfig = field(default_factory=lambda: VQTrainConfig(steps=1200, batch_size=8, lr=1e-3, warmup=50))
    # The VQ's normalisation (VQConfig.norm): "group" is VQ-16's GroupNorm, whose statistics span the image, so an
    # edit of one object moves tokens everywhere; "branch" normalises each position's channels inside the residual
    # branches only. With `vq.attention = False` too the tokens are local, which the tokenizer study found easier to
    # draw (docs/miniature-world.md). A model with "branch" no longer converts to HF transformers' Janus.
    vq_norm: str = "group"
    # The VQ decoder polished after the LLM stages (`vq_decoder_steps` > 0; train.pretrain.vq.train_vq_decoder): the
    # encoder and codebook stay as the LLM learnt them, so every id means what it meant, while the decoder trains
    # on the VQ's images with a share `vq_decoder_empty` of empty canvases. The VQ never sees an empty image
    # (the world's scenes hold one to four objects) and draws the one an edit asks for ("remove" the only
    # object) with specks the judge reads as objects: with vq.steps = 4800, 600 decoder steps (in an experiment
    # close to this step) took the edit targets' ceiling from 0.950 to 0.997 (docs/editing.md). 0 = off (the
    # shipped model's recipe).
    vq_decoder_steps: int = 0
    vq_decoder_lr: float = 2e-4
    vq_decoder_empty: float = 0.05
    # No text-only pretraining before Stage I since the December 5th build: 100 text steps kept the LLM from
    # forming the look-up of what a question asks in the image tokens (docs/miniature-world.md: after SFT QA 0.850
    # and GenEval-style 0.646 without them, 0.680 and 0.561 with them, question-first either way).
    stages: tuple[StagePlan, ...] = (
        StagePlan("stage1", "janus-pro/1", steps=200, batch_size=32, lr=2e-3, warmup=20),
        StagePlan("stage2", "janus-pro/2", steps=5600, batch_size=32, lr=2e-3, warmup=50),
        StagePlan("stage3", "janus-pro/3", steps=4800, batch_size=32, lr=8e-4, schedule="cosine"),
    )
    # The LLM stages' data: "fresh" draws a newly rendered scene for every sample (train.data.fresh; VQ ids
    # computed on the fly), "files" reads the written train split (VQ ids cached once).
    data: str = "fresh"
    captions: str = "v3"  # generation captions (world.captions): v2's kinds (colour+position, counts+colours,
    # rewording) with the binding kinds weighted up
    # the answers' loss (train.data.encode): "token" weighs every answer token alike, so a conversation's 30-token
    # scene description outweighs its one-word answers 30 to 1; "turn" weighs every answer alike (the proxy
    # study's second lever; with the dense SigLIP it did not carry over to the full build, see above)
    answer_weighting: str = "token"
    turns: int = 1  # questions per understanding conversation (random type order with more than one)
    # The first question before the image, so the image tokens are read knowing what is asked (the look-up study,
    # docs/miniature-world.md); the model's processor_config.json then says image_placement "after", so a plain
    # `chat(question, images)` (and the eval) asks in the layout it was trained on. The default since the December
    # 5th build, with one question a conversation and no text stage: after SFT QA 0.850 and GenEval-style 0.646,
    # against image-first with three questions (the b2 build, text stage on) 0.726 and 0.626.
    question_first: bool = True
    # The text-only pretraining (100 steps) the JanusFlow build and the Janus Table 5 ablation start their LLM
    # from, with the world and components (`text_start`); not a stage of this chain (see `stages`).
    text_plan: StagePlan = StagePlan("text", "janus-pro/2", steps=100, batch_size=32, lr=2e-3, warmup=10,
                                     ratio=(0, 1, 0))
    # CFG weights tried on the val split after training; the best is written to the model's
    # generation_config.json (guidance_scale), which the pipeline takes as its default. () = keep the reference's.
    cfg_candidates: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0)
    # GRPO after Stage III (januskit.train.rl, docs/rl.md): the world's judge as the reward on training prompts,
    # rollouts at the CFG weight chosen on val for Stage III's model; the weight is chosen again afterwards.
    # None = the supervised model is the result.
    rl: RLPlan | None = field(default_factory=lambda: RL_PLAN)
    seq_len: int = 512
    micro_batch_size: int = 8
    threads: int = 2
    # "auto": bf16 autocast where the CPU has native bf16 (avx512_bf16, AMX: 1.67x float32's samples/s on the
    # recipe's Stage II step), float32 elsewhere (on an AVX2 CPU PyTorch's bf16 matmul falls back to a reference
    # kernel, 20x slower; docs/miniature-world.md). A build resolves it once and keeps it in work/autocast.json,
    # so a build resumed on another CPU goes on as it began.
    autocast: str = "auto"
    attention: str = "segments"  # packed-row attention of the LLM stages (train.attention): "mask" or "segments"
    compile: str = "none"  # torch.compile in the LLM stages (train.compile): "none" or "layers"
    keep_memory: bool = False  # LLM stages keep freed memory in the process (train.keep_memory; glibc only)
    fused_optimizer: bool = False  # LLM stages with AdamW's fused kernel (train.fused_optimizer)
    ranks: int = 1  # data-parallel processes of the LLM stages (DDP, gloo; `threads` each); 1 = in this process
    export_dtype: str = "bfloat16"

    def smoke(self) -> "Recipe":
        """A minutes-long version of the whole chain (tests, CI): same steps, tiny budgets."""
        return dataclasses.replace(
            self, world_scale=0.02, component_images=256,
            siglip=dataclasses.replace(self.siglip, steps=4, batch_size=32, warmup=1, log_every=2),
            vq=dataclasses.replace(self.vq, steps=4, batch_size=8, warmup=1, log_every=2),
            vq_decoder_steps=min(self.vq_decoder_steps, 2),
            stages=tuple(dataclasses.replace(s, steps=2, batch_size=8, warmup=0) for s in self.stages),
            text_plan=dataclasses.replace(self.text_plan, steps=2, batch_size=8, warmup=0),
            rl=None if self.rl is None else dataclasses.replace(self.rl, steps=2, prompts_per_step=2, group_size=2,
                                                                 eval_every=1, micro_batch_size=8))


def text_start(r: Recipe) -> Recipe:
    """`r` cut to the studies' shared start: world, components and the text-pretrained LLM (`r.text_plan`), with
    no CFG choice (its record would stand for a full build's model) and no GRPO step."""
    return dataclasses.replace(r, stages=(r.text_plan,), cfg_candidates=(), rl=None)


# ---------------------------------------------------------------------------------------------

def training_init(model: JanusModel, seed: int) -> JanusModel:
    """From-scratch initialisation (not `checkpoint.init.randomize`, which is for parity tests):
    GPT-2 style normal(0, 0.02) for the LLM, adaptors, heads and embedding tables, residual output
    projections scaled by 1/sqrt(2 * layers), zero biases, unit norms; the ViT recipe for SigLIP;
    PyTorch's default (Kaiming) conv init for the VQ, drawn from the seed."""
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.llm.n_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vision_model.", "gen_vision_model.")):
                continue
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                std = 0.02 / (2 * n_layers) ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
        init_vision_tower(model.vision_model, seed + 1)
        torch.manual_seed(seed + 2)
        for m in model.gen_vision_model.modules():
            if hasattr(m, "reset_parameters") and not isinstance(m, torch.nn.Embedding):
                m.reset_parameters()
        q = model.gen_vision_model.quantize.embedding.weight
        q.copy_(torch.nn.functional.normalize(torch.randn(q.shape, generator=g), dim=-1))
    return model


def world_text(root: Path, limit: int = 20000) -> str:
    """Text the tokenizer learns from: captions, questions, answers, documents of the train split."""
    lines: list[str] = []
    for name in ("generation", "understanding", "text"):
        for row in _jsonl(root / "train" / f"{name}.jsonl")[:limit]:
            if "caption" in row:
                lines.append(row["caption"])
            elif "messages" in row:
                lines += [m["content"].replace("<image_placeholder>\n", "") for m in row["messages"]]
            else:
                lines.append(row["text"])
    return "\n".join(lines)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _component_data(world: Path, n: int, c: JanusConfig, tok: TextTokenizer, variants_per_scene: int = 0,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list, list[int] | None, torch.Tensor]:
    """n train images for SigLIP (with their scene descriptions, patch labels, and group ids when
    `variants_per_scene`) and the VQ (the written train images)."""
    rows = _jsonl(world / "train" / "understanding.jsonl")[:n]
    imgs = [Image.open(world / "train" / r["images"][0]).convert("RGB") for r in rows]
    und = ImageTransform(size=c.vision.image_size)
    gen = torch.stack([to_gen_pixels(i, c.vq.image_size) for i in imgs])
    scenes = [scene_from_json(r["scene"]) for r in rows]
    groups = None
    if variants_per_scene:
        held, rng = held_out(), np.random.default_rng([seed, 7])
        grouped, groups = [], []
        for g, base in enumerate(scenes):
            for s in [base, *variants(base, rng, variants_per_scene, allowed=lambda v: not held.violated_by(v))]:
                grouped.append(s)
                groups.append(g)
            if len(grouped) >= n:
                break
        scenes, groups = grouped[:n], groups[:n]
        imgs = [render(s) for s in scenes]
    pixels = torch.stack([und(i) for i in imgs])
    captions = [tok.encode(describe(s), add_bos=False) for s in scenes]
    per_side = c.vision.image_size // c.vision.patch_size
    labels = torch.from_numpy(np.stack([patch_labels(s, per_side) for s in scenes]))
    return pixels, gen, captions, groups, labels


def build_components(world: Path, dst: Path, r: Recipe) -> Path:
    """Stage 0: tokenizer, SigLIP (sigmoid loss) and VQ (recon + codebook + commitment) trained on
    the world, the rest freshly initialised; saved in the official layout."""
    c = preset(r.preset)
    if r.vq_norm != c.vq.norm:
        c = dataclasses.replace(c, vq=dataclasses.replace(c.vq, norm=r.vq_norm))
    tok = build_synthetic_tokenizer(c.llm.vocab_size, style="pro", seed_text=world_text(world))
    torch.manual_seed(r.seed)
    model = training_init(JanusModel(c), r.seed)
    pixels, gen, captions, groups, labels = _component_data(world, r.component_images, c, tok, r.siglip_variants,
                                                            r.seed)
    report: dict[str, Any] = {}
    t = time.perf_counter()
    scfg = dataclasses.replace(r.siglip, seed=r.seed, dense_classes=PATCH_CLASSES if r.siglip_dense else ())
    hist = train_siglip(model.vision_model, pixels, captions, tok.pad_id, scfg, progress=True, groups=groups,
                        patch_labels=labels if r.siglip_dense else None)
    report["siglip"] = {"seconds": round(time.perf_counter() - t, 1), "last": hist[-1] if hist else {}}
    t = time.perf_counter()
    hist = train_vq(model.gen_vision_model, gen, dataclasses.replace(r.vq, seed=r.seed), progress=True)
    report["vq"] = {"seconds": round(time.perf_counter() - t, 1), "last": hist[-1] if hist else {},
                    "reconstruction": reconstruction_stats(model.gen_vision_model, gen[:512])}
    model.eval()
    placement = "after" if r.question_first else "before"
    files = {"tokenizer.json": tok.to_json_str(),
             **processor_files(c, system_prompt=SYSTEM_PROMPT, image_placement=placement),
             "components.json": json.dumps(report, indent=1, default=float) + "\n"}
    return save_janus(model, dst, files=files, overwrite=True)


def stage_config(plan: StagePlan, source: Path, out: Path, world: Path, r: Recipe) -> RunConfig:
    stage = {"name": plan.stage, "steps": plan.steps, "batch_size": plan.batch_size, "lr": plan.lr,
             "warmup": plan.warmup}
    if plan.ratio is not None:
        stage["ratio"] = list(plan.ratio)
    if plan.schedule is not None:  # a schedule of its own runs over the plan's steps, not the paper stage's horizon
        stage.update(schedule=plan.schedule, min_lr_ratio=plan.min_lr_ratio, horizon=plan.steps)
    train = world / "train"
    if r.data == "fresh":
        data = {"builder": "januskit.train.data.fresh:build", "captions": r.captions, "turns": r.turns,
                "seed": r.seed, "prefetch": 1}
        if r.answer_weighting != "token":  # (kept out of the default's config: earlier builds' configs unchanged)
            data["answer_weighting"] = r.answer_weighting
        if r.question_first:  # (likewise)
            data["question_first"] = True
        if plan.ratio is not None and len(plan.ratio) == 4:  # an edit weight: the world draws edits too
            data["kinds"] = ["understanding", "text", "generation", "edit"]
    elif r.data == "files":
        if r.question_first:
            raise ValueError("Recipe.question_first needs data 'fresh': the written train split's conversations "
                             "put the image first")
        data = {"builder": "januskit.train.data.loader:build", "understanding": str(train / "understanding.jsonl"),
                "text": str(train / "text.jsonl"), "generation": str(train / "generation-vq.jsonl"), "prefetch": 1}
        if plan.ratio is not None and len(plan.ratio) == 4:
            data["edit"] = str(train / "edit.jsonl")
    else:
        raise ValueError(f"Recipe.data: {r.data!r} is not 'fresh' or 'files'")
    return RunConfig.from_dict({
        "model": {"source": str(source)},
        "stage": stage,
        "train": {"out": str(out), "micro_batch_size": r.micro_batch_size, "seq_len": r.seq_len,
                  "threads": r.threads, "autocast": resolve_autocast(r.autocast), "attention": r.attention,
                  "compile": r.compile,
                  "keep_memory": r.keep_memory, "fused_optimizer": r.fused_optimizer,
                  "seed": r.seed, "log_every": 10, "save_every": 100, "keep_last": 1,
                  "export_dtype": "float32", "progress": True},
        "data": data,
    }, where=f"recipe stage {plan.name}")


def resolve_autocast(autocast: str) -> str:
    """"auto" -> bf16 where the CPU has native bf16, else "none" (float32); other values as given."""
    return fastest_autocast() if autocast == "auto" else autocast


def pin_autocast(r: Recipe, record: Path) -> Recipe:
    """The recipe with its autocast resolved, the choice kept in `record`: a resumed build keeps the dtype it
    began with, whatever CPU it resumes on (a warning says when that CPU would have chosen otherwise)."""
    if record.is_file():
        pinned = json.loads(record.read_text())
        if pinned.get("asked") == r.autocast:
            if resolve_autocast(r.autocast) != pinned["autocast"]:
                log.warning("recipe: this build began with autocast %r (%s); it continues so, although this CPU "
                            "would choose %r", pinned["autocast"], record, resolve_autocast(r.autocast))
            return dataclasses.replace(r, autocast=pinned["autocast"])
    chosen = resolve_autocast(r.autocast)
    record.write_text(json.dumps({"asked": r.autocast, "autocast": chosen}) + "\n")
    return dataclasses.replace(r, autocast=chosen)


def with_overrides(recipe: Any, assignments: list[str]) -> Any:
    """`recipe` with fields set from "path=value" strings (`januskit world build --set`): a dotted path reaches
    into nested settings ("vq.attention=false", "siglip.steps=800"); the value is JSON, or else a plain string, and
    must have the type of the value it replaces (an int where a float is expected is taken as that float, a list
    where a tuple is). A wrong path or type is refused with the field named."""
    for item in assignments:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. vq_norm=branch or siglip.steps=800")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        recipe = _set_field(recipe, path.split("."), value, path)
    return recipe


def _set_field(obj: Any, parts: list[str], value: Any, path: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    if parts[0] not in names:
        raise ValueError(f"--set {path}: {type(obj).__name__} has no field {parts[0]!r} (fields: {', '.join(names)})")
    old = getattr(obj, parts[0])
    if len(parts) > 1 and _named_plans(old):  # "stages.stage2.steps=3000"; "stages.stage1=null" drops the stage
        return dataclasses.replace(obj, **{parts[0]: _set_plan(old, parts[1:], value, path)})
    if len(parts) > 1:
        if not dataclasses.is_dataclass(old):
            raise ValueError(f"--set {path}: {parts[0]!r} is a {type(old).__name__}, not a group of settings")
        return dataclasses.replace(obj, **{parts[0]: _set_field(old, parts[1:], value, path)})
    if dataclasses.is_dataclass(old):
        raise ValueError(f"--set {path}: a group of settings; set its fields ({path}.FIELD=VALUE)")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(old, tuple) and isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if old is not None and type(value) is not type(old):
        raise ValueError(f"--set {path}: expected a {type(old).__name__} (now {old!r}), got {value!r}")
    return dataclasses.replace(obj, **{parts[0]: value})


def _named_plans(value: Any) -> bool:
    return isinstance(value, tuple) and bool(value) and all(isinstance(v, StagePlan) for v in value)


def _set_plan(plans: tuple[StagePlan, ...], parts: list[str], value: Any, path: str) -> tuple[StagePlan, ...]:
    """One stage of the chain, named by its folder: a field of it set, or (value null, no field) the stage dropped."""
    names = [p.name for p in plans]
    if parts[0] not in names:
        raise ValueError(f"--set {path}: no stage {parts[0]!r} (stages: {', '.join(names)})")
    if len(parts) == 1:
        if value is not None:
            raise ValueError(f"--set {path}: a stage; set its fields ({path}.FIELD=VALUE) or drop it ({path}=null)")
        if len(plans) == 1:
            raise ValueError(f"--set {path}: the only stage; the chain needs one")
        return tuple(p for p in plans if p.name != parts[0])
    return tuple(_set_field(p, parts[1:], value, path) if p.name == parts[0] else p for p in plans)


def build(out: str | Path, work: str | Path, recipe: Recipe = Recipe(), *, evaluate_model: bool = True,
          eval_settings: Any = None) -> Path:
    """Run (or continue) the whole chain; the final model goes to `out` (official layout, with
    eval.json when `evaluate_model`). Returns `out`."""
    out, work = Path(out), Path(work)
    if recipe.vq_decoder_steps < 0 or not 0.0 <= recipe.vq_decoder_empty <= 1.0:
        raise ValueError(f"Recipe: vq_decoder_steps must be >= 0 (got {recipe.vq_decoder_steps}) and vq_decoder_empty "
                         f"in [0, 1] (got {recipe.vq_decoder_empty})")
    work.mkdir(parents=True, exist_ok=True)
    recipe = pin_autocast(recipe, work / "autocast.json")
    torch.set_num_threads(recipe.threads)
    times: dict[str, float] = {}
    world = work / "world"
    t = time.perf_counter()
    if not (world / "world.json").is_file():
        write_world(world, seed=recipe.seed, scale=recipe.world_scale, overwrite=True, captions=recipe.captions)
        mark_done(world, time.perf_counter() - t)
    times["world"] = step_seconds(world, time.perf_counter() - t)

    t = time.perf_counter()
    comp = work / "components"
    if not done(comp):
        build_components(world, comp, recipe)
        mark_done(comp, time.perf_counter() - t)
    if recipe.data == "files" and not (world / "train" / "generation-vq.jsonl").is_file():
        cache_vq_ids(world / "train", load_janus(comp, torch.float32), world / "train" / "generation-vq.jsonl",
                     manifests=[world / "train" / "generation.jsonl"], batch_size=64)
    times["components"] = step_seconds(comp, time.perf_counter() - t)

    stages = [(p.name, lambda src, dst, p=p: stage_config(p, src, dst, world, recipe)) for p in recipe.stages]
    source = run_stages(work, comp, stages, times, ranks=recipe.ranks)
    decoder_report = None
    if recipe.vq_decoder_steps > 0:
        t = time.perf_counter()
        source = polish_vq_decoder(source, work / "vq-decoder", world, recipe)
        times["vq_decoder"] = step_seconds(source, time.perf_counter() - t)
        decoder_report = json.loads((source / "vq_decoder.json").read_text())
    # The last stage in the export dtype; its side files (tokenizer, processor configs) come along. A trained
    # folder leaves its base's records behind (train.checkpoints.BASE_RECORDS), so components.json, the report
    # of the SigLIP and VQ this model still holds, is carried from stage 0 explicitly.
    t = time.perf_counter()
    cfg = choose_cfg_weight(source, world, recipe.cfg_candidates, work / "cfg-choice.json")
    times["cfg_choice"] = time.perf_counter() - t
    if recipe.rl is not None:
        t = time.perf_counter()
        source = run_rl(source, work / "rl", recipe, cfg)
        times["rl"] = step_seconds(source, time.perf_counter() - t)
        t = time.perf_counter()
        cfg = choose_cfg_weight(source, world, recipe.cfg_candidates, work / "cfg-choice-rl.json", keep=cfg)
        times["cfg_choice_rl"] = time.perf_counter() - t
    files = {} if cfg is None else {"generation_config.json": json.dumps({"guidance_scale": cfg}, indent=1) + "\n"}
    files["components.json"] = (comp / "components.json").read_text(encoding="utf-8")
    if decoder_report is not None:  # the VQ this model holds: the components' encoder, the polished decoder
        files["components.json"] = json.dumps(json.loads(files["components.json"]) | {"vq_decoder": decoder_report},
                                              indent=1, default=float) + "\n"
    # The layout the model was trained in, from the recipe, not from the components' file: a work folder's
    # components serve recipes of either layout, and a model asked in the other layout answers at chance.
    files["processor_config.json"] = placed_processor_config(comp, recipe.question_first)
    if eval_settings is None and any(len(p.ratio or ()) == 4 for p in recipe.stages):  # it learnt edits: score them
        from ..eval.world import EvalSettings

        eval_settings = EvalSettings(edits_per_task=None)
    return export_and_evaluate(source, out, world, _recipe_json(recipe, times),
                               dtype=getattr(torch, recipe.export_dtype), evaluate_model=evaluate_model,
                               eval_settings=eval_settings, files=files)


def decoder_images(world: Path, r: Recipe) -> torch.Tensor:
    """The VQ's own training images (the first `component_images` train images), a share `vq_decoder_empty` of them
    (chosen by the recipe's seed) replaced by the empty canvas."""
    rows = _jsonl(world / "train" / "understanding.jsonl")[:r.component_images]
    size = preset(r.preset).vq.image_size
    images = torch.stack([to_gen_pixels(Image.open(world / "train" / row["images"][0]).convert("RGB"), size)
                          for row in rows])
    empty = np.random.default_rng([r.seed, 17]).random(len(rows)) < r.vq_decoder_empty
    images[torch.from_numpy(empty)] = to_gen_pixels(render(()), size)
    return images


def polish_vq_decoder(source: Path, dst: Path, world: Path, r: Recipe) -> Path:
    """`source` with its VQ decoder trained further (train_vq_decoder: ids unchanged) into `dst`; its report
    (steps, loss, reconstruction of the images and of the empty canvas) in dst/vq_decoder.json."""
    if done(dst):
        return dst
    t = time.perf_counter()
    model, extras = load_official_with_extras(source, torch.float32)
    images = decoder_images(world, r)
    cfg = dataclasses.replace(r.vq, steps=r.vq_decoder_steps, lr=r.vq_decoder_lr, warmup=min(20, r.vq_decoder_steps),
                              seed=r.seed, log_every=50)
    log.info("recipe: vq decoder (%d steps x %d images, lr %g, %.0f%% empty canvases)", cfg.steps, cfg.batch_size,
             cfg.lr, 100 * r.vq_decoder_empty)
    vq = model.gen_vision_model
    blank = to_gen_pixels(render(()), images.shape[-1])[None]
    before = reconstruction_stats(vq, blank, blank_ok=True)
    hist = train_vq_decoder(vq, images, cfg, progress=True)
    report = {"seconds": round(time.perf_counter() - t, 1), "last": hist[-1] if hist else {},
              "reconstruction": reconstruction_stats(vq, images[:512]),
              "empty_canvas": {"before": before, "after": reconstruction_stats(vq, blank, blank_ok=True)}}
    save_janus(model, dst, copy_from=source, extras=extras, overwrite=True,
               skip=(PROVENANCE, "metrics.jsonl", "loss.png", "run_config.json"),
               files={"vq_decoder.json": json.dumps(report, indent=1, default=float) + "\n"})
    mark_done(dst, time.perf_counter() - t)
    return dst


def placed_processor_config(folder: Path, question_first: bool) -> str:
    """`folder`'s processor_config.json with the image placement of a model trained question-first or not."""
    proc = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))
    proc.pop("image_placement", None)
    return json.dumps(proc | ({"image_placement": "after"} if question_first else {}), indent=2) + "\n"


def run_rl(source: Path, dst: Path, r: Recipe, cfg_weight: float | None) -> Path:
    """The recipe's GRPO step from `source` into `dst` (continued from its last checkpoint if interrupted)."""
    if done(dst):
        return dst
    assert r.rl is not None
    plan = dataclasses.replace(r.rl, seed=r.seed, threads=r.threads,
                               cfg_weight=r.rl.cfg_weight if r.rl.cfg_weight is not None else cfg_weight)
    log.info("recipe: rl (GRPO, %d steps x %d prompts x %d images, lr %g, CFG %s)", plan.steps,
             plan.prompts_per_step, plan.group_size, plan.lr, plan.cfg_weight)
    t = time.perf_counter()
    train(rl_run_config(plan, source, dst, autocast=r.autocast),
          resume=bool(list_checkpoints(dst / "checkpoints")))
    shutil.rmtree(dst / "checkpoints", ignore_errors=True)  # optimiser states: not needed downstream
    mark_done(dst, time.perf_counter() - t)
    return dst


def choose_cfg_weight(source: Path, world: Path, candidates: tuple[float, ...], record: Path,
                      keep: float | None = None) -> float | None:
    """The CFG weight with the best GenEval-style score on the val split (10 prompts per category x 2
    images; ties go to the earlier candidate), remembered in `record` so a resumed build does not redo it.
    The reference's weight (5) is tuned for the 1B/7B models; the miniature one wants its own.

    `keep` (the weight GRPO's rollouts were drawn at) stays unless another beats it by more than one standard
    error of a score over those 120 images (~0.045): a build once swapped 2 for 5 on val 0.592 -> 0.608 and
    lost 0.073 on the test split."""
    if not candidates:
        return None
    if record.is_file():
        return json.loads(record.read_text())["chosen"]
    import januskit
    from ..eval.world import EvalSettings, eval_generation
    from ..world.dataset import read_prompts

    pipe = januskit.load(source)
    prompts = read_prompts(world / "val" / "prompts.jsonl")
    scores, per_prompt = {}, 2
    for w in candidates:
        rep = eval_generation(pipe, prompts, EvalSettings(images_per_prompt=per_prompt, cfg_weight=w))
        scores[w] = rep["overall"]
        log.info("recipe: CFG %g on val: GenEval-style %.3f", w, scores[w])
    chosen = max(candidates, key=lambda w: (scores[w], -candidates.index(w)))
    if keep in scores:
        n = len(prompts) * per_prompt
        se = (scores[keep] * (1 - scores[keep]) / n) ** 0.5
        if scores[chosen] - scores[keep] <= se:
            chosen = keep
    record.write_text(json.dumps({"chosen": chosen, "val_geneval": {str(k): v for k, v in scores.items()}}, indent=1) + "\n")
    return chosen


def _recipe_json(r: Recipe, times: dict[str, float]) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    d["seconds"] = {k: round(v, 1) for k, v in times.items()}
    return d
