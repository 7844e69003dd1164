"""LoRA fine-tuning through the `peft` library (optional: pip install 'januskit[lora]').

    apply_lora(model, LoraSettings(r=8, include_gen_head=True))   # in place; only adapters train
    ... train ...
    save_adapter(model, "my-adapter")                               # adapter-only, small
    save_janus(merge_lora(model), "merged")                        # plain official layout

peft's layers are injected in place (`peft.inject_adapter_in_model`), so the model stays a JanusModel
and every module keeps its name. An adapted Linear `...q_proj` holds `q_proj.base_layer.weight` (the
frozen original) and `q_proj.lora_A.default.weight` / `q_proj.lora_B.default.weight`; `merge_lora`
folds B @ A * alpha / r into the base weight and puts the plain Linear back, so the state dict is again
exactly the official key set. Targets: the LLM's projections (q/k/v/o, gate/up/down, optionally
lm_head), and on request the two aligners and the image head (which matter for image generation).
The VQ tokenizer and everything not adapted stays frozen.

Adapter folders use PEFT's own layout (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained(januskit_model, folder)`
reads them as well as `load_adapter` does.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint.io import materialize_buffers
from ..models import build_model
from ..models.janus import JanusModel

log = logging.getLogger("januskit.train")

ADAPTER = "default"  # peft's adapter name; januskit uses one adapter at a time
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file names, so PEFT can read our folders
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT saves keys as seen from its PeftModel wrapper
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VALID_TARGETS = LLM_TARGETS + ("lm_head",)  # lm_head: the 102400-way text head, off by default (large)
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}

INSTALL_HINT = "pip install 'januskit[lora]'"


def require_peft() -> ModuleType:
    """The `peft` module, imported on first use so januskit works without it unless LoRA is asked for."""
    try:
        return importlib.import_module("peft")
    except ImportError as e:
        raise ImportError(f"LoRA fine-tuning needs the optional dependency peft, which is not installed "
                          f"({e}); install it with: {INSTALL_HINT}") from None


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scale = alpha / r
    dropout: float = 0.05  # on the adapter's input (training only; merging ignores it)
    targets: tuple[str, ...] = LLM_TARGETS  # LLM linear layers by short name, in every decoder layer
    include_aligners: bool = False  # also aligner (understanding) and gen_aligner (generation) MLPs;
    # JanusFlow: its three linear aligners (understanding in, generation in, generation out)
    include_gen_head: bool = True  # also the image head: generation fine-tuning depends on it;
    # JanusFlow: the generation-out aligner, which maps LLM states to the velocity decoder

    def __post_init__(self) -> None:
        # TOML gives lists; a tuple keeps the settings hashable and comparable.
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in VALID_TARGETS]
        if bad or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora targets {list(self.targets)}: unknown or repeated {bad or 'names'}; "
                             f"valid: {', '.join(VALID_TARGETS)}")
        if not (self.targets or self.include_aligners or self.include_gen_head):
            raise ValueError("lora: nothing to adapt (empty targets, no aligners, no gen head)")

    @classmethod
    def of(cls, obj: Any) -> "LoraSettings":
        """The settings fields of any object that has them (e.g. the run config's [lora] table)."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})

    def target_regex(self) -> str:
        """One regex that peft full-matches against module names (our names are the official keys)."""
        parts = []
        attn = [t for t in self.targets if t in _ATTN]
        mlp = [t for t in self.targets if t in LLM_TARGETS and t not in _ATTN]
        if attn:
            parts.append(rf"language_model\.model\.layers\.\d+\.self_attn\.(?:{'|'.join(attn)})")
        if mlp:
            parts.append(rf"language_model\.model\.layers\.\d+\.mlp\.(?:{'|'.join(mlp)})")
        if "lm_head" in self.targets:
            parts.append(r"language_model\.lm_head")
        if self.include_aligners:
            parts.append(r"(?:gen_)?aligner\.layers\.\d*[02468]")  # MlpProjector: Linear at even indices, GELU between
            parts.append(r"vision_(?:und_enc|gen_enc|gen_dec)_aligner")  # JanusFlow: plain Linear layers
        if self.include_gen_head:
            parts.append(r"gen_head\.(?:output_mlp_projector|vision_head)")
            parts.append(r"vision_gen_dec_aligner")  # JanusFlow
        return "|".join(f"(?:{p})" for p in parts)

    def to_peft(self) -> Any:
        peft = require_peft()
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=self.target_regex(), bias="none")


