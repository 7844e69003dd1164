"""Prepacked CPU weights (januskit.models.cpu_pack): same outputs, inference only."""
from __future__ import annotations

import pytest
import torch

import januskit
from januskit.checkpoint.init import init_checkpoint
from januskit.checkpoint.official import save_janus
from januskit.models import cpu_pack

pytestmark = pytest.mark.skipif(not cpu_pack.available(), reason="oneDNN prepacking ops not in this torch build")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_outputs_match(tmp_path, dtype):
    if not cpu_pack.supports(getattr(torch, dtype)):
        pytest.skip(f"this CPU does not pack {dtype} weights (no native bf16)")
    folder = init_checkpoint(tmp_path / "m", preset_name="tiny-janus-pro", seed=1)
    plain, packed = januskit.load(folder, dtype=dtype), januskit.load(folder, dtype=dtype)
    n = packed.pack_for_cpu()
    assert n == 2 * 7 + 1 + 2 + 2 + 2  # 2 layers x 7 projections, lm_head, aligner, gen_aligner, gen_head
    ids = torch.tensor([plain.processor.generation_prompt("a red circle")])
    with torch.inference_mode():
        for p in (plain, packed):
            h = p.model.llm(p.model.text_embeds(ids), torch.arange(ids.shape[1])[None])
            p.logits = (p.model.text_logits(h).float(), p.model.image_logits(h).float())
    tol = 0.0 if dtype == "bfloat16" else 1e-4  # bf16: the same kernels either way; fp32: blocked summation order
    for a, b in zip(plain.logits, packed.logits):
        assert (a - b).abs().max().item() <= tol
    a = plain.generate_images("a red circle", n=2, seed=3, temperature=0).tokens
    b = packed.generate_images("a red circle", n=2, seed=3, temperature=0).tokens
    assert torch.equal(a, b)
    assert plain.chat("What is this?", max_new_tokens=8) == packed.chat("What is this?", max_new_tokens=8)


def test_unsupported_dtype_is_left_unpacked(tmp_path, monkeypatch):
    """On a CPU without native bf16 (AVX2 only), packing a bf16 model changes nothing and generation works."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert not cpu_pack.supports(torch.bfloat16) and cpu_pack.supports(torch.float32)
    pipe = januskit.load(init_checkpoint(tmp_path / "m", preset_name="tiny-janus-pro"), dtype="bfloat16")
    before = pipe.generate_images("a red circle", n=1, seed=3, temperature=0).tokens
    assert pipe.pack_for_cpu() == 0 and not any(isinstance(m, cpu_pack.PackedLinear) for m in pipe.model.modules())
    assert torch.equal(pipe.generate_images("a red circle", n=1, seed=3, temperature=0).tokens, before)


def test_packed_model_cannot_be_saved(tmp_path):
    pipe = januskit.load(init_checkpoint(tmp_path / "m", preset_name="tiny-janus-pro"))
    pipe.pack_for_cpu()
    with pytest.raises(ValueError, match="prepacked for CPU inference"):
        save_janus(pipe.model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
