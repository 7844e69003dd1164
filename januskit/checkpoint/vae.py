"""A VAE folder in diffusers' layout (config.json + diffusion_pytorch_model.safetensors): checked
before diffusers sees it, so nothing can fall through to a hub download; loaded only from disk
(`local_files_only=True`); written atomically."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..config import folder_file
from ..models.vae import CLASS_NAME, LatentVAE, autoencoder_kl
from .io import atomic_folder

log = logging.getLogger("januskit.vae")

CONFIG_NAME = "config.json"
# What diffusers' from_pretrained can read, in its own order of preference (no variants).
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
FOLDER_HINT = ("pass --vae DIR with a diffusers AutoencoderKL folder (config.json + "
               "diffusion_pytorch_model.safetensors), e.g. stabilityai/sdxl-vae downloaded beforehand")


def read_vae_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json, after checking that the folder can be loaded as an AutoencoderKL
    without any download: FileNotFoundError (folder, config or weights missing) or ValueError
    (malformed JSON, not an AutoencoderKL config), each naming the path."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"VAE folder {folder} {what}: {FOLDER_HINT}")
    cfg_path = folder / CONFIG_NAME
    for name in (CONFIG_NAME, *WEIGHT_NAMES):  # what diffusers reads: never a file outside the folder
        if (folder / name).exists():
            folder_file(folder, name, ValueError)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"VAE folder {folder}: no {CONFIG_NAME} (not a diffusers model folder); {FOLDER_HINT}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"VAE config {cfg_path}: malformed JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"VAE config {cfg_path}: malformed, expected a JSON object, got {type(config).__name__}")
    cls = config.get("_class_name")
    if cls != CLASS_NAME:
        found = "no _class_name" if cls is None else f"_class_name {cls!r}"
        raise ValueError(f"VAE config {cfg_path}: not an {CLASS_NAME} config ({found}); {FOLDER_HINT}")
    if not any((folder / name).is_file() for name in WEIGHT_NAMES):
        present = sorted(p.name for p in folder.iterdir()) or ["nothing"]
        raise FileNotFoundError(f"VAE folder {folder}: weights missing, expected {WEIGHT_NAMES[0]} (or "
                                f"{', '.join(WEIGHT_NAMES[1:])}); found {', '.join(present)}")
    return config


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device | None = None) -> LatentVAE:
    """Load a diffusers AutoencoderKL folder (never downloads), frozen as JanusFlow uses it: eval
    mode and requires_grad False (call `.requires_grad_(True)` to train it further)."""
    read_vae_config(path)
    AutoencoderKL = autoencoder_kl()
    if dtype == torch.float16:
        log.warning("VAE in float16: the SDXL VAE is known to overflow in fp16; prefer bfloat16 or float32")
    vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    out = LatentVAE(vae).eval().requires_grad_(False)
    return out if device is None else out.to(device)


def save_vae(vae: LatentVAE, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the diffusers layout (config.json + diffusion_pytorch_model.safetensors) atomically:
    into a temporary sibling folder, renamed over `folder` only once complete. A non-empty
    `folder` is refused unless `overwrite`."""
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        vae.vae.save_pretrained(str(tmp), safe_serialization=True)
    return Path(folder)
