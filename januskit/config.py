"""Configs: one frozen dataclass per part, the family config, presets, and the official config.json.

The official `config.json` (model_type "multi_modality") is partial: `language_config` takes
transformers' LlamaConfig defaults for every field it omits, the SigLIP size comes from the timm
model name, and `gen_vision_config.params` are ignored by the reference (VQ-16 defaults are used).
We read the same files the same way, and accept a few extra `params` so tiny models can be described
in the same schema (the reference would ignore them; real checkpoints never carry them).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    dim: int = 4096  # hidden_size; LlamaConfig default (Pro-7B's config omits it)
    n_layers: int = 32  # num_hidden_layers
    n_heads: int = 32  # num_attention_heads
    n_kv_heads: int | None = None  # num_key_value_heads; None = n_heads (MHA, as every Janus LLM)
    intermediate_size: int = 11008  # SwiGLU hidden width
    vocab_size: int = 32000
    max_seq_len: int = 2048  # max_position_embeddings (the real models say 16384, trained at 4096)
    norm_eps: float = 1e-6  # rms_norm_eps
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


@dataclass(frozen=True, kw_only=True)
class SigLIPConfig:
    image_size: int = 384  # input side in pixels
    patch_size: int = 16
    width: int = 1024
    layers: int = 24  # blocks in the checkpoint (timm preset depth)
    heads: int = 16
    mlp_ratio: float = 4.0
    select_layer: int = -1  # -1 keeps all blocks; -2 would build one block fewer (official semantics)
    model_name: str = "siglip_large_patch16_384"

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def depth(self) -> int:
        """Blocks actually built and run (reference: min(layers, layers + select_layer + 1))."""
        if self.select_layer <= 0:
            return min(self.layers, self.layers + self.select_layer + 1)
        return min(self.layers, self.select_layer)


@dataclass(frozen=True, kw_only=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_dim: int = 8
    ch: int = 128  # base channels
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # encoder and decoder; 4 downsamplings -> factor 16
    z_channels: int = 256
    num_res_blocks: int = 2  # encoder; the decoder has one more per level (reference)
    image_size: int = 384  # generated image side; 384 / 16 = 24 -> 576 tokens

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.factor

    @property
    def n_tokens(self) -> int:
        return self.grid**2


@dataclass(frozen=True, kw_only=True)
class AlignerConfig:
    input_dim: int
    n_embed: int
    depth: int = 2  # mlp_gelu: Linear, then (depth-1) x [GELU, Linear]
    projector_type: str = "mlp_gelu"


@dataclass(frozen=True, kw_only=True)
class GenHeadConfig:
    n_embed: int  # LLM width in
    image_token_embed: int  # hidden width of the head
    image_token_size: int = 16384  # logits out (= codebook size)


@dataclass(frozen=True, kw_only=True)
class JanusConfig:
    """Janus / Janus-Pro: SigLIP (understanding) + VQ-16 (generation) around one LLaMA."""

    llm: LlamaConfig
    vision: SigLIPConfig = field(default_factory=SigLIPConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    aligner: AlignerConfig
    gen_aligner: AlignerConfig
    gen_head: GenHeadConfig
    arch: str = "janus"

    def to_official_dict(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """Official config.json; `dtype` is the weights' dtype name (torch_dtype)."""
        return _janus_to_official(self, dtype)


@dataclass(frozen=True, kw_only=True)
class UViTEncoderConfig:
    """JanusFlow generation encoder (official ShallowUViTEncoder params): latent -> patchified grid."""

    input_channels: int = 4  # VAE latent channels
    block_out_channels: tuple[int, ...] = (768,)  # width of the grid tokens (only the first/last are used)
    kernel_size: int = 2  # patchify conv
    stride: int = 2
    padding: int = 0
    layers_in_middle: int = 2  # ConvNeXt blocks
    hidden_size: int = 2048  # timestep-embedding width = LLM width
    norm_eps: float = 1e-6
    use_bias: bool = True
    use_mid_block: bool = True

    @property
    def width(self) -> int:
        return self.block_out_channels[-1]


@dataclass(frozen=True, kw_only=True)
class UViTDecoderConfig:
    """JanusFlow generation decoder (official ShallowUViTDecoder params): grid -> velocity."""

    in_channels: int = 768  # grid width coming from the LLM (through the dec aligner)
    out_channels: int = 4  # latent channels of the predicted velocity
    block_out_channels: tuple[int, ...] = (768,)  # skip width (the encoder's grid width)
    upsamples: int = 1  # Unpatchify (x2 pixel shuffle) layers
    layers_in_middle: int = 2
    hidden_size: int = 2048
    norm_eps: float = 1e-6
    use_bias: bool = True
    use_mid_block: bool = True


