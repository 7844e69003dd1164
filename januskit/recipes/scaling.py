"""A scaling study at the miniature scale: loss, GenEval-style and QA accuracy against samples seen,
for several LLM sizes, from the same components.

Every size starts from the same SigLIP, VQ tokenizer and text tokenizer (taken from a trained model,
by default the bundled one) with a freshly initialised LLM, adaptors and heads, and runs one unified
stage (Stage II's trainable parts and data ratio) at a constant LR after warm-up, so that checkpoints
along one run are the budgets. Each checkpoint is evaluated on a subset of the test split. Resumable:
a killed study continues from its last checkpoint, and finished evaluations are kept.

    januskit world scaling --work runs/scaling
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.official import load_janus, save_janus
from ..config import JanusConfig, LlamaConfig, preset
from ..eval.world import EvalSettings, evaluate
from ..models.janus import JanusModel
from ..train.checkpoints import list_checkpoints
from ..train.config import RunConfig
from ..train.trainer import fastest_autocast
from ..train.data.vq_cache import cache_vq_ids
from ..world.dataset import write_world
from .default_model import PRESET, training_init

log = logging.getLogger("januskit.world")

# LLM shapes (dim, layers, heads, SwiGLU width); "M" is the default model's.
SIZES: dict[str, dict[str, int]] = {
    "S": dict(dim=128, n_layers=4, n_heads=2, intermediate_size=344),
    "M": dict(dim=256, n_layers=4, n_heads=4, intermediate_size=688),
    "L": dict(dim=384, n_layers=6, n_heads=6, intermediate_size=1024),
}
SIDE_FILES = ("tokenizer.json", "processor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class Study:
    sizes: tuple[str, ...] = ("S", "M", "L")
    budgets: tuple[int, ...] = (500, 1000, 2000)  # steps at which a checkpoint is evaluated
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    ratio: tuple[float, float, float] = (2.0, 3.0, 5.0)  # und : text : gen, Stage II's
    micro_batch_size: int = 8
    seq_len: int = 512
    autocast: str = field(default_factory=fastest_autocast)  # bf16 only where the CPU has it natively
    threads: int = 1
    seed: int = 0
    world_scale: float = 1.0  # the train split's size (1 = januskit.world.dataset.SIZES; smaller for smoke runs)
    eval: EvalSettings = field(default_factory=lambda: EvalSettings(images_per_prompt=2, prompts_per_category=25,
                                                                     questions_per_type=40))


def sized_config(size: str) -> JanusConfig:
    base = preset(PRESET)
    llm = dataclasses.replace(base.llm, **SIZES[size], n_kv_heads=SIZES[size]["n_heads"])
    return _with_llm(base, llm)


def _with_llm(c: JanusConfig, llm: LlamaConfig) -> JanusConfig:
    return dataclasses.replace(
        c, llm=llm, aligner=dataclasses.replace(c.aligner, n_embed=llm.dim),
        gen_aligner=dataclasses.replace(c.gen_aligner, n_embed=llm.dim),
        gen_head=dataclasses.replace(c.gen_head, n_embed=llm.dim, image_token_embed=llm.dim))


def start_model(components: Path, size: str, dst: Path, seed: int) -> Path:
    """The components' SigLIP and VQ (and tokenizer files) around a fresh LLM of `size`."""
    src = load_janus(components, torch.float32)
    torch.manual_seed(seed)
    model = training_init(JanusModel(sized_config(size)), seed)
    model.vision_model.load_state_dict(src.vision_model.state_dict())
    model.gen_vision_model.load_state_dict(src.gen_vision_model.state_dict())
    files = {f: (components / f).read_text() for f in SIDE_FILES if (components / f).is_file()}
    return save_janus(model, dst, files=files, overwrite=True)


