"""Shared fixtures: one random tiny-janus-pro checkpoint in the official layout, its HF conversion,
and the two models loaded from them (ours, and transformers' JanusForConditionalGeneration).

Everything is session-scoped and built once in a temporary folder (about 2 MB on disk).

Also `need` / `skip_or_fail` / the `needs` mark: tests of an optional extra (transformers, peft,
diffusers, the browser) skip on a machine without it, but fail under CI=true, where every extra is
installed and a silent skip would hide them.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
PRESET = "tiny-janus-pro"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test (or the whole module, at import time); under CI=true fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; under CI=true nothing may be skipped for a missing dependency", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need(module: str, extra: str = "test") -> ModuleType:
    """Import an optional extra's module for a test file or a test: skip without it (fail under CI=true)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e
    skip_or_fail(f"{module} is not importable ({error}): pip install -e '.[{extra}]'")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(module, extra): the test needs an optional extra (see `need`)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        need(*mark.args, **mark.kwargs)


@dataclass(frozen=True)
class TinyCheckpoint:
    official: Path  # official layout, written by init_checkpoint (variance-preserving random weights)
    hf: Path  # official_to_hf(official)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    from januskit.checkpoint.convert import official_to_hf
    from januskit.checkpoint.init import init_checkpoint

    root = tmp_path_factory.mktemp("tiny-janus-pro")
    official = init_checkpoint(root / "official", preset_name=PRESET, seed=0)
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
    need("transformers", "parity")  # the parity oracle
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


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine spinning worker threads
    make them orders of magnitude slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
