"""Retrain a miniature model's image tokenizer on a folder of the user's images (`januskit train-tokenizer`):
the VQ tokenizer of a Janus / Janus-Pro folder (januskit.train.pretrain.vq.train_vq, from the folder's own
weights) or the VAE of a JanusFlow folder's vae/ (januskit.train.pretrain.vae.train_vae).

    images    every .png / .jpg / .jpeg under IMAGES_DIR (any size: short side resized to the model's generation
              image size, then centre-cropped, as generation training does), a few of them held out (never trained
              on) to measure reconstruction before and after
    output    OUT_DIR: a copy of MODEL_DIR where only the tokenizer's weights differ (same files, keys, dtypes;
              the other tensors byte for byte), written into a staging folder and renamed in one step. Like a
              training export (januskit.train.checkpoints.export_model) it leaves behind the source's run records
              (metrics.jsonl, plots, checkpoints/, ...) and the records of how the source was made and scored
              (eval.json, recipe.json, components.json), and writes provenance.json: the source (base_model,
              base_model_path, base_provenance) and under "image_tokenizer" what the tokenizer was trained on,
              the settings, and the reconstruction figures before and after on the held-out and the training
              images (PSNR, mean / worst absolute error in 0-255 units, and for a VQ the share of the codebook the
              images use).

After a VQ change the same image gets other codes, and after a VAE change other latents: the LLM's generation
side (image head and embeddings, trained on the old codes / latents) no longer matches, so generation is broken
until the model is fine-tuned on the new tokenizer (`januskit finetune`). Understanding (SigLIP) is unaffected.

Full-size checkpoints are refused unless forced: their VQ (LlamaGen's VQ-16) and VAE (SDXL's) were trained on
large general image sets and need no retraining for a new domain; fine-tune the model instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..checkpoint.io import atomic_folder, weight_files
from ..checkpoint.official import RUN_RECORDS, read_official_config
from ..config import folder_file
from ..models import count_params
from ..processing.image import to_gen_pixels
from .checkpoints import BASE_RECORDS, PROVENANCE, provenance
from .config import ModelSection

log = logging.getLogger("januskit.train.image_tokenizer")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VQ_PREFIX = "gen_vision_model."
REAL_PARAMS = 100_000_000  # above this a checkpoint is a full-size release, not a miniature model
# Not copied into the output: the records of the run that made the source, of how it was made and how it scored.
SKIP = (*RUN_RECORDS, *BASE_RECORDS, "checkpoints", "tensorboard")
FINETUNE_NOTE = ("the LLM's image generation was trained on the old {what}: it no longer matches the new tokenizer, "
                 "so fine-tune the model on captioned images before generating with it (januskit finetune {out} "
                 "--generation CAPTIONS.jsonl --out DIR; docs/data-format.md); understanding is unaffected")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetrainSettings:
    steps: int | None = None  # None: the pretrainer's default (VQ 500, VAE 600)
    batch_size: int | None = None  # None: the pretrainer's default, at most the number of training images
    lr: float | None = None  # None: the pretrainer's default peak LR
    held_out: int | None = None  # images kept out of training to measure on; None: a tenth, 1 to 8
    seed: int = 0
    force: bool = False  # retrain a full-size checkpoint's tokenizer too
    overwrite: bool = False  # replace a non-empty OUT_DIR


def list_images(folder: str | Path) -> list[Path]:
    """The .png / .jpg / .jpeg files under `folder` (recursive, hidden ones skipped), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'} (IMAGES_DIR "
                                "must be a folder of .png / .jpg images)")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files, recursively)")
    return files


