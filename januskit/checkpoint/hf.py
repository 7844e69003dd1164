"""The HF transformers Janus layout (deepseek-community checkpoints) as a key table over ours.

Our modules use the official key names, so "official" is the native layout. This file holds the
one table between the two layouts and the two tensor transforms (SigLIP's fused qkv <-> q/k/v, and
pos_embed (1, N, C) <-> (N, C)), plus the config.json translation. The known-unused official entries
(attention-pool head, `codebook_used`) have no HF counterpart: conversion to HF keeps them, and the
official config.json text, in a side file HF ignores, so official -> hf -> official is bit-identical.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import (MAX_IMAGE_SIZE, MAX_LAYERS, MAX_VOCAB, AlignerConfig, ConfigError, Fields, GenHeadConfig,
                      JanusConfig, JanusFlowConfig, SigLIPConfig, VQConfig, check_janus)
from .official_config import (MAX_BLOCKS, MAX_MLP_RATIO, VIT_PRESETS, check_siglip, check_vq, detect_arch,
                              llama_from_hf, llama_to_hf, model_from_official, read_config_json)
from .io import CheckpointError

SIDE_FILE = "januskit-official-extras.safetensors"

# (official regex, HF template) applied in order; the first match wins.
_RULES: list[tuple[str, str]] = [
    (r"vision_model\.vision_tower\.patch_embed\.proj\.(weight|bias)", r"model.vision_model.embeddings.patch_embedding.\1"),
    (r"vision_model\.vision_tower\.blocks\.(\d+)\.norm1\.(\w+)", r"model.vision_model.encoder.layers.\1.layer_norm1.\2"),
    (r"vision_model\.vision_tower\.blocks\.(\d+)\.norm2\.(\w+)", r"model.vision_model.encoder.layers.\1.layer_norm2.\2"),
    (r"vision_model\.vision_tower\.blocks\.(\d+)\.attn\.proj\.(\w+)", r"model.vision_model.encoder.layers.\1.self_attn.projection_layer.\2"),
    (r"vision_model\.vision_tower\.blocks\.(\d+)\.mlp\.(fc\d)\.(\w+)", r"model.vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"vision_model\.vision_tower\.norm\.(\w+)", r"model.vision_model.post_layernorm.\1"),
    (r"gen_head\.output_mlp_projector\.(\w+)", r"model.generation_head.proj_out.\1"),
    (r"gen_head\.vision_head\.(\w+)", r"model.generation_head.vision_head.\1"),
    (r"gen_embed\.weight", r"model.generation_embeddings.weight"),
    (r"language_model\.lm_head\.weight", r"lm_head.weight"),
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
]
_VQ_RULES: list[tuple[str, str]] = [
    (r"encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block."),
    (r"encoder\.conv_blocks\.(\d+)\.", r"encoder.down.\1."),
    (r"decoder\.conv_blocks\.(\d+)\.res\.", r"decoder.up.\1.block."),
    (r"decoder\.conv_blocks\.(\d+)\.", r"decoder.up.\1."),
    (r"mid\.0\.", "mid.block_1."), (r"mid\.1\.", "mid.attn_1."), (r"mid\.2\.", "mid.block_2."),
]
_QKV = re.compile(r"vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_POS = "vision_model.vision_tower.pos_embed"
_HF_POS = "model.vision_model.embeddings.position_embedding.weight"


def is_unused_official(key: str) -> bool:
    """The known-unused entries of the official checkpoints (never executed by the reference)."""
    return (key.startswith(("vision_model.vision_tower.attn_pool.", "vision_und_enc_model.vision_tower.attn_pool."))
            or key == "gen_vision_model.quantize.codebook_used")


def _aligner_key(prefix: str, hf_prefix: str, key: str) -> str | None:
    m = re.fullmatch(rf"{prefix}\.layers\.(\d+)\.(\w+)", key)
    if not m:
        return None
    i = int(m.group(1))
    return f"{hf_prefix}.fc1.{m.group(2)}" if i == 0 else f"{hf_prefix}.hidden_layers.{i // 2 - 1}.{m.group(2)}"


def official_to_hf_key(key: str) -> str:
    """HF name of one official key (not for qkv, pos_embed or the unused entries)."""
    for prefix, hf in (("aligner", "model.aligner"), ("gen_aligner", "model.generation_aligner")):
        k = _aligner_key(prefix, hf, key)
        if k:
            return k
    if key.startswith("gen_vision_model."):
        k = key[len("gen_vision_model."):]
        for pat, rep in _VQ_RULES:
            k = re.sub(rf"^{pat}" if pat.startswith(("encoder", "decoder")) else pat, rep, k, count=1)
        return "model.vqmodel." + k
    for pat, rep in _RULES:
        if re.fullmatch(pat, key):
            return re.sub(pat, rep, key)
    raise KeyError(f"no HF name for official key {key!r}")


Plan = dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]]


def official_to_hf_plan(keys: list[str]) -> tuple[Plan, list[str]]:
    """{hf_key: (official source keys, fn(*tensors) -> tensor)} and the unused keys for the side file."""
    plan: Plan = {}
    extras = []
    for key in keys:
        if is_unused_official(key):
            extras.append(key)
        elif key == _POS:
            plan[_HF_POS] = ((key,), lambda t: t.reshape(t.shape[-2], t.shape[-1]))
        elif m := _QKV.fullmatch(key):
            base = f"model.vision_model.encoder.layers.{m.group(1)}.self_attn"
            for i, n in enumerate("qkv"):
                plan[f"{base}.{n}_proj.{m.group(2)}"] = ((key,), lambda t, i=i: t.chunk(3, dim=0)[i])
        else:
            plan[official_to_hf_key(key)] = ((key,), lambda t: t)
    return plan, extras


def hf_to_official_plan(hf_keys: list[str], official_keys: list[str]) -> Plan:
    """{official_key: (hf source keys, fn)} for every official key except the unused entries."""
    plan: Plan = {}
    for key in official_keys:
        if is_unused_official(key):
            continue
        if key == _POS:
            plan[key] = ((_HF_POS,), lambda t: t.unsqueeze(0))
        elif m := _QKV.fullmatch(key):
            base = f"model.vision_model.encoder.layers.{m.group(1)}.self_attn"
            plan[key] = (tuple(f"{base}.{n}_proj.{m.group(2)}" for n in "qkv"), lambda q, k, v: torch.cat([q, k, v], 0))
        else:
            plan[key] = ((official_to_hf_key(key),), lambda t: t)
    present = set(hf_keys)
    needed = {s for srcs, _ in plan.values() for s in srcs}
    missing = sorted(needed - present)
    unexpected = sorted(present - needed)
    if missing or unexpected:
        raise CheckpointError(f"HF-layout checkpoint does not match its config: missing keys ({len(missing)}) "
                              f"{missing[:10]}, unexpected keys ({len(unexpected)}) {unexpected[:10]}")
    return plan


# ---------------------------------------------------------------------------------------------
# config.json translation

def janus_to_hf_config(c: JanusConfig, image_token_id: int, pad_token_id: int | None = None,
                       bos_token_id: int | None = None, eos_token_id: int | None = None,
                       dtype: str = "bfloat16") -> dict[str, Any]:
    """HF `JanusConfig` dict for `c`. Raises ConfigError for what the HF classes cannot express: HF uses
    one `projection_dim` for the generation aligner width and the head's hidden width, ties the VQ grid
    to the SigLIP grid (`num_patches` = image_size // patch_size) and generates `num_image_tokens`
    (a vision field) image tokens."""
    if c.vq.norm != "group":
        raise ConfigError(f"HF Janus layout: the VQ's norm {c.vq.norm!r} (VQConfig.norm) has no HF counterpart: "
                          "HF's VQ normalises with GroupNorm only")
    if c.gen_head.image_token_embed != c.gen_aligner.n_embed:
        raise ConfigError(f"HF Janus layout: gen_head image_token_embed {c.gen_head.image_token_embed} must equal "
                          f"the gen_aligner width {c.gen_aligner.n_embed} (HF has one vq projection_dim)")
    if c.vq.grid != c.vision.image_size // c.vision.patch_size:
        raise ConfigError(f"HF Janus layout: the VQ grid {c.vq.grid} must equal the SigLIP grid "
                          f"{c.vision.image_size // c.vision.patch_size} (HF derives one from the other)")
    text = llama_to_hf(c.llm)
    text.pop("torch_dtype", None)
    text.update(tie_word_embeddings=False, pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    return {
        "model_type": "janus",
        "architectures": ["JanusForConditionalGeneration"],
        "image_token_id": image_token_id,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "text_config": text,
        "vision_config": dict(hidden_size=c.vision.width, num_hidden_layers=c.vision.depth,
                              num_attention_heads=c.vision.heads, image_size=c.vision.image_size,
                              patch_size=c.vision.patch_size, mlp_ratio=c.vision.mlp_ratio,
                              projection_dim=c.aligner.n_embed, depth=c.aligner.depth,
                              num_image_tokens=c.vq.n_tokens, hidden_act="gelu", layer_norm_eps=1e-6,
                              model_type="janus_vision_model"),
        "vq_config": dict(embed_dim=c.vq.codebook_dim, num_embeddings=c.vq.codebook_size,
                          base_channels=c.vq.ch, channel_multiplier=list(c.vq.ch_mult),
                          num_res_blocks=c.vq.num_res_blocks, latent_channels=c.vq.z_channels,
                          projection_dim=c.gen_head.image_token_embed, num_hidden_layers=c.gen_aligner.depth,
                          image_token_embed_dim=c.gen_head.n_embed, num_patches=c.vq.grid,
                          hidden_act="gelu", model_type="janus_vqgan"),
    }


def hf_generation_config(boi_token_id: int, pad_token_id: int | None, bos_token_id: int | None,
                         eos_token_id: int | None) -> dict[str, Any]:
    """generation_config.json for an HF-layout folder: HF's image-mode `generate` reads the
    <begin_of_image> id from `generation_kwargs` to build the unconditional CFG rows."""
    return {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
            "generation_kwargs": {"boi_token_id": boi_token_id}}


def _text_config(t: Fields) -> Fields:
    """transformers >= 5 saves RoPE as `rope_parameters` (no top-level rope_theta): fold it back."""
    rp = t.obj("rope_parameters", required=False)
    if (rt := rp.string("rope_type", "default")) != "default":
        rp.fail("rope_type", f"{rt!r} is not supported (no Janus model uses RoPE scaling)")
    if rp.has("rope_theta"):
        return Fields({**t.d, "rope_theta": rp.number("rope_theta", lo=1.0)}, t.file, t.prefix)
    return t


# Our field -> the HF config's, for the checks' messages.
_HF_VISION_NAMES = {"width": "hidden_size", "heads": "num_attention_heads", "patch_size": "patch_size",
                    "image_size": "image_size", "mlp_ratio": "mlp_ratio"}
_HF_VQ_NAMES = {"ch": "base_channels", "ch_mult": "channel_multiplier", "image_size": "num_patches"}
_HF_JANUS_NAMES = {"aligner_config.params.n_embed": "vision_config.projection_dim",
                   "gen_aligner_config.params.n_embed": "vq_config.projection_dim",
                   "gen_head_config.params.n_embed": "vq_config.image_token_embed_dim"}


def janus_from_hf_config(cfg: dict[str, Any], where: str = "config.json") -> JanusConfig:
    f = Fields(cfg, where)
    v, q, t = f.obj("vision_config"), f.obj("vq_config"), f.obj("text_config")
    for sub in (v, q):
        if (act := sub.string("hidden_act", "gelu")) != "gelu":
            sub.fail("hidden_act", f"{act!r} is not supported (Janus uses exact 'gelu')")
    if v.d.get("use_qk_norm"):
        v.fail("use_qk_norm", "is not supported (no Janus model uses it)")
    llm = llama_from_hf(_text_config(t))
    if (hd := t.integer("head_dim", None)) is not None and hd != llm.head_dim:
        t.fail("head_dim", f"{hd} != hidden_size / num_attention_heads = {llm.head_dim}")
    dims = dict(width=v.integer("hidden_size", 1024), layers=v.integer("num_hidden_layers", 24, hi=MAX_LAYERS),
                heads=v.integer("num_attention_heads", 16), patch_size=v.integer("patch_size", 16, hi=MAX_IMAGE_SIZE),
                mlp_ratio=v.number("mlp_ratio", 4.0, hi=MAX_MLP_RATIO))
    name = next((n for n, p in VIT_PRESETS.items() if p == dims), "januskit_vit")
    vision = SigLIPConfig(image_size=v.integer("image_size", 384, hi=MAX_IMAGE_SIZE), model_name=name, select_layer=-1,
                          **dims)
    check_siglip(vision, where, lambda k: v.name(_HF_VISION_NAMES[k]))
    ch_mult = q.integers("channel_multiplier", (1, 1, 2, 2, 4), hi=MAX_BLOCKS, max_len=8)
    # HF overwrites vq num_patches with the SigLIP grid; the VQ image side is that grid times the VQ factor.
    vq_size = (vision.image_size // vision.patch_size) * 2 ** (len(ch_mult) - 1)
    vq = VQConfig(codebook_size=q.integer("num_embeddings", 16384, hi=MAX_VOCAB), codebook_dim=q.integer("embed_dim", 8),
                  ch=q.integer("base_channels", 128), ch_mult=ch_mult, z_channels=q.integer("latent_channels", 256),
                  num_res_blocks=q.integer("num_res_blocks", 2, hi=MAX_BLOCKS), image_size=vq_size)
    check_vq(vq, where, lambda k: q.name(_HF_VQ_NAMES[k]))
    projection = q.integer("projection_dim", 2048)
    c = JanusConfig(
        llm=llm, vision=vision, vq=vq,
        aligner=AlignerConfig(input_dim=vision.width, n_embed=v.integer("projection_dim", 2048),
                              depth=v.integer("depth", 2, hi=MAX_BLOCKS)),
        gen_aligner=AlignerConfig(input_dim=vq.codebook_dim, n_embed=projection,
                                  depth=q.integer("num_hidden_layers", 2, hi=MAX_BLOCKS)),
        gen_head=GenHeadConfig(n_embed=q.integer("image_token_embed_dim", 2048), image_token_embed=projection,
                               image_token_size=vq.codebook_size))
    check_janus(c, where, _HF_JANUS_NAMES)
    return c


def read_model_config(folder: str | Path) -> tuple[str, JanusConfig | JanusFlowConfig]:
    """(arch, config) from a checkpoint folder's config.json, official or HF layout: the config is
    checked (types, bounds, geometry), and every refusal is a ConfigError naming config.json."""
    path = Path(folder) / "config.json"
    raw = read_config_json(path)
    arch = detect_arch(raw, str(path))
    return arch, janus_from_hf_config(raw, str(path)) if arch == "hf-janus" else model_from_official(raw, str(path))


def same_model(a: JanusConfig, b: JanusConfig) -> bool:
    """True when two configs build the same executed model (ignoring the ViT preset name and
    blocks that select_layer leaves unused), i.e. what survives a trip through the HF layout."""
    def norm(c: JanusConfig) -> JanusConfig:
        v = dataclasses.replace(c.vision, layers=c.vision.depth, select_layer=-1, model_name="")
        return dataclasses.replace(c, vision=v)
    return norm(a) == norm(b)
