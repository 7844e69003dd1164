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

from .config import PRESET_NAMES, ConfigError, detect_arch, read_config_json
from .pipeline import ImageResult, JanusPipeline

__version__ = "0.1.0"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
    return DTYPES[dtype]


def load(path_or_preset: str | Path, dtype: str | torch.dtype = "float32", seed: int = 0) -> JanusPipeline:
    """Load a checkpoint folder (official or HF layout, detected from config.json), or build a preset
    with random weights (`seed`) and a synthetic tokenizer, for tests and benchmarks."""
    from .checkpoint.convert import load_hf_layout
    from .checkpoint.init import preset_pipeline_parts
    from .checkpoint.official import load_janus
    from .processing.chat import Processor

    dt = resolve_dtype(dtype)
    p = Path(path_or_preset)
    if p.is_dir():
        raw = read_config_json(p / "config.json")
        arch = detect_arch(raw, str(p / "config.json"))
        if arch == "janus":
            model = load_janus(p, dt)
        elif arch == "hf-janus":
            model = load_hf_layout(p, dt)
        else:
            raise ConfigError(f"{p}/config.json: JanusFlow checkpoints are not supported by this version yet")
        c = model.config
        return JanusPipeline(model, Processor.from_folder(p, c.vision.image_size, c.vision.n_tokens), p)
    if str(path_or_preset) in PRESET_NAMES:
        warnings.warn(f"{path_or_preset}: preset with RANDOM weights (seed {seed}); pass a checkpoint folder for a real model",
                      stacklevel=2)
        model, proc = preset_pipeline_parts(str(path_or_preset), seed, dt)
        return JanusPipeline(model, proc, f"preset:{path_or_preset}")
    raise FileNotFoundError(f"{path_or_preset}: no such checkpoint folder, and not a preset "
                            f"(presets: {', '.join(PRESET_NAMES)})")


__all__ = ["load", "JanusPipeline", "ImageResult", "PRESET_NAMES", "resolve_dtype", "__version__"]
