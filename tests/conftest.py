"""Shared fixtures: one random tiny-janus-pro checkpoint in the official layout, its HF conversion,
and the two models loaded from them (ours, and transformers' JanusForConditionalGeneration).

Everything is session-scoped and built once in a temporary folder (about 2 MB on disk).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
PRESET = "tiny-janus-pro"


@dataclass(frozen=True)
class TinyCheckpoint:
    official: Path  # official layout, written by init_checkpoint and then sharpened
    hf: Path  # official_to_hf(official)


def sharpen(folder: Path, gain: float = 1.0) -> None:
    """Rescale every matrix of `folder`'s model.safetensors to std gain / sqrt(fan_in), in place.

    init_checkpoint draws matrices with std 0.02. At width 64 that makes the tiny network almost
    constant: the gen head's bias dominates its logits and greedy decoding emits one token 64 times,
    so "the same greedy tokens as HF" would prove nothing. With variance-preserving matrices the
    hidden states depend on the input and the greedy tokens vary. Norms, biases, convolutions and the
    unused entries keep their random init values; the tensor order, dtypes and metadata are kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    for k, t in tensors.items():
        if t.ndim == 2 and "attn_pool" not in k:
            tensors[k] = t * (gain / math.sqrt(t.shape[1]) / t.std().clamp(min=1e-12))
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    from januskit.checkpoint.convert import official_to_hf
    from januskit.checkpoint.init import init_checkpoint

    root = tmp_path_factory.mktemp("tiny-janus-pro")
    official = init_checkpoint(root / "official", preset_name=PRESET, seed=0)
    sharpen(official)
    hf = official_to_hf(official, root / "hf")
    return TinyCheckpoint(official=Path(official), hf=Path(hf))


@pytest.fixture(scope="session")
def ours(tiny_ckpt: TinyCheckpoint):
    """januskit pipeline (model + processor) loaded from the official folder, float32."""
    import januskit

    return januskit.load(tiny_ckpt.official, dtype="float32")


_HF_CACHE: dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="session")
def hf_loader(tiny_ckpt: TinyCheckpoint):
    """attn_implementation -> transformers JanusForConditionalGeneration from our HF conversion
    (float32, eval; loaded once per implementation). Fails if from_pretrained reports any
    missing / unexpected / mismatched key."""
    pytest.importorskip("transformers", reason="the parity oracle needs transformers (pip install -e '.[test]')")
    from transformers import JanusForConditionalGeneration

    def load(attn: str = "eager") -> torch.nn.Module:
        if attn not in _HF_CACHE:
            model, info = JanusForConditionalGeneration.from_pretrained(
                tiny_ckpt.hf, dtype=torch.float32, attn_implementation=attn, output_loading_info=True)
            bad = {k: v for k, v in info.items() if v}
            assert not bad, f"transformers could not load our HF conversion cleanly: {bad}"
            _HF_CACHE[attn] = model.eval()
        return _HF_CACHE[attn]

    return load
