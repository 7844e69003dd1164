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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import (MAX_DIM, MAX_IMAGE_SIZE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, VQ_NORMS, AlignerConfig,
                      ConfigError, Fields, GenHeadConfig, JanusConfig, JanusFlowConfig, LlamaConfig, SigLIPConfig,
                      UViTDecoderConfig, UViTEncoderConfig, VQConfig, check_flow, check_janus, read_json_object,
                      shown)
from .io import CheckpointError, is_staging

# LlamaConfig defaults the reference inherits for any field `language_config` omits.
_HF_LLAMA_DEFAULTS = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=None, vocab_size=32000,
                          max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0)

# timm presets the reference knows by name (width, depth, heads, patch, mlp_ratio).
VIT_PRESETS = {"siglip_large_patch16_384": dict(width=1024, layers=24, heads=16, patch_size=16, mlp_ratio=4.0)}
MAX_MLP_RATIO = 64.0
MAX_BLOCKS = 64  # aligner depth, VQ res blocks, entries of ch_mult: a handful in every real model


def llama_from_hf(lc: Fields) -> LlamaConfig:
    """Our LlamaConfig from an HF LlamaConfig block (official `language_config`, HF `text_config`)."""
    for k in ("rope_scaling", "attention_bias", "mlp_bias"):
        if lc.d.get(k):
            lc.fail(k, f"= {shown(lc.d[k])} is not supported (no Janus model uses it)")
    d = _HF_LLAMA_DEFAULTS
    dim = lc.integer("hidden_size", d["hidden_size"])
    heads = lc.integer("num_attention_heads", d["num_attention_heads"])
    kv = lc.integer("num_key_value_heads", heads)
    # The head geometry, checked here: the tensor shapes would report it only as a confusing mismatch.
    if dim % heads:
        lc.fail("num_attention_heads", f"{heads} does not divide hidden_size {dim}")
    if dim // heads % 2:
        lc.fail("num_attention_heads", f"{heads} gives an odd head_dim {dim // heads} (RoPE rotates channel pairs)")
    if heads % kv:
        lc.fail("num_key_value_heads", f"{kv} does not divide num_attention_heads {heads}")
    return LlamaConfig(dim=dim, n_layers=lc.integer("num_hidden_layers", d["num_hidden_layers"], hi=MAX_LAYERS),
                       n_heads=heads, n_kv_heads=kv, intermediate_size=lc.integer("intermediate_size", d["intermediate_size"]),
                       vocab_size=lc.integer("vocab_size", d["vocab_size"], hi=MAX_VOCAB),
                       max_seq_len=lc.integer("max_position_embeddings", d["max_position_embeddings"], hi=MAX_POSITIONS),
                       norm_eps=lc.number("rms_norm_eps", d["rms_norm_eps"], hi=1.0),
                       rope_theta=lc.number("rope_theta", d["rope_theta"], lo=1.0))


def check_siglip(v: SigLIPConfig, file: str, name: Callable[[str], str]) -> None:
    """SigLIP geometry the shapes would report only as a mismatch; `name` gives a field's name in the file."""
    if v.width % v.heads:
        raise ConfigError(f"{file}: {name('heads')} {v.heads} does not divide {name('width')} {v.width}")
    if v.patch_size > v.image_size:
        raise ConfigError(f"{file}: {name('patch_size')} {v.patch_size} is larger than {name('image_size')} {v.image_size}")
    if int(v.width * v.mlp_ratio) < 1:
        raise ConfigError(f"{file}: {name('mlp_ratio')} {v.mlp_ratio} gives an MLP of width 0")


def check_vq(q: VQConfig, file: str, name: Callable[[str], str]) -> None:
    if q.norm not in VQ_NORMS:
        raise ConfigError(f"{file}: {name('norm')} {q.norm!r} is not one of {', '.join(VQ_NORMS)}")
    if q.ch % 32:  # models/vq.py normalises every level with GroupNorm(32)
        raise ConfigError(f"{file}: {name('ch')} {q.ch} is not a multiple of 32 (the VQ's GroupNorm groups)")
    if q.image_size % q.factor:
        raise ConfigError(f"{file}: {name('image_size')} {q.image_size} is not a multiple of the VQ downsampling "
                          f"factor {q.factor} (from {name('ch_mult')})")


