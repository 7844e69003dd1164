"""`januskit finetune`: one command from a checkpoint folder and your data to a better model.

    plan      read the data (JSONL manifests, one per kind), hold out a seeded part of every kind, and pick
              the run's numbers from the model's size and the data: stage row, mixing ratio, seq_len, batch,
              LR, bf16 autocast, steps from epochs; every one overridable (FinetuneOptions)
    time      build the real run and time a few optimiser steps, so the estimate is measured
    before    evaluate the base model on the held-out part (understanding accuracy by exact normalised
              answer, and the mean per-token loss of every kind: generation's is its image-token loss)
    train     the ordinary trainer (train.trainer.train) on a RunConfig built here; resumable
    after     the same evaluation on the trained model; finetune.json holds plan, before, after

The held-out lines never reach training: the data builder here (`build_data`) wraps the loader with
readers that drop them by index (`SplitSource`), chosen by `holdout_indices` from (fraction, seed, kind).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..checkpoint.official_config import detect_arch, read_config_json
from ..models import count_params
from . import parallel
from .checkpoints import list_checkpoints
from .config import RunConfig
from .data.encode import SampleEncoder
from .data.records import KIND_CODE, KINDS, SHORT, DataError, ManifestSource, Sample, jsonl_rows, parse_record
from .data.records import resolve_image_path

log = logging.getLogger("januskit.train.finetune")

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default-model"
REPORT = "finetune.json"
# Files a model folder may carry that describe how *that* model was made or scored; the export copies
# side files from the base, so a copy identical to the base's is removed from the output.
FOREIGN = ("eval.json", "recipe.json", "components.json")


# --------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class SizeTier:
    """Defaults by model size. The miniature row is the bundled model's own fine-tune (configs/world-edit.toml:
    LR 5e-4, cosine to 10%, batch 32, micro-batches of 8 x 512 slots, 2 threads); the large rows follow the
    usual practice for 1B+ models: a small full-weight LR, or LoRA at a higher one."""

    name: str
    max_params: float  # this tier holds models below this parameter count
    lr: float  # full fine-tuning
    lora_lr: float  # LoRA adapters learn from zero, so they take a higher LR
    batch_size: int  # samples per optimiser step
    slots: int  # packed slots per forward (micro-batch rows x seq_len)
    threads: int  # CPU threads (0: torch's default); narrow matrices gain nothing from more
    suggest_lora: bool = False


TIERS = (
    SizeTier("miniature", 1e8, lr=5e-4, lora_lr=2e-3, batch_size=32, slots=4096, threads=2),
    SizeTier("small", 7e8, lr=1e-4, lora_lr=1e-3, batch_size=32, slots=4096, threads=0),
    SizeTier("billion-scale", math.inf, lr=2e-5, lora_lr=2e-4, batch_size=16, slots=0, threads=0, suggest_lora=True),
)


def tier_for(n_params: int) -> SizeTier:
    return next(t for t in TIERS if n_params < t.max_params)


# --------------------------------------------------------------------------------------- options and plan
@dataclass(kw_only=True)
class FinetuneOptions:
    """What the user chose (None: the plan's default)."""

    out: str
    model: str | None = None  # checkpoint folder (official layout); None: the bundled default model
    data: str | None = None  # a folder holding understanding.jsonl / text.jsonl / generation.jsonl / edit.jsonl
    sources: dict[str, list[str]] = field(default_factory=dict)  # kind -> JSONL files (the per-kind flags)
    steps: int | None = None
    epochs: float = 3.0  # passes over the training records (ignored when steps is given)
    lr: float | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    lora: bool = False
    holdout: float = 0.1  # fraction of every kind's records kept out of training, for the before/after figures
    seed: int = 0  # training seed and the holdout's
    threads: int | None = None
    time_steps: int = 4  # optimiser steps timed for the estimate (the first is warm-up); 0: no estimate
    eval_max: int = 200  # held-out records evaluated per kind (the first ones, in file order)
    evaluate: bool = True
    resume: bool = False
    keep_checkpoints: bool = False  # checkpoints/ are deleted after a finished run unless this is set
    save_every: int | None = None
    tokenizer_images: str | None = None  # retrain the image tokenizer on these images first (train-tokenizer)
    tokenizer_steps: int | None = None  # its steps (None: the pretrainer's default)
    tensorboard: bool = False  # also log to <out>/tensorboard/ (training lines, and the before/after figures)


def tokenizer_folder(out: str | Path) -> Path:
    """Where the optional first step writes the base model with its retrained tokenizer: beside --out, kept
    (the fine-tune's provenance.json names it as the base)."""
    out = Path(out)
    return out.with_name(out.name + "-tokenizer")


def retrain_tokenizer_first(opts: FinetuneOptions, echo: Callable[[str], None]) -> FinetuneOptions:
    """The optional first step: the base model's VQ (or VAE) retrained on `opts.tokenizer_images`, written
    to tokenizer_folder(out) (atomically; a finished one is reused by a rerun), and the options pointed at it."""
    from .image_tokenizer import RetrainSettings, retrain_image_tokenizer

    folder = tokenizer_folder(opts.out)
    record = folder / "provenance.json"
    if record.is_file() and "image_tokenizer" in json.loads(record.read_text()):
        echo(f"image tokenizer: reusing {folder} (retrained by an earlier run)")
    else:
        echo(f"image tokenizer: retraining it on {opts.tokenizer_images} into {folder} ...")
        base = opts.model if opts.model is not None else DEFAULT_MODEL
        retrain_image_tokenizer(opts.tokenizer_images, base, folder,
                                RetrainSettings(steps=opts.tokenizer_steps, seed=opts.seed), progress=False)
    return dataclasses.replace(opts, model=str(folder), tokenizer_images=None)


@dataclass(kw_only=True)
class Plan:
    base_model: str
    arch: str  # "janus" or "janusflow"
    params: int
    tier: str
    data: dict[str, list[str]]  # kind -> manifest files (absolute)
    records: dict[str, int]  # kind -> records in the files
    train_records: dict[str, int]
    holdout_records: dict[str, int]
    holdout: float
    seed: int
    stage: str
    ratio: list[int]  # und : text : gen : edit
    batch_size: int
    micro_batch_size: int
    steps: int
    epochs: float
    lr: float
    warmup: int
    schedule: str
    min_lr_ratio: float
    seq_len: int
    longest: int  # tokens of the longest training sample
    longest_key: str
    max_positions: int
    autocast: str
    export_dtype: str
    lora: bool
    threads: int
    save_every: int
    seconds_per_step: float | None = None  # measured
    estimated_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    tensorboard: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------- data
def resolve_sources(data: str | None, sources: dict[str, list[str]]) -> dict[str, list[Path]]:
    """kind -> manifest files, from a --data folder (<kind>.jsonl) and the per-kind flags; every file must
    exist and hold at least one record. Errors name the flag and the file."""
    out: dict[str, list[Path]] = {}
    if data is not None:
        d = Path(data)
        if not d.is_dir():
            raise FileNotFoundError(f"--data {data}: no such folder (it should hold "
                                    f"{', '.join(k + '.jsonl' for k in KINDS)}; or pass files with "
                                    f"{', '.join('--' + k for k in KINDS)})")
        out = {k: [d / f"{k}.jsonl"] for k in KINDS if (d / f"{k}.jsonl").is_file()}
        if not out:
            raise FileNotFoundError(f"--data {data}: holds none of {', '.join(k + '.jsonl' for k in KINDS)}")
    for kind, files in sources.items():
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
        for f in files or []:
            if not Path(f).is_file():
                raise FileNotFoundError(f"--{kind} {f}: no such file")
            out.setdefault(kind, []).append(Path(f))
    if not out:
        raise ValueError("no training data: pass --data DIR or at least one of "
                         f"{', '.join('--' + k + ' FILE.jsonl' for k in KINDS)}")
    for kind, files in out.items():
        for f in files:
            if _count([f]) == 0:
                flag = f"--{kind} " if data is None or f.parent != Path(data) else "--data: "
                raise ValueError(f"{flag}{f}: no records (the {kind} file is empty)")
    return {k: [p.resolve() for p in out[k]] for k in KINDS if k in out}


def holdout_indices(n: int, fraction: float, seed: int, kind: str) -> np.ndarray:
    """Sorted indices (into a kind's non-blank lines, files in order) kept out of training: round(fraction * n),
    at least one when fraction > 0 and n >= 2, never all of them. Seeded per kind, independent of the data order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {fraction}")
    k = min(n - 1, max(1 if fraction > 0 and n >= 2 else 0, round(fraction * n)))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    perm = np.random.default_rng([seed, 104729, KIND_CODE[kind]]).permutation(n)
    return np.sort(perm[:k])


class SplitSource(ManifestSource):
    """A ManifestSource over one side of the holdout split: `part` "train" (every line but the held-out
    ones) or "holdout" (only those). The split is part of the fingerprint, so a resume with another
    split is refused."""

    def __init__(self, paths: str | Path | Sequence[str | Path], *, kind: str, part: str, holdout: float,
                 holdout_seed: int, **kw: Any) -> None:
        if part not in ("train", "holdout"):
            raise ValueError(f"part must be 'train' or 'holdout', got {part!r}")
        super().__init__(paths, kind=kind, **kw)
        held = np.zeros(len(self), dtype=bool)
        held[holdout_indices(len(self), holdout, holdout_seed, kind)] = True
        keep = held if part == "holdout" else ~held
        self._file, self._offset, self._line = self._file[keep], self._offset[keep], self._line[keep]
        self.split = [part, holdout, holdout_seed]
        if len(self) < self.world_size:
            raise ValueError(f"{self._name()}: {len(self)} {part} samples cannot be split over {self.world_size} ranks")

    def _fingerprint(self) -> Any:
        return [*super()._fingerprint(), self.split]

    def keys(self) -> list[str]:
        """Where each of this side's samples is, "file:LINE", in file order."""
        return [self.where(i) for i in range(len(self))]


def build_data(ctx: Any, *, understanding: Any = None, text: Any = None, generation: Any = None, edit: Any = None,
               holdout: float = 0.1, holdout_seed: int = 0, **options: Any) -> Any:
    """`[data] builder = "januskit.train.finetune:build_data"`: januskit.train.data.loader:build over the
    training side of the split (each kind: a manifest file or list of them). Other options go to the loader."""
    from .data.loader import build

    def reader(paths: Any, kind: str, seed: int, *, transform: Any, rank: int, world_size: int,
               on_error: str) -> SplitSource:
        return SplitSource(paths, kind=kind, part="train", holdout=holdout, holdout_seed=holdout_seed, seed=seed,
                           rank=rank, world_size=world_size, on_error=on_error, transform=transform)

    given = dict(zip(KINDS, (understanding, text, generation, edit)))
    # seeds as the loader gives its file sources (stride 3 per kind)
    builtin = {k: partial(reader, p, k, ctx.seed * 3 + i) for i, (k, p) in enumerate(given.items()) if p is not None}
    return build(ctx, builtin=builtin, **options)


def heldout_samples(paths: Sequence[str | Path], kind: str, holdout: float, seed: int,
                    limit: int | None = None) -> list[Sample]:
    """The held-out records of a kind as Samples (images decoded), in file order, at most `limit`."""
    if len(holdout_indices(_count(paths), holdout, seed, kind)) == 0:
        return []
    src = SplitSource(paths, kind=kind, part="holdout", holdout=holdout, holdout_seed=seed, shuffle=False, epochs=1)
    out: list[Sample] = []
    for s in src:
        out.append(s)
        if limit is not None and len(out) >= limit:
            break
    return out


def _count(paths: Sequence[str | Path]) -> int:
    """Records (non-blank lines) in manifests, as ManifestSource counts them."""
    n = 0
    for p in paths:
        with open(p, "rb") as fh:
            n += sum(1 for line in fh if line.strip())
    return n


def scan_lengths(paths: Sequence[Path], kind: str, encoder: SampleEncoder, image_size: int,
                 skip: np.ndarray) -> tuple[int, str]:
    """(tokens, key) of the longest record of a kind, held-out lines (`skip`) excluded. Every line is parsed and
    encoded as training will encode it, but images are only checked to exist (a blank image of the right size
    stands in: lengths do not depend on pixels), so a large data set scans in seconds and a bad record
    fails here, naming its line, before any model is loaded."""
    blank = Image.new("RGB", (image_size, image_size))
    longest, key, i = 0, "", 0
    skipped = set(skip.tolist())
    for path in paths:
        root = path.parent
        for where, obj in jsonl_rows(path):
            i += 1
            if i - 1 in skipped:
                continue

            def fetch(refs: list[str] | None, name: str, where: str = where) -> list[Image.Image]:
                for r in refs or []:
                    p = resolve_image_path(root, r, where)
                    if not p.is_file():
                        raise DataError(where, f"image {r!r} not found (relative to {root})", "path")
                return [blank] * len(refs or [])

            n = len(encoder(parse_record(obj, where, fetch, kind)))
            if n > longest:
                longest, key = n, where
    return longest, key


# --------------------------------------------------------------------------------------- planning
def check_model(folder: str | Path) -> tuple[str, Any]:
    """(arch, config) of a trainable checkpoint folder, or a clear error naming it."""
    from ..checkpoint.official import read_official_config

    p = Path(folder)
    if not p.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    if not (p / "config.json").is_file():
        raise ValueError(f"{folder}: not a checkpoint folder (no config.json); pass a januskit / official Janus, "
                         "Janus-Pro or JanusFlow folder")
    raw = read_config_json(p / "config.json")
    arch = detect_arch(raw, str(p / "config.json"))
    if arch == "hf-janus":
        raise ValueError(f"{folder}: Hugging Face layout; convert it first: januskit convert --to official {folder} DIR")
    if raw.get("quantization") is not None:
        raise ValueError(f"{folder}: a quantised folder cannot be trained; fine-tune the float checkpoint it came from")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ValueError(f"{folder}: not a checkpoint folder (config.json but no weights)")
    return arch, read_official_config(p)


def default_autocast() -> str:
    """bf16 autocast where the hardware multiplies bf16 natively, as the default model's recipe decides
    ("auto"): about 2x float32 on such a CPU, and many times slower than float32 on one without."""
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "none"
    from .trainer import fastest_autocast

    return fastest_autocast()


def mix_ratio(train_records: dict[str, int]) -> list[int]:
    """und : text : gen : edit from the kinds present: proportional to their training records (so an epoch sees
    every record about once), a kind below 10% of the mix raised to 10% (so it is not starved), absent kinds 0."""
    total = sum(train_records.values())
    floor = math.ceil(total / 10)
    w = [max(train_records[k], floor) if train_records.get(k, 0) > 0 else 0 for k in KINDS]
    g = math.gcd(*[x for x in w if x])
    return [x // g for x in w]


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def make_plan(opts: FinetuneOptions) -> Plan:
    """Everything the run needs, from the model, the data and the user's overrides (nothing is trained)."""
    from ..processing.chat import Processor

    model_dir = Path(opts.model) if opts.model is not None else DEFAULT_MODEL
    arch, config = check_model(model_dir)
    data = resolve_sources(opts.data, opts.sources)
    n_params = count_params(config)
    tier = tier_for(n_params)
    notes: list[str] = []

    # -- the split, and the longest training sample (as training encodes it, without dropout)
    proc = Processor.from_folder(model_dir, config.vision.image_size, config.vision.n_tokens)
    enc = SampleEncoder.for_model(_Arch(config), proc, cfg_drop=0.0, edit_drop_text=0.0, edit_drop_image=0.0,
                                  edit_drop_both=0.0, system_prompt=proc.system_prompt)
    records, train_n, held_n = {}, {}, {}
    longest, longest_key = 0, ""
    for kind, paths in data.items():
        n = _count(paths)
        held = holdout_indices(n, opts.holdout, opts.seed, kind)
        records[kind], held_n[kind], train_n[kind] = n, len(held), n - len(held)
        L, key = scan_lengths(paths, kind, enc, config.vision.image_size, held)
        if L > longest:
            longest, longest_key = L, key
    max_pos = config.llm.max_seq_len
    if longest > max_pos:
        raise ValueError(f"{longest_key}: {longest} tokens, longer than the model's context ({max_pos}); "
                         "shorten or remove that record")
    seq_len = opts.seq_len if opts.seq_len is not None else min(max_pos, round_up(longest, 64))
    if seq_len < longest:
        raise ValueError(f"--seq-len {seq_len} is shorter than the longest training sample ({longest_key}: {longest} "
                         "tokens)")
    if seq_len > max_pos:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context ({max_pos})")

    # -- optimiser numbers by size, steps from epochs
    batch = opts.batch_size if opts.batch_size is not None else tier.batch_size
    if batch < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch}")
    micro = max(1, min(batch, tier.slots // seq_len)) if tier.slots else 1
    lr = opts.lr if opts.lr is not None else (tier.lora_lr if opts.lora else tier.lr)
    n_train = sum(train_n.values())
    if opts.steps is not None:
        if opts.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {opts.steps}")
        steps = opts.steps
    else:
        if not opts.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {opts.epochs}")
        steps = max(1, math.ceil(opts.epochs * n_train / batch))
    epochs = steps * batch / n_train
    if tier.suggest_lora and not opts.lora:
        notes.append(f"a {n_params / 1e9:.1f}B-parameter model: full fine-tuning needs optimiser state for every "
                     "weight (about 16 bytes per parameter); --lora trains small adapters instead")
    if epochs > 50:
        notes.append(f"{epochs:.0f} epochs over {n_train} records: expect memorisation; watch the held-out figures")
    stage = "janusflow/3" if arch == "janusflow" else "janus-pro/3"
    raw = read_config_json(model_dir / "config.json")
    export = str(raw.get("torch_dtype") or raw.get("language_config", {}).get("torch_dtype") or "bfloat16")
    export = export if export in ("float32", "bfloat16", "float16") else "bfloat16"
    save_every = opts.save_every or max(1, min(500, math.ceil(steps / 10)))
    return Plan(base_model=str(model_dir.resolve()), arch=arch, params=n_params, tier=tier.name,
                data={k: [str(p) for p in v] for k, v in data.items()}, records=records, train_records=train_n,
                holdout_records=held_n, holdout=opts.holdout, seed=opts.seed, stage=stage, ratio=mix_ratio(train_n),
                batch_size=batch, micro_batch_size=micro, steps=steps, epochs=round(epochs, 3), lr=lr,
                warmup=min(50, steps // 20), schedule="cosine", min_lr_ratio=0.1, seq_len=seq_len, longest=longest,
                longest_key=longest_key, max_positions=max_pos, autocast=default_autocast(), export_dtype=export,
                lora=opts.lora, threads=opts.threads if opts.threads is not None else tier.threads,
                save_every=save_every, notes=notes, tensorboard=opts.tensorboard)


@dataclass
class _Arch:
    """Just enough of a model for SampleEncoder.for_model (its config), before any weights are loaded."""

    config: Any


def run_config(plan: Plan, out: str | Path, *, progress: bool = True) -> RunConfig:
    """The trainer's RunConfig for a plan: the stage row with the plan's numbers as overrides, the split's
    data builder, and [lora] when asked."""
    return RunConfig.from_dict({
        "model": {"source": plan.base_model},
        "stage": {"name": plan.stage, "steps": plan.steps, "batch_size": plan.batch_size, "lr": plan.lr,
                  "warmup": plan.warmup, "ratio": list(plan.ratio), "schedule": plan.schedule,
                  "min_lr_ratio": plan.min_lr_ratio, "horizon": plan.steps},
        "train": {"out": str(out), "micro_batch_size": plan.micro_batch_size, "seq_len": plan.seq_len,
                  "threads": plan.threads, "autocast": plan.autocast, "attention": "segments", "seed": plan.seed,
                  "log_every": max(1, min(10, plan.steps // 20)), "save_every": plan.save_every, "keep_last": 1,
                  "export_dtype": plan.export_dtype, "progress": progress, "tensorboard": plan.tensorboard},
        "data": {"builder": "januskit.train.finetune:build_data", **plan.data, "holdout": plan.holdout,
                 "holdout_seed": plan.seed},
        **({"lora": {"enabled": True}} if plan.lora else {}),
        # JanusFlow: no REPA. Its projector h_phi is a training-only part that checkpoints do not carry, so a
        # fine-tune would start it from random weights; the rectified-flow loss alone is the objective.
        **({"flow": {"repa_weight": 0.0}} if plan.arch == "janusflow" else {}),
    }, "finetune")


def log_evaluation(out: Path, before: dict[str, Any], after: dict[str, Any], steps: int) -> None:
    """The held-out figures in TensorBoard beside the training curves: eval/<figure> at step 0 (the base
    model) and at the last step (the result), so each is a line from before to after."""
    from torch.utils.tensorboard import SummaryWriter

    from .loggers import TENSORBOARD_DIR

    w = SummaryWriter(str(out / TENSORBOARD_DIR))
    try:
        for step, figures in ((0, before), (steps, after)):
            for k, v in figures.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    w.add_scalar(f"eval/{k}", float(v), step)
    finally:
        w.close()


def measure_step_seconds(cfg: RunConfig, steps: int) -> float:
    """Seconds per optimiser step of the real run (model, data, batch): `steps` steps on a throwaway copy,
    the first one not counted (it pays for allocations and warm-up). Nothing is written."""
    from .trainer import build_run, train_step

    parallel.init(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    run = None
    quiet = logging.getLogger("januskit.train")  # the real run logs the same stage summary again
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        run = build_run(cfg)
        batches = iter(run.data)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(run.wrapped, batches, run.optimizer, run.scheduler, run.step_cfg)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:] if len(times) > 1 else times)
    finally:
        if run is not None and hasattr(run.data, "close"):
            run.data.close()
        del run
        gc.collect()
        parallel.teardown()
        quiet.setLevel(level)


# --------------------------------------------------------------------------------------- evaluation
def _conversation(s: Sample) -> tuple[list[Any], str]:
    """(the conversation up to the last answer, with each user turn's images attached; that answer)."""
    from ..processing.chat import Message
    from ..processing.tokenizer import IMAGE_TOKEN

    images = iter(s.images)
    msgs = [Message(m.role, m.content, [next(images) for _ in range(m.content.count(IMAGE_TOKEN))])
            for m in s.messages[:-1]]
    return msgs, s.messages[-1].content


@torch.inference_mode()
def evaluate(model_dir: str | Path, plan: Plan, *, limit: int | None = 200, batch: int = 16) -> dict[str, Any]:
    """Held-out figures of a model folder: `und_accuracy` (greedy answer through the chat pipeline equals the
    reference after world.questions.normalise; the last answer of each conversation), and `loss_<kind>`, the mean
    per-token loss of every kind present, exactly as training counts it but without dropout: answer tokens for
    understanding and text, image tokens for generation and edit (JanusFlow: the rectified-flow loss at the
    sample's fixed t and noise). float32, no autocast: the same numbers before and after."""
    import januskit

    from ..world.questions import normalise
    from .data.encode import fill_latents, fill_vq_ids, vq_tokenizer
    from .data.loader import vae_encoder
    from .data.packing import pack
    from .flow import FlowSettings
    from .losses import N_KINDS, batch_losses

    pipe = januskit.load(model_dir)
    model, proc = pipe.model, pipe.processor
    model.eval()
    flow = model.config.arch == "janusflow"
    enc = SampleEncoder.for_model(model, proc, seed=plan.seed, cfg_drop=0.0, edit_drop_text=0.0, edit_drop_image=0.0,
                                  edit_drop_both=0.0, system_prompt=proc.system_prompt)
    tokenize = None if flow else vq_tokenizer(model)
    latents = vae_encoder(None, model_dir) if flow else None
    sums, counts = torch.zeros(N_KINDS + 1), torch.zeros(N_KINDS, dtype=torch.long)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    for kind, paths in plan.data.items():
        samples = heldout_samples(paths, kind, plan.holdout, plan.seed, limit)
        if not samples:
            continue
        out[f"n_{SHORT[kind]}"] = len(samples)
        for i in range(0, len(samples), batch):
            items = [enc(s) for s in samples[i:i + batch]]
            fill_vq_ids(items, tokenize, None if flow else model.config.vq.codebook_size)
            if flow:
                fill_latents(items, latents, model.config.latent_shape)
            b = pack(items, max(plan.seq_len, max(len(x) for x in items)), pad_id=proc.pad_id)
            s = batch_losses(model, b, FlowSettings() if flow else None, None)
            sums += s.by_kind.float().cpu()
            counts += s.count.cpu()
        if kind == "understanding":
            right = 0
            for i in range(0, len(samples), batch):
                chunk = [_conversation(s) for s in samples[i:i + batch]]
                systems = {s.system for s in samples[i:i + batch]}
                n_new = max(len(proc.tokenizer.encode(ref, add_bos=False)) for _, ref in chunk) + 8
                for sys_prompt in systems:  # rows sharing a system prompt answer together
                    rows = [c for c, s in zip(chunk, samples[i:i + batch]) if s.system == sys_prompt]
                    answers = pipe.chat_batch([c for c, _ in rows], max_new_tokens=n_new, system_prompt=sys_prompt)
                    right += sum(normalise(a) == normalise(ref) for a, (_, ref) in zip(answers, rows))
            out["und_accuracy"] = right / len(samples)
    for i, k in enumerate(KINDS):
        if counts[i] > 0:
            out[f"loss_{SHORT[k]}"] = float(sums[i] / counts[i])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    del pipe, model
    gc.collect()
    return out


# --------------------------------------------------------------------------------------- the command
def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h {s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def describe_plan(plan: Plan) -> str:
    """The plan as the command prints it before training."""
    ratio = ":".join(str(x) for x in plan.ratio)
    data = ", ".join(f"{k} {plan.records[k]} ({plan.train_records[k]} train, {plan.holdout_records[k]} held out)"
                     for k in plan.data)
    n_train = sum(plan.train_records.values())
    rows = [
        ("model", f"{plan.base_model} ({plan.arch}, {plan.params / 1e6:.1f}M parameters: {plan.tier})"),
        ("data", data),
        ("stage", f"{plan.stage}" + (" with LoRA adapters (the rest frozen)" if plan.lora else
                                     " (everything but the image tokenizer or VAE trains)")),
        ("ratio", f"und:text:gen:edit = {ratio}"),
        ("batch", f"{plan.batch_size} samples per step (micro-batches of {plan.micro_batch_size} rows)"),
        ("steps", f"{plan.steps} ({plan.epochs:g} epochs of {n_train} training records)"),
        ("lr", f"{plan.lr:g}, warm-up {plan.warmup}, cosine to {plan.min_lr_ratio:g}x"),
        ("seq_len", f"{plan.seq_len} (longest training sample {plan.longest} tokens; model context "
                    f"{plan.max_positions})"),
        ("dtype", "bfloat16 autocast, float32 weights" if plan.autocast == "bfloat16" else "float32"),
    ]
    if plan.seconds_per_step is not None:
        rows.append(("time", f"~{_fmt_seconds(plan.estimated_seconds)} of training (measured "
                             f"{plan.seconds_per_step:.2f} s/step)"))
    lines = ["plan:"] + [f"  {k:<8} {v}" for k, v in rows] + [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def describe_eval(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    names = [("und_accuracy", "understanding accuracy")] + [(f"loss_{SHORT[k]}", f"{k} loss") for k in KINDS]
    lines = ["held-out evaluation (before -> after):"]
    for key, label in names:
        b, a = (before or {}).get(key), (after or {}).get(key)
        if b is None and a is None:
            continue
        f = (lambda v: "-" if v is None else f"{v:.3f}")
        lines.append(f"  {label:<24} {f(b)} -> {f(a)}")
    return "\n".join(lines)


def _write(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


def _clean_output(out: Path, base: Path, keep_checkpoints: bool) -> None:
    """Drop what the export copied from the base model that describes the base (identical copies of FOREIGN
    files), and the checkpoints of a finished run unless kept."""
    for name in FOREIGN:
        mine, theirs = out / name, base / name
        if mine.is_file() and theirs.is_file() and mine.read_bytes() == theirs.read_bytes():
            mine.unlink()
    if not keep_checkpoints and (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")


def finetune(opts: FinetuneOptions, *, echo: Callable[[str], None] = print,
             train_fn: Callable[..., Path] | None = None) -> dict[str, Any]:
    """Plan, time, evaluate the base, train, evaluate the result; returns finetune.json's content.
    `train_fn`: the trainer's train (tests pass a wrapper)."""
    from .trainer import train

    out = Path(opts.out)
    report_path = out / REPORT
    if opts.resume:
        if not report_path.is_file():
            raise FileNotFoundError(f"--resume: {report_path} not found (no fine-tune was started in {out})")
        report = json.loads(report_path.read_text())
        if "after" in report:
            echo(f"{out}: this fine-tune has finished already")
            echo(describe_eval(report.get("before"), report.get("after")))
            return report
        plan = Plan.from_dict(report["plan"])
        if opts.steps is not None and opts.steps != plan.steps:  # extend (or shorten) the resumed run
            plan.steps = opts.steps
            plan.epochs = round(plan.steps * plan.batch_size / sum(plan.train_records.values()), 3)
        echo(f"resuming {out} (plan from {report_path})")
        echo(describe_plan(plan))
    else:
        if out.exists() and any(out.iterdir()):
            done = list_checkpoints(out / "checkpoints")
            hint = "; pass --resume to continue it" if (report_path.is_file() and done) else ""
            raise FileExistsError(f"--out {out}: not empty{hint}; choose a new output folder")
        if opts.tokenizer_images is not None:
            opts = retrain_tokenizer_first(opts, echo)
        plan = make_plan(opts)
        cfg = run_config(plan, out, progress=False)
        if opts.time_steps > 0:
            plan.seconds_per_step = round(measure_step_seconds(cfg, opts.time_steps), 4)
            plan.estimated_seconds = round(plan.seconds_per_step * plan.steps, 1)
        echo(describe_plan(plan))
        report = {"base_model": plan.base_model, "plan": dataclasses.asdict(plan), "status": "training"}
        out.mkdir(parents=True, exist_ok=True)
        _write(report_path, report)
    if plan.threads > 0:
        torch.set_num_threads(plan.threads)
    evaluating = opts.evaluate and any(plan.holdout_records.values())
    if opts.evaluate and not evaluating:
        echo("no held-out records (--holdout 0, or one record per kind): no before/after evaluation")
    if evaluating and "before" not in report:
        echo("evaluating the base model on the held-out records ...")
        report["before"] = evaluate(plan.base_model, plan, limit=opts.eval_max)
        _write(report_path, report)

    cfg = run_config(plan, out)
    t0 = time.perf_counter()
    (train_fn or train)(cfg, resume=opts.resume)
    report["train_seconds"] = round(time.perf_counter() - t0, 1) + report.get("train_seconds", 0.0)
    report["plan"] = dataclasses.asdict(plan)
    report["status"] = "trained"
    _write(report_path, report)  # at once: the export may have copied a fine-tuned base's own finetune.json here
    if evaluating:
        echo("evaluating the fine-tuned model on the held-out records ...")
        report["after"] = evaluate(out, plan, limit=opts.eval_max)
    else:
        report["after"] = {}
    report["status"] = "done"
    if plan.tensorboard and evaluating:
        log_evaluation(out, report["before"], report["after"], plan.steps)
    _clean_output(out, Path(plan.base_model), opts.keep_checkpoints)
    _write(report_path, report)
    if evaluating:
        echo(describe_eval(report.get("before"), report["after"]))
    echo(f"fine-tuned model written to {out} ({_fmt_seconds(report['train_seconds'])} of training)")
    return report