@dataclass(frozen=True, kw_only=True)
class JanusFlowConfig:
    """JanusFlow: SigLIP + Linear (understanding), ShallowUViT encoder/decoder around the same LLM
    (rectified-flow generation in a VAE latent space)."""

    llm: LlamaConfig
    vision: SigLIPConfig = field(default_factory=SigLIPConfig)
    gen_enc: UViTEncoderConfig = field(default_factory=UViTEncoderConfig)
    gen_dec: UViTDecoderConfig = field(default_factory=UViTDecoderConfig)
    latent_size: int = 48  # VAE latent side: 384 px / SDXL-VAE factor 8 (the reference hard-codes 48)
    arch: str = "janusflow"

    @property
    def grid(self) -> int:
        """Side of the generation token grid (the latent after the encoder's patchify conv)."""
        e = self.gen_enc
        return (self.latent_size + 2 * e.padding - e.kernel_size) // e.stride + 1

    @property
    def n_gen_tokens(self) -> int:
        return self.grid**2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.gen_enc.input_channels, self.latent_size, self.latent_size)

    def to_official_dict(self, dtype: str = "bfloat16") -> dict[str, Any]:
        return _flow_to_official(self, dtype)


PRESET_NAMES = ("janus-1.3b", "janus-pro-1b", "janus-pro-7b", "janusflow-1.3b", "tiny-janus", "tiny-janus-pro",
                "tiny-janusflow", "mini-janus-pro", "mini-janusflow")


def _janus(llm: LlamaConfig, vision: SigLIPConfig | None = None, vq: VQConfig | None = None) -> JanusConfig:
    vision = vision or SigLIPConfig()
    vq = vq or VQConfig()
    return JanusConfig(
        llm=llm,
        vision=vision,
        vq=vq,
        aligner=AlignerConfig(input_dim=vision.width, n_embed=llm.dim),
        gen_aligner=AlignerConfig(input_dim=vq.codebook_dim, n_embed=llm.dim),
        gen_head=GenHeadConfig(n_embed=llm.dim, image_token_embed=llm.dim, image_token_size=vq.codebook_size),
    )


_LLM_1B = LlamaConfig(dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, intermediate_size=5632,
                      vocab_size=102400, max_seq_len=16384)
_LLM_7B = LlamaConfig(dim=4096, n_layers=30, n_heads=32, n_kv_heads=32, intermediate_size=11008, vocab_size=102400,
                      max_seq_len=16384)
# Tiny presets keep every architectural feature (MHA, SwiGLU, GELU MLPs, VQ attention at the last
# level, GroupNorm(32)) at a size where a forward takes milliseconds on CPU: 128 px images give 64
# understanding tokens (patch 16) and 64 VQ tokens (factor 16).
_TINY_LLM = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=172, vocab_size=1024, max_seq_len=1024)
_TINY_VISION = SigLIPConfig(image_size=128, patch_size=16, width=64, layers=2, heads=4, model_name="januskit_tiny_vit")
_TINY_VQ = VQConfig(codebook_size=512, codebook_dim=8, ch=32, ch_mult=(1, 1, 2, 2, 2), z_channels=32, image_size=128)
# The miniature world's model (januskit.world): 64 px images, 64 understanding tokens (patch 8) and
# 64 VQ tokens (factor 8), a 4-layer LLM of width 256 and a 512-token world tokenizer.
_MINI_LLM = LlamaConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, intermediate_size=688, vocab_size=512,
                        max_seq_len=512)
_MINI_VISION = SigLIPConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, model_name="januskit_mini_vit")
_MINI_VQ = VQConfig(codebook_size=512, codebook_dim=8, ch=32, ch_mult=(1, 2, 2, 4), z_channels=64, num_res_blocks=1,
                    image_size=64)


# Tiny JanusFlow: 128 px understanding images (8x8 = 64 tokens) and a 4x16x16 latent (8x8 = 64 tokens).
# Mini JanusFlow: the miniature world's 64 px images (patch 8: 8x8 tokens) and a 4x16x16 latent from
# the world's factor-4 VAE, so the generation grid matches the understanding grid as REPA needs.
def _janusflow(llm: LlamaConfig, vision: SigLIPConfig | None = None, width: int = 768, latent_size: int = 48,
               latent_channels: int = 4) -> JanusFlowConfig:
    vision = vision or SigLIPConfig()
    enc = UViTEncoderConfig(input_channels=latent_channels, block_out_channels=(width,), hidden_size=llm.dim)
    dec = UViTDecoderConfig(in_channels=width, out_channels=latent_channels, block_out_channels=(width,),
                            hidden_size=llm.dim)
    return JanusFlowConfig(llm=llm, vision=vision, gen_enc=enc, gen_dec=dec, latent_size=latent_size)


