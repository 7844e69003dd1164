"""Configs: one frozen dataclass per part, the family configs, presets, and the dtype names.
Reading and writing the official config.json is checkpoint/official_config.py's job."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


class ConfigError(ValueError):
    """A config.json that cannot describe a model we know; the message names file and field."""


def check_janus(c: JanusConfig, where: str) -> None:
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
