"""Configs: one frozen dataclass per part, the family configs, presets, and the dtype names; and the
checked reading of a checkpoint folder's JSON files (`Fields`, `read_json_object`, `folder_file`),
here in the lowest room because both checkpoint/ and processing/ read them.
Translating the official config.json is checkpoint/official_config.py's job."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

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


# VQConfig.norm: "group" (the reference), "position" (models.vq.PositionNorm everywhere), "branch" (PositionNorm in
# the residual branches; the two output norms on the main path keep only their affine, so no position's scale,
# which carries its brightness, is normalised away)
VQ_NORMS = ("group", "position", "branch")


@dataclass(frozen=True, kw_only=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_dim: int = 8
    ch: int = 128  # base channels
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # encoder and decoder; 4 downsamplings -> factor 16
    z_channels: int = 256
    num_res_blocks: int = 2  # encoder; the decoder has one more per level (reference)
    image_size: int = 384  # generated image side; 384 / 16 = 24 -> 576 tokens
    # "group": GroupNorm(32), the reference's (its statistics span the whole image, so every token's latent
    # depends on every pixel); "position": the same parameters, statistics over the channels at each position
    # only, for a tokenizer whose tokens see just their receptive field; "branch": the same in the residual
    # branches, the two output norms affine only (models.vq.VQ_NORMS; miniature studies: no other
    # implementation computes them, so such a model does not convert to HF transformers).
    norm: str = "group"

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


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint folder's JSON files. A folder may be broken or hostile: every refusal is a
# ConfigError (or the caller's error type) naming the file and the field, never a TypeError or
# AttributeError from deep inside, and never a wrong-typed value passed on (int("64"), int(True)).

# Bounds on config numbers: far above every real model (Janus-Pro-7B: width 4096, 30 layers, vocab
# 102400, context 16384) yet low enough that an absurd value fails here with its field named, not
# later as an out-of-memory error or a context limit no check can reach.
MAX_DIM = 65536  # widths, channels, heads, hidden sizes
MAX_LAYERS = 1024
MAX_VOCAB = 2**20  # vocabulary and codebook sizes
MAX_POSITIONS = 2**20  # max_position_embeddings: 64x the longest Janus context
MAX_IMAGE_SIZE = 8192  # pixels a side
MAX_JSON_BYTES = 16 * 2**20  # a config is a few KB; refuse to read a huge file into memory
_REQUIRED: Any = object()


def shown(v: Any) -> str:
    """A JSON value in an error message: its JSON type and (shortened) value."""
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)
    r = repr(v)
    return f"{kind} {r if len(r) <= 60 else r[:57] + '...'}"


class Fields:
    """Typed reads from one JSON object of a config file; `prefix` is its dotted path in the file.
    JSON null reads as absent (as transformers reads it): the default applies, or 'missing field'."""

    def __init__(self, d: Any, file: str | Path, prefix: str = "") -> None:
        if not isinstance(d, dict):
            raise ConfigError(f"{file}: {prefix + ' ' if prefix else ''}must be a JSON object, got {shown(d)}")
        self.d, self.file, self.prefix = d, str(file), prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.file}: {self.name(key)} {problem}")

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def _get(self, key: str, default: Any) -> Any:
        v = self.d.get(key)
        if v is None and default is _REQUIRED:
            raise ConfigError(f"{self.file}: missing field {self.name(key)!r}")
        return v

    def obj(self, key: str, required: bool = True) -> Fields:
        v = self._get(key, _REQUIRED if required else None)
        return Fields({} if v is None else v, self.file, self.name(key))

    def string(self, key: str, default: Any = _REQUIRED) -> str:
        v = self._get(key, default)
        if v is None:
            return default
        if not isinstance(v, str):
            self.fail(key, f"must be a string, got {shown(v)}")
        return v

    def flag(self, key: str, default: Any = _REQUIRED) -> bool:
        v = self._get(key, default)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail(key, f"must be true or false, got {shown(v)}")
        return v

    def integer(self, key: str, default: Any = _REQUIRED, lo: int = 1, hi: int = MAX_DIM) -> int:
        v = self._get(key, default)
        return default if v is None else _integer(v, f"{self.file}: {self.name(key)}", lo, hi)

    def number(self, key: str, default: Any = _REQUIRED, lo: float = 0.0, hi: float = math.inf,
               lo_open: bool = True) -> float:
        v = self._get(key, default)
        return default if v is None else _number(v, f"{self.file}: {self.name(key)}", lo, hi, lo_open)

    def integers(self, key: str, default: Any = _REQUIRED, lo: int = 1, hi: int = MAX_DIM,
                 max_len: int = 16) -> tuple[int, ...]:
        """A non-empty list of integers, each in [lo, hi]."""
        v = self._get(key, default)
        if v is None:
            return default
        if not isinstance(v, list) or not 1 <= len(v) <= max_len:
            self.fail(key, f"must be a list of 1 to {max_len} integers, got {shown(v)}")
        return tuple(_integer(x, f"{self.file}: {self.name(key)}[{i}]", lo, hi) for i, x in enumerate(v))

    def numbers(self, key: str, n: int, default: Any = _REQUIRED, lo: float = -math.inf, hi: float = math.inf,
                lo_open: bool = False) -> tuple[float, ...]:
        """`n` numbers: a list of n, or one number for all (as image processors accept)."""
        v = self._get(key, default)
        if v is None:
            return default
        if not isinstance(v, list):
            return (_number(v, f"{self.file}: {self.name(key)}", lo, hi, lo_open),) * n
        if len(v) != n:
            self.fail(key, f"must be a list of {n} numbers, got {shown(v)}")
        return tuple(_number(x, f"{self.file}: {self.name(key)}[{i}]", lo, hi, lo_open) for i, x in enumerate(v))


def _integer(v: Any, label: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:  # a JSON 64.0 or "64" is not an int
        raise ConfigError(f"{label} must be an integer in [{lo}, {hi}], got {shown(v)}")
    return v


def _number(v: Any, label: str, lo: float, hi: float, lo_open: bool) -> float:
    try:
        x = math.nan if isinstance(v, bool) or not isinstance(v, (int, float)) else float(v)
    except OverflowError:  # a JSON integer too large for a float
        x = math.inf
    if not math.isfinite(x) or x < lo or (lo_open and x == lo) or x > hi:
        raise ConfigError(f"{label} must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}], "
                          f"got {shown(v)}")
    return x


def folder_file(folder: str | Path, name: str | Path, error: type[ValueError] = ConfigError) -> Path:
    """folder/name, refused (`error`, naming the file) when it resolves outside the folder: a symlink
    out of it, or '..' / an absolute path in an index. A checkpoint folder is untrusted input, and
    what lies outside it may be any file the user can read (which convert would copy along)."""
    path = Path(folder) / name
    try:
        root, real = Path(folder).resolve(), path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte in an index entry
        raise error(f"{str(path)!r}: not a readable path ({e})") from None
    if real.is_relative_to(root) or _hub_blob(real, root):
        return path
    raise error(f"{path}: resolves to {real}, outside the checkpoint folder {root}; refusing to read it")


def _hub_blob(real: Path, root: Path) -> bool:
    """huggingface_hub's cache links models--<org>--<name>/snapshots/<rev>/<file> to ../../blobs/<hash>,
    in the same repo folder: a downloaded checkpoint must still load."""
    snap = next((a for a in (root, *root.parents)
                 if a.parent.name == "snapshots" and a.parent.parent.name.startswith("models--")), None)
    blobs = snap.parent.parent / "blobs" if snap is not None else None
    return blobs is not None and not blobs.is_symlink() and real.parent == blobs


def read_json_object(path: str | Path, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """A JSON file that must hold an object: inside its folder (folder_file), at most MAX_JSON_BYTES,
    UTF-8 and valid JSON, else `error` naming the file."""
    path = folder_file(Path(path).parent, Path(path).name, error)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{path}: {path.stat().st_size} bytes, more than a config file may have ({MAX_JSON_BYTES})")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_json_object(text, str(path), error)


def parse_json_object(text: str, where: str, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and Python's limit on the digits of an integer
        raise error(f"{where}: not valid JSON ({e})") from None
    if not isinstance(v, dict):
        raise error(f"{where}: must hold a JSON object, got {shown(v)}")
    return v


def check_janus(c: JanusConfig, where: str, names: dict[str, str] | None = None) -> None:
    """The widths that must agree between parts; `names` renames the official fields for another layout."""
    pairs = [("aligner_config.params.input_dim", c.aligner.input_dim, "vision width", c.vision.width),
             ("aligner_config.params.n_embed", c.aligner.n_embed, "LLM hidden_size", c.llm.dim),
             ("gen_aligner_config.params.input_dim", c.gen_aligner.input_dim, "VQ n_embed", c.vq.codebook_dim),
             ("gen_aligner_config.params.n_embed", c.gen_aligner.n_embed, "LLM hidden_size", c.llm.dim),
             ("gen_head_config.params.n_embed", c.gen_head.n_embed, "LLM hidden_size", c.llm.dim),
             ("gen_head_config.params.image_token_size", c.gen_head.image_token_size, "codebook size",
              c.vq.codebook_size)]
    for name, got, what, want in pairs:
        if got != want:
            raise ConfigError(f"{where}: {(names or {}).get(name, name)} = {got} does not match the {what} {want}")


def check_flow(c: JanusFlowConfig, where: str) -> None:
    """The shape contracts the reference leaves implicit (it hard-codes the 1.3B dims)."""
    e, d = c.gen_enc, c.gen_dec
    pairs = [("vision_gen_enc_config.params.hidden_size", e.hidden_size, "LLM hidden_size", c.llm.dim),
             ("vision_gen_dec_config.params.hidden_size", d.hidden_size, "LLM hidden_size", c.llm.dim),
             ("vision_gen_dec_config.params.block_out_channels[-1]", d.block_out_channels[-1],
              "encoder width (the skip connection)", e.width),
             ("vision_gen_dec_config.params.out_channels", d.out_channels, "latent channels (input_channels)",
              e.input_channels),
             ("vision_gen_enc_config.params.block_out_channels[0]", e.block_out_channels[0],
              "grid width block_out_channels[-1] (the patchify conv feeds the blocks)", e.width),
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