def is_adapter_key(name: str) -> bool:
    """Parameter / state-dict names of LoRA weights (`...lora_A.default.weight`, `...lora_B.weight`)."""
    return ".lora_" in name


def has_lora(model: nn.Module) -> bool:
    return isinstance(getattr(model, "peft_config", None), dict) and ADAPTER in model.peft_config


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _inject(model: nn.Module, config: Any, *, empty: bool = False) -> None:
    """peft's in-place injection, then our freezing rule: adapters train, nothing else does."""
    peft = require_peft()
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters (merge_lora them first)")
    # empty=True: adapter tensors on meta (to be assigned from a state dict); draws no random numbers.
    with _cpu_stand_ins(model, not empty):
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER, low_cpu_mem_usage=empty)
    for n, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(n))
    if any(n.startswith("gen_vision_model.") for n, _ in _tuner_layers(model)):
        raise ValueError("LoRA target matches the VQ tokenizer, which is never trained")


@contextmanager
def _cpu_stand_ins(model: nn.Module, active: bool) -> Iterator[None]:
    """For the duration, every Linear weight on meta is stood in for by a CPU zero of its shape and dtype that
    takes no memory (one element, expanded). peft builds each adapter on the CPU, draws it, then moves it to its
    base weight's device: with a base on meta (FSDP's construction) the draw would be lost. With the stand-ins
    the adapters stay on the CPU with the very values an unsharded model draws (same generator, same order), and
    the meta weights are put back afterwards."""
    swapped = [(m, m.weight) for m in model.modules() if active and isinstance(m, nn.Linear) and m.weight.is_meta]
    for m, w in swapped:
        m._parameters["weight"] = nn.Parameter(torch.zeros((), dtype=w.dtype).expand(w.shape), requires_grad=False)
    try:
        yield
    finally:
        for m, w in swapped:
            m._parameters["weight"] = w


