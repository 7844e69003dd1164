"""Random-weight checkpoints in the official layout (`januskit init`), for tests and benchmarks.

Every tensor is random, norms and biases included, so a key mapped to the wrong place cannot hide
behind a default value of 1 or 0. The folder carries a synthetic tokenizer.json with the real
special-token strings (Janus-Pro or Janus-1.3B style) and the official processor configs.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import JanusConfig, JanusFlowConfig, PRESET_NAMES, preset, preset_style
from ..models import build_model
from ..processing.chat import Processor
from ..processing.image import ImageTransform
from ..processing.tokenizer import TextTokenizer
from ..processing.synthetic_tokenizer import build_synthetic_tokenizer, real_special_ids
from .io import materialize_buffers
from .official import save_janus, unused_official_shapes

ARCHS = ("janus", "janusflow")
DEFAULT_PRESET = {"janus": "tiny-janus-pro", "janusflow": "tiny-janusflow"}


def random_values(model: torch.nn.Module, seed: int,
                  prefixes: tuple[str, ...] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 value) for every parameter, in state-dict order, from one seeded generator. Matrices
    get std 1/sqrt(fan_in) so activations keep their scale through the network and outputs depend on the
    input (at a flat std of 0.02 the heads' biases decide everything and greedy output is constant).
    `prefixes` limits this to parameters whose names start with one of them (the others draw nothing, so
    those parts' values depend only on the seed). Only shapes are read: the parameters may be on meta or
    sharded (januskit.train.sharded fills each rank's rows from these values, one tensor at a time)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if prefixes is not None and not name.startswith(prefixes):
            continue
        x = torch.empty(p.shape)  # draw in float32 whatever p's dtype: same seed, same values up to rounding
        if name.endswith("bias"):
            x.normal_(0.0, 0.02, generator=g)
        elif p.ndim == 1:  # norm scales: around 1
            x.normal_(1.0, 0.1, generator=g)
        elif isinstance(model.get_submodule(name.rpartition(".")[0]), torch.nn.Embedding) or p.ndim == 3:
            x.normal_(0.0, 1.0, generator=g)  # embedding tables, position embeddings
        else:
            x.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])), generator=g)
        yield name, x


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, prefixes: tuple[str, ...] | None = None) -> torch.nn.Module:
    """Fill every parameter (or those under `prefixes`) with random_values: norms and biases included, so a
    key mapped to the wrong place cannot hide behind a default value of 1 or 0."""
    params = dict(model.named_parameters())
    for name, x in random_values(model, seed, prefixes):
        params[name].copy_(x)
    return model


def random_model(c: JanusConfig | JanusFlowConfig, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(c).to(dtype)
    model.to_empty(device="cpu")  # allocate once, in the target dtype (a 7B model in bf16 is 15 GB)
    materialize_buffers(model)
    randomize(model, seed)
    return model.eval()


def random_unused(c: JanusConfig | JanusFlowConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for k, s in unused_official_shapes(c).items():
        out[k] = torch.zeros(s) if "codebook_used" in k else torch.randn(s, generator=g).mul_(0.02).to(dtype)
    return out


def synthetic_tokenizer(preset_name: str, c: JanusConfig | JanusFlowConfig) -> TextTokenizer:
    style = preset_style(preset_name)
    ids = real_special_ids(preset_name) if c.llm.vocab_size >= 102400 else None
    return build_synthetic_tokenizer(c.llm.vocab_size, style=style, special_ids=ids)


def processor_files(c: JanusConfig | JanusFlowConfig, system_prompt: str | None = None,
                    image_placement: str = "before") -> dict[str, str]:
    """preprocessor_config.json and processor_config.json; `system_prompt` is written only when given
    (the official files omit it: the processor's built-in prompt applies), `image_placement` only when not
    the official layout's "before" (processing.chat.IMAGE_PLACEMENTS)."""
    t = ImageTransform(size=c.vision.image_size)
    pre = {"background_color": list(t.background), "do_normalize": True, "image_mean": list(t.mean),
           "image_processor_type": "VLMImageProcessor", "image_size": t.size, "image_std": list(t.std),
           "min_size": t.min_size, "processor_class": "VLChatProcessor", "rescale_factor": t.rescale}
    proc = {"add_special_token": False, "ignore_id": -100, "image_tag": "<image_placeholder>", "mask_prompt": True,
            "num_image_tokens": c.vision.n_tokens, "processor_class": "VLChatProcessor", "sft_format": "deepseek"}
    if system_prompt is not None:
        proc["system_prompt"] = system_prompt
    if image_placement != "before":
        proc["image_placement"] = image_placement
    return {"preprocessor_config.json": json.dumps(pre, indent=2) + "\n",
            "processor_config.json": json.dumps(proc, indent=2) + "\n"}


def init_checkpoint(dst: str | Path, *, arch: str = "janus", preset_name: str | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float32, overwrite: bool = False, vae: bool = True) -> Path:
    """Write a random-weight checkpoint folder in the official layout; returns its path. The preset
    defaults to the architecture's tiny one and must be of that architecture. JanusFlow folders get a
    random VAE of the matching latent geometry in vae/ (`vae=False`: none; the official folders have none)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    preset_name = preset_name or DEFAULT_PRESET[arch]
    if preset_name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset_name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    c = preset(preset_name)
    if c.arch != arch:
        same = [n for n in PRESET_NAMES if preset(n).arch == arch]
        raise ValueError(f"preset {preset_name!r} is a {c.arch} model, not {arch}; {arch} presets: {', '.join(same)}")
    model = random_model(c, seed, dtype)
    tok = synthetic_tokenizer(preset_name, c)
    files = {"tokenizer.json": tok.to_json_str(), **processor_files(c)}
    dst = save_janus(model, dst, unused=random_unused(c, seed, dtype), files=files, overwrite=overwrite)
    if c.arch == "janusflow" and vae:  # so the random checkpoint generates end to end
        from ..models.vae import LatentVAE
        from .vae import save_vae

        save_vae(LatentVAE.from_config(random_vae_config(c), seed=seed), dst / "vae", overwrite=True)
    return dst


def random_vae_config(c: JanusFlowConfig) -> dict:
    """AutoencoderKL config with the latent geometry a JanusFlow config expects: SDXL-VAE's own for
    384 px / 48 latents, else a small one with the same channels and down-sampling factor."""
    factor = c.vision.image_size // c.latent_size
    if factor < 1 or factor & (factor - 1) or factor * c.latent_size != c.vision.image_size:
        raise ValueError(f"image size {c.vision.image_size} / latent size {c.latent_size} is not a power of two")
    n = factor.bit_length()  # blocks: factor 2 ** (n - 1)
    if (c.vision.image_size, c.latent_size, c.gen_enc.input_channels) == (384, 48, 4):
        widths, per_block, groups, scale = [128, 256, 512, 512], 2, 32, 0.13025  # stabilityai/sdxl-vae
    else:
        widths, per_block, groups, scale = [8 * 2 ** min(i, 2) for i in range(n)], 1, 4, 1.0
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": widths, "layers_per_block": per_block,
            "act_fn": "silu", "latent_channels": c.gen_enc.input_channels, "norm_num_groups": groups,
            "sample_size": c.vision.image_size, "scaling_factor": scale, "shift_factor": None, "force_upcast": False}


def preset_pipeline_parts(preset_name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Processor]:
    """An in-memory random model + synthetic processor for a preset name (januskit.load('tiny-janus'))."""
    c = preset(preset_name)
    tok = synthetic_tokenizer(preset_name, c)
    return random_model(c, seed, dtype), Processor(tok, ImageTransform(size=c.vision.image_size), c.vision.n_tokens)


