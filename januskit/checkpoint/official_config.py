"""The official `config.json` <-> our config dataclasses.

The official `config.json` (model_type "multi_modality") is partial: `language_config` takes
transformers' LlamaConfig defaults for every field it omits, the SigLIP size comes from the timm
model name, and `gen_vision_config.params` are ignored by the reference (VQ-16 defaults are used).
We read the same files the same way, and accept a few extra `params` so tiny models can be described
in the same schema (the reference would ignore them; real checkpoints never carry them).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import (AlignerConfig, ConfigError, GenHeadConfig, JanusConfig, JanusFlowConfig, LlamaConfig,
                      SigLIPConfig, UViTDecoderConfig, UViTEncoderConfig, VQConfig, check_flow, check_janus)

# LlamaConfig defaults the reference inherits for any field `language_config` omits.
_HF_LLAMA_DEFAULTS = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=None, vocab_size=32000,
                          max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0)

# timm presets the reference knows by name (width, depth, heads, patch, mlp_ratio).
VIT_PRESETS = {"siglip_large_patch16_384": dict(width=1024, layers=24, heads=16, patch_size=16, mlp_ratio=4.0)}


def _need(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing field {key!r}")
    return d[key]


def llama_from_hf(lc: dict[str, Any]) -> LlamaConfig:
    v = {**_HF_LLAMA_DEFAULTS, **{k: lc[k] for k in _HF_LLAMA_DEFAULTS if k in lc and lc[k] is not None}}
    rope_scaling = lc.get("rope_scaling")
    if rope_scaling:
        raise ConfigError(f"language_config: rope_scaling {rope_scaling!r} is not supported (no Janus model uses it)")
    if lc.get("attention_bias") or lc.get("mlp_bias"):
        raise ConfigError("language_config: attention_bias / mlp_bias are not supported (no Janus model uses them)")
    return LlamaConfig(dim=v["hidden_size"], n_layers=v["num_hidden_layers"], n_heads=v["num_attention_heads"],
                       n_kv_heads=v["num_key_value_heads"] or v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                       vocab_size=v["vocab_size"], max_seq_len=v["max_position_embeddings"],
                       norm_eps=float(v["rms_norm_eps"]), rope_theta=float(v["rope_theta"]))


def llama_to_hf(c: LlamaConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    return dict(model_type="llama", hidden_size=c.dim, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
                vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, hidden_act="silu", torch_dtype=dtype)


def vision_from_official(vc: dict[str, Any], where: str) -> SigLIPConfig:
    """SigLIP config from an official CLIPVisionTower config block (Janus `vision_config`, JanusFlow
    `vision_und_enc_config`)."""
    vp = dict(vc.get("params", {}))
    if "CLIPVisionTower" not in vc.get("cls", ""):
        raise ConfigError(f"{where}.cls {vc.get('cls')!r} is not CLIPVisionTower")
    name = vp.get("model_name", "siglip_large_patch16_384")
    vit = dict(VIT_PRESETS.get(name, {}))
    for k in ("width", "layers", "heads", "patch_size", "mlp_ratio"):  # januskit extension (tiny models)
        if k in vp:
            vit[k] = vp[k]
    missing = [k for k in ("width", "layers", "heads", "patch_size") if k not in vit]
    if missing:
        raise ConfigError(f"{where}.params.model_name {name!r} is unknown and params lack {missing}")
    if vp.get("select_feature", "same") != "same":
        raise ConfigError(f"{where}.params.select_feature {vp['select_feature']!r} is not supported")
    return SigLIPConfig(image_size=int(vp.get("image_size", 384)), select_layer=int(vp.get("select_layer", -1)),
                        model_name=name, **vit)


def vision_to_official(v: SigLIPConfig) -> dict[str, Any]:
    vp: dict[str, Any] = dict(image_size=v.image_size, model_name=v.model_name, select_feature="same",
                              select_layer=v.select_layer)
    if v.model_name not in VIT_PRESETS:
        vp.update(width=v.width, layers=v.layers, heads=v.heads, patch_size=v.patch_size, mlp_ratio=v.mlp_ratio)
    return dict(cls="CLIPVisionTower", model_type="vision", params=vp)


def janus_from_official(cfg: dict[str, Any], where: str = "config.json") -> JanusConfig:
    """Parse an official Janus / Janus-Pro config.json (already loaded as a dict)."""
    vision = vision_from_official(_need(cfg, "vision_config", where), f"{where}: vision_config")

    gvc = _need(cfg, "gen_vision_config", where)
    if "VQ" not in gvc.get("cls", ""):
        raise ConfigError(f"{where}: gen_vision_config.cls {gvc.get('cls')!r} is not a VQ tokenizer")
    gp = gvc.get("params", {})
    # The reference builds VQ-16 with its defaults whatever params say; only image_token_size and
    # n_embed size gen_embed (and they equal the defaults in every real checkpoint).
    vq = VQConfig(codebook_size=int(gp.get("image_token_size", 16384)), codebook_dim=int(gp.get("n_embed", 8)),
                  ch=int(gp.get("ch", 128)), ch_mult=tuple(gp.get("ch_mult", (1, 1, 2, 2, 4))),
                  z_channels=int(gp.get("z_channels", 256)), num_res_blocks=int(gp.get("num_res_blocks", 2)),
                  image_size=int(gp.get("image_size", vision.image_size)))

    llm = llama_from_hf(_need(cfg, "language_config", where))

    def aligner(key: str) -> AlignerConfig:
        p = _need(_need(cfg, key, where), "params", f"{where}: {key}")
        if p.get("projector_type", "mlp_gelu") != "mlp_gelu":
            raise ConfigError(f"{where}: {key}.params.projector_type {p['projector_type']!r} is not supported "
                              "(every released checkpoint uses mlp_gelu)")
        return AlignerConfig(input_dim=int(p["input_dim"]), n_embed=int(p["n_embed"]), depth=int(p.get("depth", 2)))

    hp = _need(_need(cfg, "gen_head_config", where), "params", f"{where}: gen_head_config")
    head = GenHeadConfig(n_embed=int(hp["n_embed"]), image_token_embed=int(hp["image_token_embed"]),
                         image_token_size=int(hp["image_token_size"]))
    c = JanusConfig(llm=llm, vision=vision, vq=vq, aligner=aligner("aligner_config"),
                    gen_aligner=aligner("gen_aligner_config"), gen_head=head)
    check_janus(c, where)
    return c


def janus_to_official(c: JanusConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    gp: dict[str, Any] = dict(image_token_size=c.vq.codebook_size, n_embed=c.vq.codebook_dim)
    if c.vq != VQConfig(codebook_size=c.vq.codebook_size, codebook_dim=c.vq.codebook_dim, image_size=c.vq.image_size) \
            or c.vq.image_size != c.vision.image_size:
        gp.update(ch=c.vq.ch, ch_mult=list(c.vq.ch_mult), z_channels=c.vq.z_channels,
                  num_res_blocks=c.vq.num_res_blocks, image_size=c.vq.image_size)

    def aligner(a: AlignerConfig, model_type: str) -> dict[str, Any]:
        return dict(cls="MlpProjector", model_type=model_type,
                    params=dict(depth=a.depth, input_dim=a.input_dim, n_embed=a.n_embed, projector_type=a.projector_type))

    return {
        "aligner_config": aligner(c.aligner, "aligner"),
        "architectures": ["MultiModalityCausalLM"],
        "gen_aligner_config": aligner(c.gen_aligner, "gen_aligner"),
        "gen_head_config": dict(cls="vision_head", model_type="gen_head",
                                params=dict(image_token_embed=c.gen_head.image_token_embed,
                                            image_token_size=c.gen_head.image_token_size,
                                            n_embed=c.gen_head.n_embed)),
        "gen_vision_config": dict(cls="VQ-16", model_type="gen_vision", params=gp),
        "language_config": llama_to_hf(c.llm, dtype),
        "model_type": "multi_modality",
        "torch_dtype": dtype,
        "vision_config": vision_to_official(c.vision),
    }


def _uvit_params(block: dict[str, Any], cls_name: str, dataclass_: type, where: str) -> Any:
    if block.get("cls") != cls_name:
        raise ConfigError(f"{where}.cls {block.get('cls')!r} is not {cls_name}")
    p = dict(block.get("params", {}))
    known = {f.name for f in dataclasses.fields(dataclass_)}
    kw = {}
    for k, v in p.items():
        if k in known:  # the reference ignores the rest (elementwize_affine [sic], num_extra_tensors, ...)
            kw[k] = tuple(int(x) for x in v) if k == "block_out_channels" else v
    try:
        return dataclass_(**kw)
    except TypeError as e:
        raise ConfigError(f"{where}.params: {e}") from e


def flow_from_official(cfg: dict[str, Any], where: str = "config.json") -> JanusFlowConfig:
    """Parse an official JanusFlow config.json. `latent_size` is a januskit extension in
    vision_gen_enc_config.params (the reference hard-codes 48 = 384 / 8)."""
    vision = vision_from_official(_need(cfg, "vision_und_enc_config", where), f"{where}: vision_und_enc_config")
    enc_block = _need(cfg, "vision_gen_enc_config", where)
    enc = _uvit_params(enc_block, "ShallowUViTEncoder", UViTEncoderConfig, f"{where}: vision_gen_enc_config")
    dec = _uvit_params(_need(cfg, "vision_gen_dec_config", where), "ShallowUViTDecoder", UViTDecoderConfig,
                       f"{where}: vision_gen_dec_config")
    llm = llama_from_hf(_need(cfg, "language_config", where))
    latent = int(enc_block.get("params", {}).get("latent_size", 48))
    c = JanusFlowConfig(llm=llm, vision=vision, gen_enc=enc, gen_dec=dec, latent_size=latent)
    check_flow(c, where)
    return c


def flow_to_official(c: JanusFlowConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    e, d = c.gen_enc, c.gen_dec
    ep = dict(input_channels=e.input_channels, block_out_channels=list(e.block_out_channels),
              kernel_size=e.kernel_size, stride=e.stride, padding=e.padding, layers_in_middle=e.layers_in_middle,
              hidden_size=e.hidden_size, norm_eps=e.norm_eps, use_bias=e.use_bias, use_mid_block=e.use_mid_block,
              elementwize_affine=True, num_extra_tensors=5)  # the two ignored keys, as the official file has them
    if c.latent_size != 48:
        ep["latent_size"] = c.latent_size
    dp = dict(in_channels=d.in_channels, out_channels=d.out_channels, block_out_channels=list(d.block_out_channels),
              upsamples=d.upsamples, layers_in_middle=d.layers_in_middle, hidden_size=d.hidden_size,
              norm_eps=d.norm_eps, elementwise_affine=True, use_bias=d.use_bias, use_mid_block=d.use_mid_block)
    return {
        "architectures": ["MultiModalityCausalLM"],
        "language_config": llama_to_hf(c.llm, dtype),
        "model_type": "multi_modality",
        "torch_dtype": dtype,
        "vision_gen_dec_config": dict(cls="ShallowUViTDecoder", model_type="gen_decoder", params=dp),
        "vision_gen_enc_config": dict(cls="ShallowUViTEncoder", model_type="gen_encoder", params=ep),
        "vision_und_enc_config": vision_to_official(c.vision),
    }


def model_from_official(cfg: dict[str, Any], where: str = "config.json") -> JanusConfig | JanusFlowConfig:
    """Janus or JanusFlow config from an official config.json dict (detected from its schema)."""
    arch = detect_arch(cfg, where)
    if arch == "janus":
        return janus_from_official(cfg, where)
    if arch == "janusflow":
        return flow_from_official(cfg, where)
    raise ConfigError(f"{where}: architecture {arch!r} is not an official layout")


def detect_arch(cfg: dict[str, Any], where: str = "config.json") -> str:
    """'janus', 'janusflow' or 'hf-janus' from a config.json dict; anything else raises."""
    mt = cfg.get("model_type")
    if mt == "multi_modality":
        if "vision_gen_enc_config" in cfg:
            return "janusflow"
        if "gen_vision_config" in cfg:
            return "janus"
        raise ConfigError(f"{where}: model_type 'multi_modality' but neither gen_vision_config (Janus) "
                          "nor vision_gen_enc_config (JanusFlow) is present")
    if mt == "janus":
        return "hf-janus"
    raise ConfigError(f"{where}: unknown architecture: model_type {mt!r} (expected 'multi_modality' for the "
                      "official Janus / Janus-Pro / JanusFlow layout, or 'janus' for the HF transformers layout)")


def read_config_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


#END


def to_official(c: JanusConfig | JanusFlowConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """Official config.json of either family; `dtype` is the weights' dtype name (torch_dtype)."""
    return flow_to_official(c, dtype) if c.arch == "janusflow" else janus_to_official(c, dtype)


def read_guidance_scale(folder: str | Path) -> float | None:
    """The folder's own CFG weight: `guidance_scale` in its generation_config.json (the transformers
    convention), or None when it states none (the pipeline then uses the reference's weight)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        w = json.loads(path.read_text()).get("guidance_scale")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a JSON object ({e})") from None
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 <= w < float("inf")):
        raise ConfigError(f"{path}: guidance_scale must be a number >= 0, got {w!r}")
    return float(w)