def llama_to_hf(c: LlamaConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    return dict(model_type="llama", hidden_size=c.dim, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
                vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, hidden_act="silu", torch_dtype=dtype)


def vision_from_official(vc: Fields) -> SigLIPConfig:
    """SigLIP config from an official CLIPVisionTower config block (Janus `vision_config`, JanusFlow
    `vision_und_enc_config`)."""
    cls = vc.string("cls", "")
    if "CLIPVisionTower" not in cls:
        vc.fail("cls", f"{cls!r} is not CLIPVisionTower")
    vp = vc.obj("params", required=False)
    name = vp.string("model_name", "siglip_large_patch16_384")
    vit: dict[str, Any] = dict(VIT_PRESETS.get(name, {}))
    for k, hi in (("width", MAX_DIM), ("layers", MAX_LAYERS), ("heads", MAX_DIM), ("patch_size", MAX_IMAGE_SIZE)):
        if vp.has(k):  # januskit extension (tiny models)
            vit[k] = vp.integer(k, hi=hi)
    if vp.has("mlp_ratio"):
        vit["mlp_ratio"] = vp.number("mlp_ratio", hi=MAX_MLP_RATIO)
    missing = [k for k in ("width", "layers", "heads", "patch_size") if k not in vit]
    if missing:
        vp.fail("model_name", f"{name!r} is unknown and params lack {missing}")
    if (sf := vp.string("select_feature", "same")) != "same":
        vp.fail("select_feature", f"{sf!r} is not supported")
    v = SigLIPConfig(image_size=vp.integer("image_size", 384, hi=MAX_IMAGE_SIZE), model_name=name,
                     select_layer=vp.integer("select_layer", -1, lo=-vit["layers"], hi=vit["layers"]), **vit)
    check_siglip(v, vp.file, vp.name)
    return v


def vision_to_official(v: SigLIPConfig) -> dict[str, Any]:
    vp: dict[str, Any] = dict(image_size=v.image_size, model_name=v.model_name, select_feature="same",
                              select_layer=v.select_layer)
    if v.model_name not in VIT_PRESETS:
        vp.update(width=v.width, layers=v.layers, heads=v.heads, patch_size=v.patch_size, mlp_ratio=v.mlp_ratio)
    return dict(cls="CLIPVisionTower", model_type="vision", params=vp)


def janus_from_official(cfg: dict[str, Any], where: str = "config.json") -> JanusConfig:
    """Parse an official Janus / Janus-Pro config.json (already loaded as a dict); `where` names the file."""
    f = Fields(cfg, where)
    vision = vision_from_official(f.obj("vision_config"))

    gvc = f.obj("gen_vision_config")
    if "VQ" not in (cls := gvc.string("cls", "")):
        gvc.fail("cls", f"{cls!r} is not a VQ tokenizer")
    gp = gvc.obj("params", required=False)
    # The reference builds VQ-16 with its defaults whatever params say; only image_token_size and
    # n_embed size gen_embed (and they equal the defaults in every real checkpoint).
    vq = VQConfig(codebook_size=gp.integer("image_token_size", 16384, hi=MAX_VOCAB),
                  codebook_dim=gp.integer("n_embed", 8), ch=gp.integer("ch", 128),
                  ch_mult=gp.integers("ch_mult", (1, 1, 2, 2, 4), hi=MAX_BLOCKS, max_len=8),
                  z_channels=gp.integer("z_channels", 256), num_res_blocks=gp.integer("num_res_blocks", 2, hi=MAX_BLOCKS),
                  image_size=gp.integer("image_size", vision.image_size, hi=MAX_IMAGE_SIZE),
                  norm=gp.string("norm", "group"))
    check_vq(vq, gp.file, gp.name)

    llm = llama_from_hf(f.obj("language_config"))

    def aligner(key: str) -> AlignerConfig:
        p = f.obj(key).obj("params")
        if (pt := p.string("projector_type", "mlp_gelu")) != "mlp_gelu":
            p.fail("projector_type", f"{pt!r} is not supported (every released checkpoint uses mlp_gelu)")
        return AlignerConfig(input_dim=p.integer("input_dim"), n_embed=p.integer("n_embed"),
                             depth=p.integer("depth", 2, hi=MAX_BLOCKS))

    hp = f.obj("gen_head_config").obj("params")
    head = GenHeadConfig(n_embed=hp.integer("n_embed"), image_token_embed=hp.integer("image_token_embed"),
                         image_token_size=hp.integer("image_token_size", hi=MAX_VOCAB))
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
    if c.vq.norm != "group":  # written only when set: every official config stays as it was
        gp["norm"] = c.vq.norm

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


# (lo, hi) of the ShallowUViT integer params that are not widths (those are in [1, MAX_DIM]).
_UVIT_INT_BOUNDS = {"padding": (0, 64), "kernel_size": (1, 64), "stride": (1, 64), "upsamples": (1, 8),
                    "layers_in_middle": (0, MAX_LAYERS)}


def _uvit_params(block: Fields, cls_name: str, dataclass_: type) -> Any:
    if (cls := block.string("cls", "")) != cls_name:
        block.fail("cls", f"{cls!r} is not {cls_name}")
    p = block.obj("params", required=False)
    kw: dict[str, Any] = {}
    for fd in dataclasses.fields(dataclass_):  # the reference ignores the rest (elementwize_affine [sic], ...)
        if not p.has(fd.name):
            continue
        default = fd.default  # every field has a plain default; its type is the field's type
        if isinstance(default, bool):
            kw[fd.name] = p.flag(fd.name)
        elif isinstance(default, int):
            lo, hi = _UVIT_INT_BOUNDS.get(fd.name, (1, MAX_DIM))
            kw[fd.name] = p.integer(fd.name, lo=lo, hi=hi)
        elif isinstance(default, float):  # norm_eps
            kw[fd.name] = p.number(fd.name, hi=1.0)
        else:  # block_out_channels
            kw[fd.name] = p.integers(fd.name, max_len=8)
    return dataclass_(**kw)


def flow_from_official(cfg: dict[str, Any], where: str = "config.json") -> JanusFlowConfig:
    """Parse an official JanusFlow config.json. `latent_size` is a januskit extension in
    vision_gen_enc_config.params (the reference hard-codes 48 = 384 / 8)."""
    f = Fields(cfg, where)
    vision = vision_from_official(f.obj("vision_und_enc_config"))
    enc_block = f.obj("vision_gen_enc_config")
    enc = _uvit_params(enc_block, "ShallowUViTEncoder", UViTEncoderConfig)
    dec = _uvit_params(f.obj("vision_gen_dec_config"), "ShallowUViTDecoder", UViTDecoderConfig)
    llm = llama_from_hf(f.obj("language_config"))
    latent = enc_block.obj("params", required=False).integer("latent_size", 48, hi=MAX_IMAGE_SIZE)
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
    mt = Fields(cfg, where).d.get("model_type")
    if mt == "multi_modality":
        if "vision_gen_enc_config" in cfg:
            return "janusflow"
        if "gen_vision_config" in cfg:
            return "janus"
        raise ConfigError(f"{where}: model_type 'multi_modality' but neither gen_vision_config (Janus) "
                          "nor vision_gen_enc_config (JanusFlow) is present")
    if mt == "janus":
        return "hf-janus"
    raise ConfigError(f"{where}: unknown architecture: model_type {repr(mt)[:60]} (expected "
                      "'multi_modality' for the official Janus / Janus-Pro / JanusFlow layout, or 'janus' for the HF "
                      "transformers layout)")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """A checkpoint folder's config.json as a dict: refused (naming the file) when it is missing, lies
    outside the folder, is not a UTF-8 JSON object, or the folder is an unfinished atomic_folder write."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found")
    if is_staging(path.parent):
        raise CheckpointError(f"{path.parent}: a staging folder of an unfinished (or ongoing) januskit write, "
                              "not a checkpoint; load the destination folder instead")
    return read_json_object(path)


def to_official(c: JanusConfig | JanusFlowConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """Official config.json of either family; `dtype` is the weights' dtype name (torch_dtype)."""
    return flow_to_official(c, dtype) if c.arch == "janusflow" else janus_to_official(c, dtype)


def read_guidance_scale(folder: str | Path) -> float | None:
    """The folder's own CFG weight: `guidance_scale` in its generation_config.json (the transformers
    convention), or None when it states none (the pipeline then uses the reference's weight)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return None
    return Fields(read_json_object(path), path).number("guidance_scale", None, lo_open=False)


EDIT_SOURCES = ("understanding", "vq")


def _generation_choice(folder: str | Path, key: str, choices: tuple[str, ...]) -> str:
    """`key` of the folder's generation_config.json, one of `choices` (default: the first)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return choices[0]
    f = Fields(read_json_object(path), path)
    v = f.string(key, choices[0])
    if v not in choices:
        f.fail(key, f"must be one of {', '.join(choices)}, got {v!r}")
    return v


def read_edit_source(folder: str | Path) -> str:
    """How the folder's model takes an edit's source images: `edit_source` in its generation_config.json,
    "understanding" (SigLIP -> aligner, as in a chat; the default) or "vq" (the source's VQ tokens through
    the generation embedding, a januskit setting written by training with [data] edit_source = "vq")."""
    return _generation_choice(folder, "edit_source", EDIT_SOURCES)


EDIT_LAYOUTS = ("sources_first", "sources_last")


def read_edit_layout(folder: str | Path) -> str:
    """Where an edit prompt's understanding-encoder sources sit: `edit_layout` in the folder's
    generation_config.json, "sources_first" (before the instruction, as a chat puts images; the default) or
    "sources_last" (after it, so source slot i sits a fixed distance before target token i), a januskit
    setting written by training with [data] edit_layout. VQ sources are always last."""
    return _generation_choice(folder, "edit_layout", EDIT_LAYOUTS)


def apply_edit_settings(processor: Any, folder: str | Path, config: Any) -> None:
    """Make `processor` build edit prompts the way the folder's model was trained to read them (its
    generation_config.json: edit_source, edit_layout); every path that samples edits from a folder uses it."""
    if read_edit_source(folder) == "vq":
        if config.arch == "janusflow":
            raise CheckpointError(f"{Path(folder) / 'generation_config.json'}: edit_source 'vq' is for Janus models, "
                                  "this one is JanusFlow")
        processor.edit_source_slots = config.vq.n_tokens
    processor.edit_sources_last = read_edit_layout(folder) == "sources_last"


def write_generation_settings(folder: str | Path, settings: dict[str, Any]) -> None:
    """Merge `settings` into the folder's generation_config.json (written whole, then renamed)."""
    path = Path(folder) / "generation_config.json"
    d = read_json_object(path) if path.is_file() else {}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(d | dict(settings), indent=1) + "\n")
    tmp.replace(path)
