"""januskit: DeepSeek's Janus family (Janus, Janus-Pro, JanusFlow) in plain PyTorch.

    import januskit
    pipe = januskit.load("path/to/Janus-Pro-1B", dtype="bfloat16")
    print(pipe.chat("Describe this image.", images=["cat.png"]))
    pipe.generate_images("a red circle above a blue square", n=4, seed=0).images[0].save("out.png")
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .checkpoint.io import CheckpointError
from .checkpoint.official_config import apply_edit_settings, detect_arch, read_config_json, read_guidance_scale
from .config import PRESET_NAMES, folder_file, resolve_dtype
from .pipelines.base import ImageBatch, ImageResult, Pipeline, UnsupportedOption
from .pipelines.janus import JanusPipeline

__version__ = "0.1.0"

def load(path_or_preset: str | Path, dtype: str | torch.dtype = "float32", seed: int = 0,
         vae: str | Path | None = None, quantize: str | None = None, group_size: int = 128) -> Pipeline:
    """Load a checkpoint folder (official Janus / Janus-Pro / JanusFlow or HF layout, detected from
    config.json), or build a preset with random weights (`seed`) and a synthetic tokenizer, for tests
    and benchmarks. `vae`: JanusFlow's VAE folder (diffusers AutoencoderKL); default: the checkpoint's
    `vae/` subfolder when it has one (JanusFlow then chats, and generates latents only, without one).
    `quantize` "int8" | "int4" (`group_size` 32, 64, 128 or 256): the LLM and its heads in int8 / int4,
    quantised tensor by tensor while loading (januskit.quantization; docs/quantization.md). A folder
    written by `januskit quantize` loads quantised as it was written, with no float copy."""
    from .checkpoint.convert import load_hf_layout
    from .checkpoint.init import preset_pipeline_parts
    from .checkpoint.official import load_official
    from .processing.chat import Processor
    from .quantization import load_quantized, quantize_model

    dt = resolve_dtype(dtype)
    p = Path(path_or_preset)
    if p.is_dir():
        raw = read_config_json(p / "config.json")
        arch = detect_arch(raw, str(p / "config.json"))
        if quantize is not None or raw.get("quantization") is not None:
            model = load_quantized(p, dt, quantize, group_size)
        else:
            model = load_hf_layout(p, dt) if arch == "hf-janus" else load_official(p, dt)
        c = model.config
        proc = Processor.from_folder(p, c.vision.image_size, c.vision.n_tokens)
        if arch == "janusflow":
            if vae is None and (p / "vae").is_dir():
                vae = folder_file(p, "vae", CheckpointError)  # the folder's own VAE: never one linked from outside
            pipe = _flow_pipeline(model, proc, p, vae)
        elif vae is not None:
            raise ValueError(f"{p}: vae= is for JanusFlow checkpoints; this one is {arch}")
        else:
            pipe = JanusPipeline(model, proc, p)
        w = read_guidance_scale(p)
        if w is not None:  # the model's own CFG weight (the miniature models choose theirs on the val split)
            pipe.default_cfg_weight = w
        apply_edit_settings(proc, p, c)
        return pipe
    if str(path_or_preset) in PRESET_NAMES:
        warnings.warn(f"{path_or_preset}: preset with RANDOM weights (seed {seed}); pass a checkpoint folder for a real model",
                      stacklevel=2)
        model, proc = preset_pipeline_parts(str(path_or_preset), seed, dt)
        if quantize is not None:
            quantize_model(model, quantize, group_size)
        if model.config.arch == "janusflow":
            return _flow_pipeline(model, proc, f"preset:{path_or_preset}", vae)
        return JanusPipeline(model, proc, f"preset:{path_or_preset}")
    raise FileNotFoundError(f"{path_or_preset}: no such checkpoint folder, and not a preset "
                            f"(presets: {', '.join(PRESET_NAMES)})")


def _flow_pipeline(model, proc, source, vae_dir) -> Pipeline:
    from .pipelines.janusflow import JanusFlowPipeline

    vae = None
    if vae_dir is not None:
        from .checkpoint.vae import load_vae

        vae = load_vae(vae_dir)
    return JanusFlowPipeline(model, proc, source, vae)


__all__ = ["load", "Pipeline", "JanusPipeline", "ImageResult", "ImageBatch", "UnsupportedOption", "PRESET_NAMES",
           "resolve_dtype", "__version__"]
