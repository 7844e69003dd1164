"""The one-token decode paths: attention over the whole static cache (llama.CacheBias, the bf16 path and
every compiled step) against SDPA over the written slots, and compiled decode steps against eager ones."""
from __future__ import annotations

import warnings

import pytest
import torch

import januskit
from januskit.config import LlamaConfig
from januskit.models.llama import SLOT_STEP, CacheBias, KVCache, LlamaModel
from januskit.sampling.image_ar import generate_image_tokens
from januskit.sampling.logits import row_generator

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, intermediate_size=96, vocab_size=97, max_seq_len=64)
CFG_GQA = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, vocab_size=97, max_seq_len=64)


def decode(model: LlamaModel, dtype: torch.dtype, tensor_start: bool, padded: bool) -> torch.Tensor:
    """Prefill 7 slots (row 0 left-padded by 3 when `padded`), then 5 one-token steps; the steps' outputs."""
    g = torch.Generator().manual_seed(0)
    B, L, steps = 3, 7, 5
    valid = torch.ones(B, L, dtype=torch.bool)
    if padded:
        valid[0, :3] = False
    key_valid = torch.ones(B, L + steps, dtype=torch.bool)
    key_valid[:, :L] = valid
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model.config, B, L + steps, dtype)
    model(torch.randn(B, L, model.config.dim, generator=g).to(dtype), pos, cache, 0, key_valid if padded else None)
    p, outs = pos[:, -1:], []
    for i in range(steps):
        p = p + 1
        start = torch.tensor([L + i]) if tensor_start else L + i
        outs.append(model(torch.randn(B, 1, model.config.dim, generator=g).to(dtype), p, cache, start,
                          key_valid if padded else None))
    return torch.cat(outs, 1).float()


@pytest.mark.parametrize("cfg", [CFG, CFG_GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("padded", [False, True])
def test_cache_attention_equals_sdpa_in_float32(cfg, padded):
    """A tensor start takes the whole-cache path in float32 too: same values as SDPA over the written
    slots (different summation order only), with and without left padding, MHA and GQA."""
    torch.manual_seed(0)
    model = LlamaModel(cfg).eval()
    with torch.inference_mode():
        sdpa = decode(model, torch.float32, tensor_start=False, padded=padded)
        whole = decode(model, torch.float32, tensor_start=True, padded=padded)
    assert sdpa.shape == (3, 5, cfg.dim)
    torch.testing.assert_close(whole, sdpa, rtol=1e-5, atol=1e-5)


def test_bf16_decode_takes_the_cache_path_and_stays_close_to_float32():
    torch.manual_seed(0)
    model = LlamaModel(CFG_GQA).eval()
    h = torch.zeros(2, 1, CFG_GQA.dim, dtype=torch.bfloat16)
    cache = KVCache(CFG_GQA, 2, 8, torch.bfloat16)
    assert CacheBias.applies(cache, h, 3) and not CacheBias.applies(cache, h.float(), 3)
    assert CacheBias.applies(cache, h.float(), torch.tensor([3])) and not CacheBias.applies(None, h, 3)
    with torch.inference_mode():
        ref = decode(model, torch.float32, tensor_start=False, padded=True)
        bf16 = decode(model.to(torch.bfloat16), torch.bfloat16, tensor_start=False, padded=True)
    assert (bf16 - ref).abs().max() < 0.05 * ref.abs().max()


def test_cache_bias_hides_unwritten_and_padding_slots():
    kv = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    b = CacheBias(4, kv, 6, torch.device("cpu"))
    assert b.slots == 6 and b.bias.shape == (2, 1, 1, 6)  # slots rounded up to SLOT_STEP, capped by the cache
    assert torch.isinf(b.bias[0, 0, 0]).tolist() == [True, False, False, False, True, True]
    assert torch.isinf(b.bias[1, 0, 0]).tolist() == [False, False, False, False, True, True]
    # an eager step attends over the written slots rounded up to SLOT_STEP (few matmul shapes), not the cache
    for end, slots in ((4, SLOT_STEP), (SLOT_STEP, SLOT_STEP), (SLOT_STEP + 1, 2 * SLOT_STEP), (999, 1000)):
        assert CacheBias(end, None, 1000, torch.device("cpu")).slots == slots
    b = CacheBias(SLOT_STEP + 1, None, 1000, torch.device("cpu")).bias
    assert b.shape == (1, 1, 1, 2 * SLOT_STEP) and torch.isinf(b[0, 0, 0]).sum() == SLOT_STEP - 1
    # a compiled step (tensor end) attends over the whole cache: unwritten slots are hidden by the bias
    b = CacheBias(torch.tensor(4), kv, 6, torch.device("cpu"))
    assert b.slots == 6 and torch.isinf(b.bias[0, 0, 0]).tolist() == [True, False, False, False, True, True]
    assert torch.equal(CacheBias(torch.tensor(2), None, 4, torch.device("cpu")).bias,
                       torch.tensor([0.0, 0.0, float("-inf"), float("-inf")]).view(1, 1, 1, 4))


@pytest.fixture(scope="module")
def tiny_f32():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return januskit.load("tiny-janus-pro", dtype="float32")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_compiled_image_decode_gives_the_eager_tokens_in_float32(tiny_f32, temperature):
    prompts = [[1, 5, 6, 7, 8, 9], [1, 5, 9]]  # different lengths: left padding and a key mask

    def run(compile: bool) -> torch.Tensor:
        gens = [row_generator(3, i) for i in range(2)]
        return generate_image_tokens(tiny_f32.model, prompts, pad_id=0, cfg_weight=[5.0, 2.0],
                                     temperature=temperature, generators=gens, compile=compile)

    eager = run(False)
    assert eager.shape == (2, tiny_f32.config.vq.n_tokens)
    assert torch.equal(run(True), eager)


def test_compiled_chat_gives_the_eager_answer_in_float32(tiny_f32):
    kw = dict(max_new_tokens=12, temperature=0.8, seed=4)
    eager = tiny_f32.chat_ids("Describe the picture.", **kw)
    tiny_f32.compile_decode = True
    try:
        compiled = tiny_f32.chat_ids("Describe the picture.", **kw)
        compiled_batch = tiny_f32.chat_batch(["hi", "a longer question here"], max_new_tokens=8, seed=1)
    finally:
        tiny_f32.compile_decode = False
    assert len(eager) > 0
    assert compiled == eager
    assert compiled_batch == tiny_f32.chat_batch(["hi", "a longer question here"], max_new_tokens=8, seed=1)


def test_compile_refuses_a_prepacked_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = januskit.load("tiny-janus-pro", dtype="float32")
    if not pipe.pack_for_cpu():
        pytest.skip("oneDNN prepacking is not available in this torch build")
    with pytest.raises(ValueError, match="prepacked with pack_for_cpu"):
        generate_image_tokens(pipe.model, [[1, 5, 6]], pad_id=0, cfg_weight=5.0, compile=True)
    pipe.compile_decode = True
    with pytest.raises(ValueError, match="prepacked with pack_for_cpu"):
        pipe.chat("hi", max_new_tokens=2)


def test_cli_refuses_fast_with_compile():
    from januskit.cli import main

    with pytest.raises(SystemExit, match="--fast and --compile are alternatives"):
        main(["chat", "--model", "tiny-janus-pro", "--fast", "--compile", "hi"])