def run_config(source: Path, out: Path, world: Path, s: Study) -> RunConfig:
    train = world / "train"
    return RunConfig.from_dict({
        "model": {"source": str(source)},
        "stage": {"name": "janus-pro/2", "steps": max(s.budgets), "batch_size": s.batch_size, "lr": s.lr,
                  "warmup": s.warmup, "ratio": list(s.ratio), "schedule": "constant"},
        "train": {"out": str(out), "micro_batch_size": s.micro_batch_size, "seq_len": s.seq_len,
                  "threads": s.threads, "autocast": s.autocast, "seed": s.seed, "log_every": 10,
                  "save_every": min(s.budgets), "keep_last": 100, "export_dtype": "float32", "progress": False},
        "data": {"builder": "januskit.train.data.loader:build", "understanding": str(train / "understanding.jsonl"),
                 "text": str(train / "text.jsonl"), "generation": str(train / "generation-vq.jsonl"), "prefetch": 1},
    }, where="scaling study")


def checkpoint_model(ckpt: Path, source: Path, dst: Path) -> Path:
    """A trainer checkpoint (weights + config.json) made loadable with the source's side files."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "config.json"):
        shutil.copy2(ckpt / f, dst / f)
    for f in SIDE_FILES:
        if (source / f).is_file():
            shutil.copy2(source / f, dst / f)
    return dst


def mean_losses(metrics: Path, upto: int, window: int = 100) -> dict[str, float]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    rows = [r for r in rows if upto - window < r.get("step", 0) <= upto]
    out = {}
    for k in ("loss_und", "loss_text", "loss_gen"):
        v = [r[k] for r in rows if k in r]
        if v:
            out[k] = sum(v) / len(v)
    return out


def run_study(work: str | Path, components: str | Path, s: Study = Study()) -> list[dict[str, Any]]:
    """Train every size (resuming), evaluate every budget checkpoint once; results in work/results.jsonl."""
    import januskit
    from ..train.trainer import train

    work, components = Path(work), Path(components)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(s.threads)
    world = work / "world"
    if not (world / "world.json").is_file():
        write_world(world, seed=s.seed, scale=s.world_scale, overwrite=True)
    if not (world / "train" / "generation-vq.jsonl").is_file():
        cache_vq_ids(world / "train", load_janus(components, torch.float32), world / "train" / "generation-vq.jsonl",
                     manifests=[world / "train" / "generation.jsonl"], batch_size=64)
    results_file = work / "results.jsonl"
    results = [json.loads(x) for x in results_file.read_text().splitlines()] if results_file.is_file() else []
    have = {(r["size"], r["step"]) for r in results}
    for size in s.sizes:
        src = work / f"start-{size}"
        if not (src / "config.json").is_file():
            start_model(components, size, src, s.seed)
        run = work / f"run-{size}"
        if not (run / "config.json").is_file():  # the export is written last: the run is complete
            t = time.perf_counter()
            train(run_config(src, run, world, s), resume=True)
            log.info("scaling: %s trained in %.0f s", size, time.perf_counter() - t)
        for step, ckpt in list_checkpoints(run / "checkpoints"):
            if step not in s.budgets or (size, step) in have:
                continue
            m = checkpoint_model(ckpt, src, work / "eval-model")
            rep = evaluate(januskit.load(m), world, s.eval)
            g, u = rep.generation, rep.understanding
            row = {"size": size, "step": step, "samples": step * s.batch_size, "lr": s.lr,
                   "params": sum(p.numel() for p in load_janus(m, torch.float32).language_model.parameters()),
                   "geneval": g["overall"], "categories": g["categories"], "qa": u["accuracy"],
                   "qa_types": u["types"], "pope": u.get("pope", {}).get("accuracy"),
                   **mean_losses(run / "metrics.jsonl", step)}
            results.append(row)
            with open(results_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            log.info("scaling: %s", row)
    if results:
        plot_scaling(results, work / "scaling.png")
    return results


def plot_scaling(results: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Generation loss, GenEval-style and QA against samples seen (thousands, log scale), a line per size (None
    without matplotlib)."""
    from ..train.plot import plot_panels

    def series(key: str) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for r in results:
            if r.get(key) is not None:
                out.setdefault(f"{r['size']} ({r['params'] / 1e6:.1f}M)", []).append((r["samples"] / 1000, r[key]))
        return out

    return plot_panels([("generation loss (nats / image token)", series("loss_gen")),
                        ("GenEval-style overall", series("geneval")), ("QA accuracy", series("qa"))],
                       path, xlabel="samples seen (K)", log2_x=True)