def preset(name: str) -> JanusConfig | JanusFlowConfig:
    """Config of a named preset (exact name; raises listing the valid ones)."""
    table = {
        "janus-1.3b": lambda: _janus(_LLM_1B),
        "janus-pro-1b": lambda: _janus(_LLM_1B),
        "janus-pro-7b": lambda: _janus(_LLM_7B),
        "tiny-janus": lambda: _janus(_TINY_LLM, _TINY_VISION, _TINY_VQ),
        "tiny-janus-pro": lambda: _janus(_TINY_LLM, _TINY_VISION, _TINY_VQ),
        "mini-janus-pro": lambda: _janus(_MINI_LLM, _MINI_VISION, _MINI_VQ),
        "janusflow-1.3b": lambda: _janusflow(_LLM_1B),
        "tiny-janusflow": lambda: _janusflow(_TINY_LLM, _TINY_VISION, width=32, latent_size=16),
        "mini-janusflow": lambda: _janusflow(_MINI_LLM, _MINI_VISION, width=128, latent_size=16),
    }
    if name not in table:
        raise KeyError(f"unknown preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return table[name]()


def preset_style(name: str) -> str:
    """Conversation style of a preset's tokenizer: 'pro' ("<|User|>") or 'janus' ("User")."""
    return "pro" if "pro" in name.split("-") else "janus"


# ---------------------------------------------------------------------------------------------
# Official config.json <-> JanusConfig

# LlamaConfig defaults the reference inherits for any field `language_config` omits.
_HF_LLAMA_DEFAULTS = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=None, vocab_size=32000,
                          max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0)

# timm presets the reference knows by name (width, depth, heads, patch, mlp_ratio).
_VIT_PRESETS = {"siglip_large_patch16_384": dict(width=1024, layers=24, heads=16, patch_size=16, mlp_ratio=4.0)}


class ConfigError(ValueError):
    """A config.json that cannot describe a model we know; the message names file and field."""


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
    vit = dict(_VIT_PRESETS.get(name, {}))
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
    if v.model_name not in _VIT_PRESETS:
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
    _check_janus(c, where)
    return c


def _check_janus(c: JanusConfig, where: str) -> None:
    pairs = [("aligner_config.params.input_dim", c.aligner.input_dim, "vision width", c.vision.width),
             ("aligner_config.params.n_embed", c.aligner.n_embed, "LLM hidden_size", c.llm.dim),
             ("gen_aligner_config.params.input_dim", c.gen_aligner.input_dim, "VQ n_embed", c.vq.codebook_dim),
             ("gen_aligner_config.params.n_embed", c.gen_aligner.n_embed, "LLM hidden_size", c.llm.dim),
             ("gen_head_config.params.n_embed", c.gen_head.n_embed, "LLM hidden_size", c.llm.dim),
             ("gen_head_config.params.image_token_size", c.gen_head.image_token_size, "codebook size",
              c.vq.codebook_size)]
    for name, got, what, want in pairs:
        if got != want:
            raise ConfigError(f"{where}: {name} = {got} does not match the {what} {want}")


def _janus_to_official(c: JanusConfig, dtype: str = "bfloat16") -> dict[str, Any]:
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


def check_flow(c: JanusFlowConfig, where: str) -> None:
    """The shape contracts the reference leaves implicit (it hard-codes the 1.3B dims)."""
    e, d = c.gen_enc, c.gen_dec
    pairs = [("vision_gen_enc_config.params.hidden_size", e.hidden_size, "LLM hidden_size", c.llm.dim),
             ("vision_gen_dec_config.params.hidden_size", d.hidden_size, "LLM hidden_size", c.llm.dim),
             ("vision_gen_dec_config.params.block_out_channels[-1]", d.block_out_channels[-1],
              "encoder width (the skip connection)", e.width),
             ("vision_gen_dec_config.params.out_channels", d.out_channels, "latent channels (input_channels)",
              e.input_channels),
             ("vision_gen_dec_config x2 upsampling", 2 ** d.upsamples * c.grid, "latent_size", c.latent_size)]
    for name, got, what, want in pairs:
        if got != want:
            raise ConfigError(f"{where}: {name} = {got} does not match the {what} {want}")


def _flow_to_official(c: JanusFlowConfig, dtype: str = "bfloat16") -> dict[str, Any]:
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


def replace(c: Any, **kw: Any) -> Any:
    return dataclasses.replace(c, **kw)
