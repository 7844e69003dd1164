"""Assemble a Stage-I starting checkpoint from the pretrained parts the Janus recipe begins with.

Inputs are not Janus checkpoints: the DeepSeek-LLM base as an HF `LlamaForCausalLM` folder, the
SigLIP vision tower as a timm-layout state dict, and the LlamaGen VQ-16 tokenizer as a torch file.
Their weights are copied strictly (every key and shape checked, errors name the file and key); the
parts Stage I trains (aligner, gen_aligner, gen_head, gen_embed) are freshly initialised from a
seed; the LLM's tokenizer.json gains the Janus special tokens it lacks. The result is an
official-layout folder written atomically, so nothing is left behind when any check fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import JanusConfig, preset, preset_style, read_json_object
from ..models.janus import JanusModel
from ..processing.tokenizer import BOS_TOKEN, EOS_TOKEN, TextTokenizer, special_tokens_for_style
from .init import processor_files, randomize
from .io import CheckpointError, Entry, iter_tensors, load_into, materialize_buffers, weight_files
from .official import save_janus, unused_official_shapes

FRESH_PARTS = ("aligner.", "gen_aligner.", "gen_head.", "gen_embed.")  # what Stage I trains from scratch
_WRAPPERS = ("model", "state_dict")  # LlamaGen saves {"model": ...}; other trainers use "state_dict"
_SIGLIP_PREFIX = "vision_model.vision_tower."
_VQ_PREFIX = "gen_vision_model."

# HF LlamaConfig field -> our LlamaConfig field: checked because shapes cannot catch them (heads, eps, theta).
_HF_LLM_FIELDS = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                  "num_key_value_heads": "n_kv_heads", "intermediate_size": "intermediate_size",
                  "vocab_size": "vocab_size", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta"}


def assemble(llm_dir: str | Path, siglip_file: str | Path, vq_file: str | Path, dst: str | Path, *,
             preset_name: str | None = None, config: JanusConfig | None = None, style: str | None = None,
             seed: int = 0, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False) -> Path:
    """Write an official-layout Janus folder at `dst` from an HF Llama folder, a timm SigLIP file and a
    LlamaGen VQ file. Give `preset_name` or `config`; `style` ("pro"/"janus") picks the special
    tokens to add (default: the preset's, else "pro"). Returns `dst`."""
    if (preset_name is None) == (config is None):
        raise ValueError("assemble: give exactly one of preset_name or config")
    c = preset(preset_name) if config is None else config
    style = style or (preset_style(preset_name) if preset_name else "pro")
    llm_dir, siglip_file, vq_file, dst = Path(llm_dir), Path(siglip_file), Path(vq_file), Path(dst)
    if not llm_dir.is_dir():
        raise FileNotFoundError(f"{llm_dir}: LLM folder not found")
    for f in (siglip_file, vq_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: file not found")
    # Fail before any loading work when the destination would be refused anyway.
    if dst.exists() and not overwrite and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: exists and is not empty (refusing to overwrite)")

    _check_llm_config(llm_dir, c)
    tokenizer = extend_tokenizer(llm_dir / "tokenizer.json", style, c.llm.vocab_size)

    with torch.device("meta"):
        model = JanusModel(c).to(dtype)
    # 1) LLM: HF LlamaForCausalLM keys are exactly our language_model's keys.
    load_into(model.language_model, iter_tensors(weight_files(llm_dir)), dtype,
              lambda k: k.endswith("rotary_emb.inv_freq"), llm_dir)  # older HF saves carry RoPE buffers
    # 2) SigLIP (timm layout): attn_pool is saved by the reference but never run, so it goes to `unused`.
    siglip = read_state(siglip_file)
    dropped = tuple(f"blocks.{i}." for i in range(c.vision.depth, c.vision.layers))  # select_layer < -1
    load_into(model.vision_model.vision_tower, siglip.values(), dtype,
              lambda k: k.startswith("attn_pool.") or k.startswith(dropped), siglip_file)
    # 3) VQ (LlamaGen layout): codebook_used is usage statistics, never read at inference.
    vq = read_state(vq_file)
    load_into(model.gen_vision_model, vq.values(), dtype, lambda k: k == "quantize.codebook_used", vq_file)
    unused = _unused(c, siglip, siglip_file, vq, vq_file, dtype)
    # 4) The parts Stage I trains: allocated only now, then drawn from the seed.
    for part in FRESH_PARTS:
        model.get_submodule(part.rstrip(".")).to_empty(device="cpu")
    randomize(model, seed, prefixes=FRESH_PARTS)
    materialize_buffers(model)
    files = {"tokenizer.json": tokenizer.to_json_str(), **processor_files(c)}
    return save_janus(model.eval(), dst, unused=unused, files=files, overwrite=overwrite)


def read_state(f: Path) -> dict[str, Entry]:
    """Key -> entry of a single weight file: safetensors, or a torch pickle loaded with
    weights_only=True, optionally wrapped in a top-level {"model": ...} / {"state_dict": ...}."""
    f = Path(f)
    if f.suffix == ".safetensors":
        return {e[0]: e for e in iter_tensors([f])}
    try:
        sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # mmap needs the zip format; legacy files (or bad pickles) get a second, plain try
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a corrupt or unsafe pickle
            raise CheckpointError(f"{f}: cannot load with weights_only=True ({e})") from e
    if isinstance(sd, dict):
        for w in _WRAPPERS:
            if isinstance(sd.get(w), dict):
                sd = sd[w]
                break
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f}: expected a state dict, got {type(sd).__name__}")
    out: dict[str, Entry] = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{f}: entry {k!r} is a {type(t).__name__}, not a tensor")
        out[k] = (k, (lambda t=t: t), tuple(t.shape), f)
    return out


def _unused(c: JanusConfig, siglip: dict[str, Entry], siglip_file: Path, vq: dict[str, Entry], vq_file: Path,
            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The official entries the model does not build: the whole attention-pool head is required (the
    file is a timm SigLIP with it), codebook_used is optional (zeros when absent, as LlamaGen without
    usage tracking saves none)."""
    out: dict[str, torch.Tensor] = {}
    for key, shape in unused_official_shapes(c).items():
        if key.startswith(_SIGLIP_PREFIX):
            src, f, name = siglip, siglip_file, key[len(_SIGLIP_PREFIX):]
        else:
            src, f, name = vq, vq_file, key[len(_VQ_PREFIX):]
        if name not in src:
            if "codebook_used" in name:
                continue
            raise CheckpointError(f"{f}: missing key {name!r} (timm SigLIP attention-pool head)")
        if src[name][2] != shape:
            raise CheckpointError(f"{f}: {name!r} has shape {src[name][2]}, expected {shape}")
        t = src[name][1]()
        out[key] = t if "codebook_used" in name or not t.is_floating_point() else t.to(dtype)
    return out


def _check_llm_config(llm_dir: Path, c: JanusConfig) -> None:
    """Compare the HF config.json with the target LLM config where shapes cannot tell (heads, eps, theta)."""
    path = llm_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (expected an HF LlamaForCausalLM folder)")
    raw = read_json_object(path, CheckpointError)
    bad = []
    for hf, ours in _HF_LLM_FIELDS.items():
        if raw.get(hf) is not None and raw[hf] != getattr(c.llm, ours):
            bad.append(f"{hf}={raw[hf]!r} (target {getattr(c.llm, ours)!r})")
    if raw.get("rope_scaling"):
        bad.append(f"rope_scaling={raw['rope_scaling']!r} (target: none)")
    if bad:
        raise CheckpointError(f"{path}: LLM config does not match the target config: " + ", ".join(bad))


def extend_tokenizer(path: Path, style: str, n_rows: int) -> TextTokenizer:
    """The LLM's tokenizer plus the Janus special tokens it lacks, as special tokens with the next free
    ids. BOS/EOS must already exist: their embeddings are the pretrained ones the LLM relies on."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the LLM folder has no tokenizer.json")
    tok = TextTokenizer.from_file(path)
    for t in (BOS_TOKEN, EOS_TOKEN):
        if not tok.has_token(t):
            raise CheckpointError(f"{path}: lacks {t!r}; is this a DeepSeek-LLM tokenizer?")
    missing = [t for t in special_tokens_for_style(style) if not tok.has_token(t)]
    if tok.vocab_size + len(missing) > n_rows:  # every id must have an embedding row and a logit
        raise CheckpointError(f"{path}: {tok.vocab_size} ids + {len(missing)} Janus special tokens to add "
                              f"need {tok.vocab_size + len(missing)} rows, but the LLM embedding has only {n_rows} rows")
    if not missing:
        return tok
    wanted = {t: tok.vocab_size + i for i, t in enumerate(missing)}
    data = json.loads(tok.to_json_str())
    data.setdefault("added_tokens", []).extend(
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for t, i in wanted.items())
    out = TextTokenizer.from_json_str(json.dumps(data, ensure_ascii=False), path)
    if any(out.raw.token_to_id(t) != i for t, i in wanted.items()):
        # `tokenizers` renumbers added tokens past the model vocab when it has id gaps; listing them
        # in the model vocab too pins the ids (added tokens are matched first, so encoding is unchanged).
        data["model"]["vocab"].update(wanted)
        out = TextTokenizer.from_json_str(json.dumps(data, ensure_ascii=False), path)
    for t, i in wanted.items():
        got, enc = out.raw.token_to_id(t), out.encode(t, add_bos=False)
        if got != i or enc != [i]:
            raise CheckpointError(f"{path}: could not add {t!r} at id {i} (tokenizers gave {got}, encodes {enc})")
    return out
