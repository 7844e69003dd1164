"""Run configuration: four small dataclasses read from one TOML file (see configs/*.toml).

    [model]  what to start from: a checkpoint folder (official layout) or a preset name
    [stage]  a row of stages.STAGES, an optional `scale`, and optional absolute overrides of its fields
    [train]  output folder, micro-batch, devices and parallelism, logging and checkpoint intervals
    [data]   `builder = "module:function"`; every other key is passed to the builder as a keyword
    [lora]   optional: LoRA adapters (januskit.train.lora, needs peft) instead of the stage's freezing
    [flow]   optional, JanusFlow only: t distribution and REPA (januskit.train.flow.FlowSettings)
    [rl]     optional: online RL for image generation (januskit.train.rl.settings.RLSettings)

Unknown keys raise with the valid names, so a typo never silently falls back to a default.
Relative paths (model source, data files, output folder) resolve against the working directory, not the
config file's folder: the shipped configs are written for the repository root (docs/training.md).
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESET_NAMES, JanusConfig, JanusFlowConfig
from .flow import FlowSettings
from .lora import LoraSettings
from .rl.settings import RLSettings
from .stages import Stage, get_stage

ATTENTION = ("mask", "segments")
COMPILE = ("none", "layers")
FSDP_DTYPES = ("float32", "bfloat16")


@dataclass(kw_only=True)
class ModelSection:
    source: str  # checkpoint folder in the official layout, or a preset name (random weights, tests)
    seed: int = 0  # weight seed when `source` is a preset


@dataclass(kw_only=True)
class StageSection:
    name: str  # key of januskit.train.stages.STAGES, e.g. "janus-pro/1"
    scale: float = 1.0  # multiplies steps, warm-up and batch size (Stage.scaled); 1 = the paper's run
    overrides: dict[str, Any] = field(default_factory=dict)  # absolute values for Stage fields, after scaling


@dataclass(kw_only=True)
class TrainSection:
    out: str  # output folder: final model (official layout), metrics.jsonl, loss.png, checkpoints/
    micro_batch_size: int = 1  # packed rows per forward on each rank: a per-step source's step (its samples, packed)
    # runs in as many micro-batches as its rows fill; a micro-batch source (synthetic) yields this many rows per item
    seq_len: int = 4096  # packed row length in slots (both papers train at 4096)
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if available, else cpu), "cpu" or "cuda"
    parallel: str = "auto"  # "auto" (ddp when launched with torchrun), "none", "ddp" or "fsdp"
    autocast: str = "none"  # "none" (float32) or "bfloat16"; master weights and optimizer stay float32
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (memory for time)
    attention: str = "mask"  # packed rows: "mask" (one (T, T) mask per row) or "segments" (each sample alone; same
    # math, other rounding, several times less attention work for short samples on CPU: models.llama.PackedSegments)
    compile: str = "none"  # "none", or "layers": torch.compile each decoder layer (dynamic shapes; compiles on the
    # first steps, then fuses the norm / RoPE / SwiGLU elementwise work; attention with "segments" stays eager)
    keep_memory: bool = False  # glibc: keep freed memory in the process (no per-buffer mmap below 32 MB, no trimming),
    # so CPU steps stop page-faulting fresh activation buffers; the resident size stays at its peak
    fused_optimizer: bool = False  # AdamW's fused kernel (about 3x faster on CPU than the default; other rounding)
    # FSDP2's mixed-precision policy (parallel = "fsdp"): the dtype each layer's weights are all-gathered and
    # computed in, and the dtype gradients are reduce-scattered in; the sharded master weights and the optimizer
    # state stay float32 either way. bfloat16 parameters halve the all-gather traffic and the gathered layer.
    fsdp_param_dtype: str = "float32"
    fsdp_reduce_dtype: str = "float32"
    fsdp_offload: bool = False  # FSDP2's CPUOffloadPolicy: shards, gradients and optimizer state in host memory
    # (CUDA only), each layer copied to the GPU for its forward and backward
    async_checkpoint: bool = False  # FSDP: write each checkpoint's shards in a background thread (dcp.async_save)
    # while the next steps run; costs a host-memory copy of this rank's weight and optimizer shards until written
    threads: int = 0  # CPU intra-op threads (torch.set_num_threads); 0 keeps torch's default
    seed: int = 0  # torch / numpy / python RNG seed, offset by rank
    log_every: int = 10  # steps between metrics lines (each costs a host sync)
    save_every: int = 1000  # steps between checkpoints (the last step is always saved)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after a new one commits
    export_dtype: str = "bfloat16"  # dtype of the final model folder ("float32" keeps the exact weights)
    plot: bool = True  # write loss.png at the end (needs matplotlib, the `plot` extra; without it only metrics.jsonl)
    tensorboard: bool = False  # also log each metrics line to <out>/tensorboard/ (the `tensorboard` extra)
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {self.compile!r}")
        for name in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            if getattr(self, name) not in FSDP_DTYPES:
                raise ValueError(f"{name} must be one of {', '.join(FSDP_DTYPES)}, got {getattr(self, name)!r}")


@dataclass(kw_only=True)
class DataSection:
    builder: str = "januskit.train.data.synthetic:build"  # "module:function(ctx: DataContext, **options)"
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the builder


@dataclass(frozen=True, kw_only=True)
class LoraSection(LoraSettings):
    """[lora]: r, alpha, dropout, targets, include_aligners, include_gen_head (LoraSettings), plus:"""

    enabled: bool = False  # train LoRA adapters only; the stage then gives LR, schedule and data ratios
    merge_on_export: bool = True  # final folder: merged official layout (True) or adapter files only


@dataclass(kw_only=True)
class RunConfig:
    model: ModelSection
    stage: StageSection
    train: TrainSection
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    flow: FlowSettings = field(default_factory=FlowSettings)
    rl: RLSettings = field(default_factory=RLSettings)

    def resolved_stage(self) -> Stage:
        """The stage row, scaled, then overridden (overrides are absolute values)."""
        s = get_stage(self.stage.name).scaled(self.stage.scale)
        valid = {f.name for f in dataclasses.fields(Stage)} - {"name", "source"}
        bad = set(self.stage.overrides) - valid
        if bad:
            raise ValueError(f"[stage]: unknown field(s) {sorted(bad)}; valid overrides: {', '.join(sorted(valid))}")
        ov = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.stage.overrides.items()}
        return dataclasses.replace(s, **ov) if ov else s

    def to_dict(self) -> dict[str, Any]:
        """The TOML layout as a dict (overrides and options flattened back into their tables)."""
        return {"model": dataclasses.asdict(self.model),
                "stage": {"name": self.stage.name, "scale": self.stage.scale, **self.stage.overrides},
                "train": dataclasses.asdict(self.train),
                "data": {"builder": self.data.builder, **self.data.options},
                "lora": dataclasses.asdict(self.lora), "flow": dataclasses.asdict(self.flow),
                "rl": dataclasses.asdict(self.rl)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "RunConfig":
        extra = set(d) - {"model", "stage", "train", "data", "lora", "flow", "rl"}
        if extra:
            raise ValueError(f"{where}: unknown table(s) {sorted(extra)}; valid: model, stage, train, data, lora, flow, "
                             "rl")
        for t in ("model", "stage", "train"):
            if t not in d:
                raise ValueError(f"{where}: missing table [{t}]")
        st = dict(d["stage"])
        if "name" not in st:
            raise ValueError(f"{where}: [stage] needs a name (one of the stages in januskit.train.stages)")
        stage = StageSection(name=st.pop("name"), scale=float(st.pop("scale", 1.0)), overrides=st)
        data = dict(d.get("data", {}))
        builder = data.pop("builder", DataSection.builder)
        return cls(model=_build(ModelSection, d["model"], f"{where} [model]"), stage=stage,
                   train=_build(TrainSection, d["train"], f"{where} [train]"),
                   data=DataSection(builder=builder, options=data),
                   lora=_build(LoraSection, d.get("lora", {}), f"{where} [lora]"),
                   flow=_build(FlowSettings, d.get("flow", {}), f"{where} [flow]"),
                   rl=_build(RLSettings, d.get("rl", {}), f"{where} [rl]"))


def _build(kind: type, table: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    bad = set(table) - names
    if bad:
        raise ValueError(f"{where}: unknown key(s) {sorted(bad)}; valid keys: {', '.join(sorted(names))}")
    try:
        return kind(**table)
    except TypeError as e:  # a missing required key
        raise ValueError(f"{where}: {e}") from None
    except ValueError as e:  # a value a section's own checks reject
        raise ValueError(f"{where}: {e}") from None


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """["train.out=runs/x", "stage.lr=3e-4"] -> nested dict; values are TOML literals, else strings."""
    out: dict[str, Any] = {}
    for a in assignments:
        key, sep, value = a.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {a!r}: expected TABLE.KEY=VALUE, e.g. train.out=runs/x")
        try:
            v = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            v = value  # bare words: paths, names
        table, _, k = key.strip().partition(".")
        out.setdefault(table, {})[k] = v
    return out


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    for table, kv in parse_set(overrides or []).items():
        d.setdefault(table, {}).update(kv)
    cfg = RunConfig.from_dict(d, str(path))
    check_relative_paths(cfg, path)
    return cfg


# [data] options naming files or folders, in the builders januskit ships (a custom builder's are its own)
DATA_PATH_KEYS = ("understanding", "text", "generation", "edit", "vae")
PATH_BUILDERS = ("januskit.train.data.loader:build", "januskit.train.data.fresh:build")


def config_paths(cfg: RunConfig) -> list[tuple[str, str]]:
    """(key as the config spells it, path) of every file or folder the config names, except [train] out
    (created by the run) and values that are not paths (a preset name, prompts = "world")."""
    out: list[tuple[str, Any]] = []  # a list in [data] may hold anything: only strings are paths
    if cfg.model.source not in PRESET_NAMES:
        out.append(("[model] source", cfg.model.source))
    if cfg.data.builder in PATH_BUILDERS:
        for key in DATA_PATH_KEYS:
            value = cfg.data.options.get(key)
            table = value if isinstance(value, dict) else {"paths": value}
            paths = table.get("paths")
            for p in [paths] if isinstance(paths, str) else paths if isinstance(paths, list) else []:
                out.append((f"[data] {key}", p))
            if isinstance(table.get("root"), str):
                out.append((f"[data] {key}.root", table["root"]))
    for key in ("prompts", "pairs", "pairs_root"):
        value = getattr(cfg.rl, key)
        if isinstance(value, str) and not (key == "prompts" and value == "world"):
            out.append((f"[rl] {key}", value))
    return [(k, p) for k, p in out if isinstance(p, str)]


def check_relative_paths(cfg: RunConfig, config_file: Path) -> None:
    """Relative paths resolve against the working directory (the shipped configs are written for the
    repository root). One that is missing there but exists beside the config file was almost surely
    meant that way: refuse it now, naming both folders, instead of a bare "not found" later. Paths
    missing in both places are left to the code that opens them (a config may name what a previous
    run will write)."""
    for key, value in config_paths(cfg):
        p = Path(value)
        if p.is_absolute() or p.exists():
            continue
        beside = config_file.parent / p
        if beside.exists():
            raise FileNotFoundError(
                f"{config_file}: {key} = {value!r}: not found in the working directory {Path.cwd()}, which relative "
                f"paths in a config resolve against (not the config file's folder); {beside} exists: write "
                f"{str(beside)!r}, or an absolute path")


def describe_step(batch_size: int, world: int, accum: int, micro_batch_size: int, seq_len: int,
                  per_step: bool) -> str:
    """What one optimiser step holds, for the trainer's start line. A per-step source (the file loader,
    fresh world samples) takes [stage] batch_size samples and packs them into however many rows they fill;
    a micro-batch source (synthetic data) yields ready-packed rows, `accum` micro-batches per rank."""
    ranks = f"{world} rank{'s' if world != 1 else ''}"
    if per_step:
        return (f"{batch_size} samples per optimiser step ({ranks} x {batch_size // max(1, world)}), packed into "
                f"rows of {seq_len} tokens, micro-batches of {micro_batch_size} rows, gradient accumulation over as "
                "many micro-batches as the step's rows fill")
    return (f"{world * accum * micro_batch_size} packed rows of {seq_len} tokens per optimiser step ({ranks} x "
            f"{accum} gradient accumulation steps x micro-batches of {micro_batch_size} rows)")


@dataclass(frozen=True, kw_only=True)
class DataContext:
    """What a data builder is told about the run (the rest comes from its own [data] options)."""

    ratio: tuple[float, ...]  # understanding : text : generation (: edit), from the stage
    batch_size: int  # the stage's global batch per optimiser step (all ranks)
    grad_accum: int  # items the trainer takes per step from a micro-batch source (per_step sources: 1)
    micro_batch_size: int  # rows per micro-batch
    seq_len: int  # slots per row
    seed: int  # run seed (the builder should derive its own streams from it, not from rank)
    rank: int  # this process's data shard
    world: int  # number of shards
    model_config: JanusConfig | JanusFlowConfig  # vocab, codebook / latent and image-token counts
    source: str  # model source (folder with tokenizer.json, or a preset name)
    model: Any = None  # the JanusModel being trained (its frozen VQ encoder can tokenise images on its device)
    repa: bool = False  # JanusFlow with REPA: generation samples also carry their image for the REPA target
