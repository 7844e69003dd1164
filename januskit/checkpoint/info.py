"""`januskit info`: what a checkpoint folder (or preset) holds, read from its files without loading weights."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..config import JanusConfig, JanusFlowConfig, PRESET_NAMES, folder_file, preset
from .hf import read_model_config
from .io import iter_tensors, weight_files
from .official_config import read_config_json
from .vae import read_vae_config


def _generation(c: JanusConfig | JanusFlowConfig) -> dict[str, str]:
    if isinstance(c, JanusFlowConfig):
        e, d = c.gen_enc, c.gen_dec
        latent = "x".join(map(str, c.latent_shape))
        return {"generation_latent": f"VAE latent {latent} -> {c.n_gen_tokens} tokens",
                "generation_encoder": f"ShallowUViT: patchify {e.kernel_size}/{e.stride}, width {e.width}, "
                                      f"{e.layers_in_middle} ConvNeXt blocks",
                "generation_decoder": f"ShallowUViT: width {d.in_channels}, {d.layers_in_middle} ConvNeXt blocks, "
                                      f"{d.upsamples} unpatchify -> {d.out_channels} latent channels"}
    return {"generation_tokenizer": f"VQ: {c.vq.codebook_size} codes x {c.vq.codebook_dim}, factor {c.vq.factor}, "
                                    f"{c.vq.image_size}px -> {c.vq.n_tokens} tokens"}


def _summary(c: JanusConfig | JanusFlowConfig) -> dict[str, Any]:
    match = [n for n in PRESET_NAMES if preset(n) == c]
    return {
        "preset": "/".join(match) if match else "custom",
        "llm": f"{c.llm.n_layers} layers, dim {c.llm.dim}, {c.llm.n_heads} heads ({c.llm.kv_heads} kv), "
               f"ffn {c.llm.intermediate_size}, vocab {c.llm.vocab_size}, context {c.llm.max_seq_len}",
        "understanding_encoder": f"SigLIP {c.vision.model_name}: {c.vision.depth} blocks, width {c.vision.width}, "
                                 f"{c.vision.image_size}px -> {c.vision.n_tokens} tokens",
        **_generation(c),
    }


def _vae(folder: Path) -> str:
    """JanusFlow's latent space: the checkpoint's vae/ subfolder (diffusers AutoencoderKL), if any."""
    if not folder.exists():
        return "none in the folder (load with --vae DIR)"
    try:
        c = read_vae_config(folder)
    except (FileNotFoundError, ValueError) as e:
        return f"unusable: {e}"
    return (f"AutoencoderKL in {folder.name}/: {c.get('latent_channels', 4)} latent channels, "
            f"factor {2 ** (len(c.get('block_out_channels', (0,))) - 1)}, scaling {c.get('scaling_factor')}")


def describe(model: str | Path) -> dict[str, Any]:
    p = Path(model)
    if not p.is_dir():
        if str(model) in PRESET_NAMES:
            c = preset(str(model))
            return {"source": f"preset:{model}", "layout": "preset (random weights)", "arch": c.arch, **_summary(c)}
        raise FileNotFoundError(f"{model}: no such checkpoint folder, and not a preset")
    arch, c = read_model_config(p)
    info: dict[str, Any] = {"source": str(p), "layout": "hf" if arch == "hf-janus" else "official", "arch": arch,
                            **_summary(c)}
    if arch == "janusflow":
        info["vae"] = _vae(p / "vae")
    quant = read_config_json(p / "config.json").get("quantization")  # januskit.quantization's folders
    if isinstance(quant, dict):
        info["quantization"] = {k: quant.get(k) for k in ("method", "bits", "group_size")} | {
            "layers": len(quant.get("modules") or []), "kept_in_float": len(quant.get("kept_in_float") or {})}
    files = weight_files(p)
    info["weight_files"] = ", ".join(f"{f.name} ({f.stat().st_size / 1e6:.1f} MB)" for f in files)
    counts: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    n_tensors = 0
    for key, load, shape, f in iter_tensors(files, integer=lambda k: quant is not None and k.endswith(".qweight")):
        n = 1
        for s in shape:
            n *= s
        part = key.split(".")[0] if arch != "hf-janus" else ".".join(key.split(".")[:2])
        counts[part] += n
        n_tensors += 1
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as h:
                dtypes[str(h.get_slice(key).get_dtype())] += 1
    info["tensors"] = n_tensors
    info["parameters_millions"] = {k: round(v / 1e6, 2) for k, v in sorted(counts.items())}  # stored elements
    if dtypes:
        info["dtypes"] = dict(dtypes)
    tok = p / "tokenizer.json"
    if tok.is_file():
        from ..processing.tokenizer import TextTokenizer
        t = TextTokenizer.from_file(folder_file(p, tok.name))
        names = {"bos": "bos_id", "eos": "eos_id", "pad": "pad_id", "image": "image_id", "boi": "boi_id", "eoi": "eoi_id"}
        ids = {}
        for k, attr in names.items():
            try:
                ids[k] = getattr(t, attr)
            except KeyError:
                ids[k] = None
        info["tokenizer"] = {"format": "Janus-Pro (<|User|>)" if t.is_pro_format else "Janus-1.3B (User)", **ids}
    return info