def apply_lora(model: JanusModel, settings: LoraSettings, seed: int | None = None) -> JanusModel:
    """Inject LoRA adapters in place (see the module docstring for the names); only the adapters
    have requires_grad afterwards. Adapter A is random (peft's Kaiming init), B is zero, so the
    adapted model starts out computing exactly what the base model computes. `seed`: draw A from a
    generator seeded with it, leaving the global RNG untouched (under FSDP every rank must build the
    same adapters: nothing broadcasts them); None draws from the global RNG. A model built on meta (FSDP)
    gets its adapters real, on the CPU, with the values the same call draws for a real model."""
    settings = LoraSettings.of(settings)
    if seed is None:
        _inject(model, settings.to_peft())
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _inject(model, settings.to_peft())
    adapted = [n for n, _ in _tuner_layers(model)]
    missing = [t for t in settings.targets if not any(n.endswith("." + t) for n in adapted)]
    if missing:
        raise ValueError(f"lora targets {missing} match no module of this model")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%g on %d modules: %s trainable of %s parameters (%.3f%%)", settings.r,
             settings.alpha, len(adapted), f"{n_train:,}", f"{n_all:,}", 100 * n_train / max(1, n_all))
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The frozen base model for the duration (every adapter switched off, then back on): e.g. RL's
    reference policy without a second copy of the weights."""
    layers = [m for _, m in _tuner_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def merge_lora(model: JanusModel) -> JanusModel:
    """Fold every adapter into its base weight and put the plain modules back, in place: the result
    has exactly the official key set and can be written with save_janus. Parameters stay frozen."""
    require_peft()
    for name, layer in _tuner_layers(model):
        layer.merge(safe_merge=True)  # safe_merge: raise rather than write non-finite weights
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


class MergedView:
    """An adapted model as save_janus sees a plain one, for a streamed export: its tensors under the official
    names (`...q_proj.base_layer.weight` as `...q_proj.weight`, the adapters left out) and `materialize`, which
    makes each one whole with `whole` (a DTensor's gather) and folds the adapter into an adapted weight as
    merge_lora does (W + B @ A * alpha / r, in the weights' float32). No more than one weight and its two
    adapters are whole at a time; every rank calls `materialize` in the same order (the gathers are collective)."""

    def __init__(self, model: JanusModel, whole: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.config = model.config
        self._whole = whole
        self._merges = {id(layer.get_base_layer().weight): (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                                                             layer.scaling[ADAPTER]) for _, layer in _tuner_layers(model)}
        self._state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict(keep_vars=True).items()
                       if not is_adapter_key(k)}

    def modules(self) -> Iterator[nn.Module]:
        return iter(())  # nothing prepacked for CPU inference

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    @torch.no_grad()
    def materialize(self, t: torch.Tensor) -> torch.Tensor:
        w = self._whole(t).detach()
        if id(t) not in self._merges:
            return w
        a, b, scaling = self._merges[id(t)]
        return w + (self._whole(b).detach() @ self._whole(a).detach()) * scaling


def merged_state(model: JanusModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-key weights with the adapters folded in, computed from a full state dict of the adapted
    `model` on a throw-away copy: the live model is not touched, so this also works when it is sharded
    (FSDP) and `state` was gathered with parallel.model_state."""
    with torch.device("meta"):
        m = build_model(model.config)  # Janus or JanusFlow
    _inject(m, copy.deepcopy(model.peft_config[ADAPTER]), empty=True)
    m.load_state_dict(state, strict=True, assign=True)
    materialize_buffers(m)
    return merge_lora(m).state_dict()


# ---------------------------------------------------------------------------------------------
# Adapter-only files

def adapter_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's saved names (adapter name dropped: `...q_proj.lora_A.weight`).
    `state`: a full state dict of `model` gathered elsewhere (FSDP), else the model's own."""
    peft = require_peft()
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters")
    # save_embedding_layers=False: we adapt no embedding, and "auto" would look the base up on the Hub.
    return peft.get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER, save_embedding_layers=False)


def save_adapter(model: nn.Module, folder: str | Path, state: dict[str, torch.Tensor] | None = None,
                 base: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (in the model's dtype) into `folder`,
    replacing earlier adapter files there. `base`: where the base model comes from (recorded as
    peft's base_model_name_or_path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in adapter_state(model, state).items()}
    config = copy.deepcopy(model.peft_config[ADAPTER])
    config.base_model_name_or_path = base
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})  # peft's own metadata
    config.save_pretrained(str(folder))
    return folder


# The LoraConfig fields that decide which weights exist and how they are scaled: resuming or loading
# into an adapted model with any of them different would silently compute something else.
_STRUCTURE = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


def checkpoint_has_adapters(ckpt: Path, lora: bool) -> bool:
    """Whether the run checkpoint `ckpt` holds LoRA adapters; refused when that differs from `lora` (whether the
    resuming run has [lora] enabled)."""
    adapter = (ckpt / ADAPTER_WEIGHTS).is_file()
    if adapter != lora:
        raise ValueError(f"{ckpt}: written by a run {'with' if adapter else 'without'} [lora] enabled; resume it "
                         "with the same [lora] setting")
    return adapter


def check_structure(model: nn.Module, folder: Path, config: Any = None) -> None:
    """Refuse an adapter folder whose LoRA differs from the model's in rank, alpha or targets (naming them)."""
    config = config if config is not None else require_peft().LoraConfig.from_pretrained(str(folder))
    mine = model.peft_config[ADAPTER]
    diff = {f: (getattr(config, f, None), getattr(mine, f, None)) for f in _STRUCTURE
            if getattr(mine, f, None) != getattr(config, f, None)}
    if diff:
        raise ValueError(f"{folder}: adapter differs from the model's LoRA in {sorted(diff)} (file, model: {diff})")


def read_adapter(model: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """The folder's adapter weights under peft's saved names (`...q_proj.lora_A.weight`), exactly the set the
    adapted `model` has (refused otherwise, naming the differences)."""
    weights = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    expected = {saved_adapter_key(n) for n in model.state_dict() if is_adapter_key(n)}
    if set(weights) != expected:
        raise ValueError(f"{folder}: adapter keys do not match the model: missing "
                         f"{sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]}")
    return weights


def saved_adapter_key(name: str) -> str:
    """peft's saved name of an adapter weight: the adapter's name dropped (`...lora_A.default.weight` ->
    `...lora_A.weight`)."""
    return name.replace(f".{ADAPTER}.", ".")


def load_adapter(model: JanusModel, folder: str | Path) -> JanusModel:
    """Load an adapter folder strictly (every adapter weight present, nothing unexpected). A model
    without adapters gets them injected from the folder's config first; one that has them must have
    the same structure (rank, alpha, targets)."""
    peft = require_peft()
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = peft.LoraConfig.from_pretrained(str(folder))
    if has_lora(model):
        check_structure(model, folder, config)
    else:
        _inject(model, config)
    weights = read_adapter(model, folder)
    res = peft.set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)
    if res.unexpected_keys or any(is_adapter_key(k) for k in res.missing_keys):
        raise ValueError(f"{folder}: adapter did not load cleanly ({res.unexpected_keys[:5]}, "
                         f"{[k for k in res.missing_keys if is_adapter_key(k)][:5]})")
    return model