def read_images(files: list[Path], size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]: each image's short side resized to `size`, centre-cropped; a file that
    cannot be decoded is named in the ValueError."""
    out = []
    for f in files:
        try:
            out.append(to_gen_pixels(f, size))  # the generation crop, as training takes images
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{f}: cannot read this image ({e})") from None
    return torch.stack(out)


def split_held_out(n: int, held_out: int | None, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded shuffle, the first `held_out` of it kept out."""
    if n < 2:
        raise ValueError(f"found {n} image; need at least 2 (one to train on, one held out to measure)")
    k = max(1, min(8, n // 10)) if held_out is None else held_out
    if not 1 <= k <= n - 1:
        raise ValueError(f"--held-out {k}: must be between 1 and {n - 1} for {n} images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def _fingerprint(files: list[Path], root: Path) -> str:
    """sha256 over the images' relative names and contents (which images, exactly)."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


# -- the VQ (Janus, Janus-Pro) ---------------------------------------------------------------------

def _safetensors(folder: Path) -> list[Path]:
    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no weight files (model.safetensors)")
    bad = [f for f in files if f.suffix != ".safetensors"]
    if bad:
        raise ValueError(f"{bad[0]}: PyTorch pickle weights; write a safetensors copy first (januskit convert)")
    return files


def _read_vq(folder: Path, c: Any) -> tuple[torch.nn.Module, dict[str, torch.dtype]]:
    """The folder's VQ in float32, and the stored dtype of each of its tensors (official keys)."""
    from safetensors import safe_open

    from ..checkpoint.hf import is_unused_official
    from ..models.vq import VQModel

    state, dtypes = {}, {}
    for f in _safetensors(folder):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k.startswith(VQ_PREFIX) and not is_unused_official(k):
                    t = h.get_tensor(k)
                    state[k[len(VQ_PREFIX):]], dtypes[k] = t.float(), t.dtype
    vq = VQModel(c.vq)
    missing, unexpected = vq.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: the VQ tensors do not match its config.json (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    return vq.eval(), dtypes


def _as_stored(module: torch.nn.Module, dtypes: dict[str, torch.dtype], prefix: str) -> dict[str, torch.Tensor]:
    """The module's tensors under their official keys, in the dtypes the source folder stores them in."""
    return {prefix + k: v.detach().to(dtypes[prefix + k]).contiguous() for k, v in module.state_dict().items()}


def _write_vq(src: Path, tmp: Path, new: dict[str, torch.Tensor]) -> list[str]:
    """Rewrite the weight files of `src` that hold VQ tensors into `tmp` with `new` in their place (every
    other tensor, the key order and the metadata as they were). Returns the names of the files written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    written = []
    for f in _safetensors(src):
        with safe_open(str(f), framework="pt") as h:
            keys = list(h.keys())
            if not any(k in new for k in keys):
                continue
            meta = h.metadata()
            tensors = {k: new[k] if k in new else h.get_tensor(k) for k in keys}
        save_file(tensors, str(tmp / f.name), metadata=meta)
        shutil.copymode(f, tmp / f.name)  # safetensors writes 0600; keep the source's mode
        written.append(f.name)
    return written


def _vq_stats(vq: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    from .pretrain.vq import reconstruction_stats

    return {k: round(v, 4) for k, v in reconstruction_stats(vq, images).items()}


# -- the VAE (JanusFlow) ---------------------------------------------------------------------------

def _vae_stats(vae: Any, images: torch.Tensor) -> dict[str, float]:
    from .pretrain.vae import reconstruction_stats

    return {k: round(v, 4) for k, v in reconstruction_stats(vae, images).items() if k != "per_image_max_255"}


def _stored_vae_dtype(folder: Path) -> torch.dtype:
    from safetensors import safe_open

    f = folder / "diffusion_pytorch_model.safetensors"
    if not f.is_file():
        return torch.float32
    with safe_open(str(f), framework="pt") as h:
        key = next(iter(h.keys()), None)
        return torch.float32 if key is None else h.get_tensor(key).dtype


# -- the command -----------------------------------------------------------------------------------

def _copy_rest(src: Path, tmp: Path, skip: set[str]) -> None:
    """Everything of `src` but `skip` (names at its top level) and hidden entries (staging folders), into `tmp`;
    refusing any path that resolves outside `src`."""
    for p in sorted(src.iterdir()):
        if p.name in skip or p.name.startswith("."):
            continue
        folder_file(src, p.name, ValueError)
        if p.is_dir():
            for q in p.rglob("*"):
                folder_file(src, q.relative_to(src), ValueError)
            shutil.copytree(p, tmp / p.name)
        else:
            shutil.copy2(p, tmp / p.name)


def retrain_image_tokenizer(images_dir: str | Path, model_dir: str | Path, out_dir: str | Path,
                            settings: RetrainSettings = RetrainSettings(), progress: bool = True) -> dict[str, Any]:
    """Train the image tokenizer of `model_dir` on the images of `images_dir` and write the model with it to
    `out_dir` (see the module docstring). Returns the record (provenance.json's "image_tokenizer")."""
    images_dir, src, out = Path(images_dir), Path(model_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a model folder (no config.json)")
    if out.resolve() == src.resolve():
        raise ValueError(f"OUT_DIR {out} is MODEL_DIR: write the retrained model to another folder")
    if out.exists() and any(out.iterdir()) and not settings.overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (choose another OUT_DIR, or --overwrite)")
    c = read_official_config(src)
    flow = c.arch == "janusflow"
    what = "VAE" if flow else "VQ tokenizer"
    params = count_params(c)
    if params > REAL_PARAMS and not settings.force:
        raise ValueError(f"{src} is a full-size checkpoint ({params / 1e9:.1f}B parameters): its {what} "
                         f"({'SDXL' if flow else 'LlamaGen VQ-16'}, trained on a large general image set) encodes any "
                         "images well and needs no retraining; fine-tune the model on your images instead (januskit "
                         "finetune). Pass --force to retrain it anyway")

    vae_dir = src / "vae"
    if flow:
        from ..checkpoint.vae import load_vae

        if not vae_dir.is_dir():
            raise FileNotFoundError(f"{src}: no vae/ folder; train-tokenizer retrains a JanusFlow folder's own VAE")
        model = load_vae(vae_dir, torch.float32).requires_grad_(True)
        size = c.latent_size * model.factor
        vae_dtype = _stored_vae_dtype(vae_dir)  # saved back in the dtype it came in
    else:
        model, dtypes = _read_vq(src, c)
        size = c.vq.image_size

    files = list_images(images_dir)
    pixels = read_images(files, size)
    train_idx, held_idx = split_held_out(len(files), settings.held_out, settings.seed)
    train_px, held_px = pixels[train_idx], pixels[held_idx]
    measure_train = train_px[:256]
    stats = _vae_stats if flow else _vq_stats
    before = {"held_out": stats(model, held_px), "train": stats(model, measure_train)}
    log.info("train-tokenizer: %d images (%d held out) at %d px; held-out PSNR before %.2f dB", len(files),
             len(held_idx), size, before["held_out"]["psnr"])

    if flow:
        from .pretrain.vae import VAETrainConfig as Config, train_vae as run
    else:
        from .pretrain.vq import VQTrainConfig as Config, train_vq as run
    base = Config()
    steps = settings.steps if settings.steps is not None else base.steps
    over: dict[str, Any] = {"steps": steps, "seed": settings.seed, "warmup": min(base.warmup, steps // 10),
                            "batch_size": min(settings.batch_size or base.batch_size, len(train_idx)),
                            "log_every": max(1, min(base.log_every, steps))}
    if settings.lr is not None:
        over["lr"] = settings.lr
    cfg = dataclasses.replace(base, **over)
    t0 = time.perf_counter()
    history = run(model, train_px, cfg, progress=progress)
    seconds = time.perf_counter() - t0

    with atomic_folder(out, overwrite=settings.overwrite) as tmp:
        if flow:
            from ..checkpoint.vae import save_vae

            _copy_rest(src, tmp, set(SKIP) | {"vae"})
            model.to(vae_dtype).requires_grad_(False)
            save_vae(model, tmp / "vae")
            model.float()
            written = ["vae/"]
        else:
            new = _as_stored(model, dtypes, VQ_PREFIX)
            model.load_state_dict({k[len(VQ_PREFIX):]: v.float() for k, v in new.items()})  # measure what is saved
            weights = {f.name for f in _safetensors(src)}
            written = _write_vq(src, tmp, new)
            _copy_rest(src, tmp, set(SKIP) | (set(written) & weights))
        after = {"held_out": stats(model, held_px), "train": stats(model, measure_train)}
        record = {
            "kind": "vae" if flow else "vq",  # the source: provenance.json's base_model
            "trained_on": {"folder": str(images_dir.resolve()), "images": len(files), "train": len(train_idx),
                           "held_out": [str(files[i].relative_to(images_dir)) for i in held_idx],
                           "image_size": size, "sha256": _fingerprint(files, images_dir)},
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
            "seconds": round(seconds, 1),
            "before": before, "after": after,
            "last": history[-1] if history else {},
            "files_changed": written,
            "next": FINETUNE_NOTE.format(what="latents" if flow else "codes", out=out),
        }
        prov = {**provenance(ModelSection(source=str(model_dir))), "image_tokenizer": record}
        (tmp / PROVENANCE).write_text(json.dumps(prov, indent=1, default=float) + "\n")
    log.info("train-tokenizer: held-out PSNR %.2f -> %.2f dB; written to %s", before["held_out"]["psnr"],
             after["held_out"]["psnr"], out)
    return record
