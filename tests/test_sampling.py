"""Samplers (temperature / top-k / top-p / per-row generators) and the LLaMA KV-cache decode path."""
from __future__ import annotations

import math

import pytest
import torch

from januskit.config import LlamaConfig
from januskit.models.llama import KVCache, LlamaModel
from januskit.sampling.logits import filter_logits, row_generator, sample


def gens(seed, n):
    return [row_generator(seed, i) for i in range(n)]


# ----------------------------------------------------------------------------------------------- logits -> token


def test_temperature_zero_is_argmax():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, 0.0, top_k=5, top_p=0.5, generators=gens(1, 16)), logits.argmax(-1))


def test_very_low_temperature_is_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(logits, 1e-4, generators=gens(0, 8)), logits.argmax(-1))


@pytest.mark.parametrize("t", [-0.5, float("nan"), float("inf"), -float("inf")])
def test_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        sample(torch.zeros(1, 4), t)


def test_top_k_masks_all_but_k():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5]])
    f = filter_logits(logits, top_k=3)
    assert torch.isfinite(f[0]).tolist() == [False, True, False, True, False, True]
    assert torch.equal(f[0, [1, 3, 5]], logits[0, [1, 3, 5]])
    # k >= vocab, 0 or None: unchanged
    for k in (6, 100, 0, None):
        assert torch.equal(filter_logits(logits, top_k=k), logits)


def test_top_k_draws_stay_within_top_k():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 50, generator=g).repeat(4000, 1)
    allowed = set(torch.topk(logits[0], 7).indices.tolist())
    ids = sample(logits, 1.5, top_k=7, generators=g)
    seen = set(ids.tolist())
    assert seen <= allowed
    assert len(seen) == 7  # with 4000 draws at T=1.5 every allowed token shows up


def test_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert keep(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert keep(0.75) == [False, True, False, True]  # 0.5 + 0.3
    assert keep(0.85) == [False, True, True, True]  # + 0.15
    assert keep(0.99) == [True, True, True, True]
    assert keep(1.0) == [True, True, True, True]  # disabled
    assert keep(0.01) == [False, True, False, False]  # never empty


def test_top_p_per_row_and_with_top_k():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.4, 0.3, 0.2, 0.1]]).log()
    f = torch.isfinite(filter_logits(logits, top_p=0.75))
    assert f.tolist() == [[False, True, False, True], [True, True, True, False]]
    f = torch.isfinite(filter_logits(logits, top_k=2, top_p=0.95))
    # top-k first, then the nucleus of what is left (renormalised)
    assert f.tolist() == [[False, True, False, True], [True, True, False, False]]


def test_top_p_draws_stay_within_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3, 0.0])
    logits = probs.log().expand(3000, 5)
    ids = sample(logits, 1.0, top_p=0.75, generators=torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {1, 3}
    frac = (ids == 1).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 0.04


def test_seeded_distribution_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    for t in (1.0, 0.7):
        ids = sample(logits.expand(n, -1), t, generators=torch.Generator().manual_seed(1234))
        counts = torch.bincount(ids, minlength=6).double()
        expected = (logits / t).softmax(-1).double() * n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 25.0, (t, counts, expected)  # 5 dof: p(chi2 > 25) ~ 1e-4


def test_zero_probability_tokens_never_drawn():
    logits = torch.tensor([0.0, float("-inf"), 1.0, float("-inf")]).expand(5000, 4)
    ids = sample(logits, 1.0, generators=torch.Generator().manual_seed(3))
    assert set(ids.tolist()) == {0, 2}


def test_per_row_generators_make_rows_independent_of_the_batch():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 200, generator=g)
    batched = sample(logits, 1.0, top_k=50, generators=gens(77, 5))
    for i in range(5):
        alone = sample(logits[i:i + 1], 1.0, top_k=50, generators=[row_generator(77, i)])
        assert alone.item() == batched[i].item()
    # changing another row's logits does not change row 2's draw
    other = logits.clone()
    other[0] = -other[0]
    other[4] += 3
    assert sample(other, 1.0, top_k=50, generators=gens(77, 5))[2] == batched[2]
    # the same generator state gives the same id, whatever row it sits in
    moved = sample(torch.stack([logits[3], logits[1]]), 1.0, top_k=50,
                   generators=[row_generator(77, 3), row_generator(77, 1)])
    assert moved.tolist() == [batched[3].item(), batched[1].item()]


def test_generators_count_must_match_rows():
    with pytest.raises(ValueError, match="3 generators for 2 rows"):
        sample(torch.zeros(2, 5), 1.0, generators=gens(0, 3))


def test_row_generator_is_a_function_of_seed_and_index_only():
    a = [row_generator(42, i).initial_seed() for i in range(6)]
    b = [row_generator(42, i).initial_seed() for i in range(3)]
    assert a[:3] == b
    assert len(set(a)) == 6
    assert row_generator(43, 0).initial_seed() != a[0]
    x = torch.rand(10, generator=row_generator(42, 2))
    y = torch.rand(10, generator=row_generator(42, 2))
    assert torch.equal(x, y)


def test_row_generator_rejects_bad_seeds():
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        row_generator(-1, 0)
    with pytest.raises(ValueError, match="seed"):
        row_generator(1.5, 0)
    with pytest.raises(ValueError, match="index"):
        row_generator(0, -2)
    row_generator(2**70, 0)  # big seeds are fine


@pytest.mark.parametrize("kw,msg", [(dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=1.5), "top_p"),
                                    (dict(top_p=-0.1), "top_p"), (dict(top_p=float("nan")), "top_p")])
def test_bad_filters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        sample(torch.zeros(1, 4), 1.0, **kw)


def test_sampling_is_deterministic_for_a_seed():
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    a = sample(logits, 0.9, top_p=0.9, generators=gens(5, 6))
    b = sample(logits, 0.9, top_p=0.9, generators=gens(5, 6))
    c = sample(logits, 0.9, top_p=0.9, generators=gens(6, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------- KV cache


CFG = LlamaConfig(dim=48, n_layers=2, n_heads=4, intermediate_size=96, vocab_size=97, max_seq_len=64)
CFG_GQA = LlamaConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, vocab_size=97,
                      max_seq_len=64)


def _model(c, seed=0):
    torch.manual_seed(seed)
    m = LlamaModel(c).eval()
    with torch.no_grad():  # non-trivial norm scales
        for mod in m.modules():
            if hasattr(mod, "weight") and mod.weight.ndim == 1:
                mod.weight.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("c", [CFG, CFG_GQA], ids=["mha", "gqa"])
@torch.no_grad()
def test_cached_decode_equals_full_forward(c):
    m = _model(c)
    B, T, P = 3, 20, 7
    h = torch.randn(B, T, c.dim, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(T).expand(B, T)
    full = m(h, pos)
    cache = KVCache(c, B, T, torch.float32)
    out = [m(h[:, :P], pos[:, :P], cache, 0)]
    for t in range(P, T):
        out.append(m(h[:, t:t + 1], pos[:, t:t + 1], cache, t))
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)
    # chunked prefill (several tokens at a time after the first chunk) too
    cache = KVCache(c, B, T, torch.float32)
    out = [m(h[:, :5], pos[:, :5], cache, 0), m(h[:, 5:12], pos[:, 5:12], cache, 5),
           m(h[:, 12:], pos[:, 12:], cache, 12)]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_full_forward_is_causal():
    m = _model(CFG)
    h = torch.randn(1, 12, CFG.dim)
    pos = torch.arange(12)[None]
    a = m(h, pos)
    h2 = h.clone()
    h2[:, 8:] = torch.randn(1, 4, CFG.dim)
    b = m(h2, pos)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@torch.no_grad()
def test_left_padding_matches_unpadded_rows():
    c = CFG
    m = _model(c, seed=3)
    g = torch.Generator().manual_seed(2)
    lens = [11, 6, 9]
    T, new = max(lens), 5
    rows = [torch.randn(n + new, c.dim, generator=g) for n in lens]  # prompt + decode inputs per row

    # each row alone, no padding, full forward over prompt + new inputs
    alone = [m(r[None], torch.arange(r.shape[0])[None])[0] for r in rows]

    # batched, left-padded: prefill then step-by-step decode with the validity mask
    B = len(lens)
    h = torch.randn(B, T, c.dim, generator=g) * 100  # garbage in the padding slots must not leak
    valid = torch.zeros(B, T + new, dtype=torch.bool)
    for i, n in enumerate(lens):
        h[i, T - n:] = rows[i][:n]
        valid[i, T - n:] = True
    valid[:, T:] = True
    positions = (valid[:, :T].long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(c, B, T + new, torch.float32)
    pre = m(h, positions, cache, 0, valid)
    pos = positions[:, -1:]
    steps = []
    for s in range(new):
        pos = pos + 1
        x = torch.stack([rows[i][n + s] for i, n in enumerate(lens)])[:, None]
        steps.append(m(x, pos, cache, T + s, valid))
    dec = torch.cat(steps, 1)
    for i, n in enumerate(lens):
        torch.testing.assert_close(pre[i, T - n:], alone[i][:n], atol=1e-5, rtol=0)
        torch.testing.assert_close(dec[i], alone[i][n:], atol=1e-5, rtol=0)
    assert torch.isfinite(pre).all()


@torch.no_grad()
def test_cache_overflow_is_an_error():
    m = _model(CFG)
    cache = KVCache(CFG, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="exceeds the cache length 4"):
        m(torch.randn(1, 5, CFG.dim), torch.arange(5)[None], cache, 0)
    with pytest.raises(ValueError, match="needs a KV cache"):
        m(torch.randn(1, 1, CFG.dim), torch.tensor([[3]]), None, 3)


def test_kv_cache_nbytes():
    c = CFG
    cache = KVCache(c, 2, 10, torch.float32)
    assert KVCache.nbytes(c, 2, 10, torch.float32) == sum(k.numel() for k in cache.k) * 4 * 2
    assert KVCache.nbytes(c, 2, 10, torch.bfloat16) == sum(k.numel() for k in cache.k) * 2 * 2
    # one tensor per layer, no shared storage: a compiled step writing a slot of a view of one stacked buffer
    # made inductor copy the whole buffer every step (bench/README.md, bench_decode_paths)
    assert len(cache.k) == len(cache.v) == c.n_layers
    assert len({t.untyped_storage().data_ptr() for t in (*cache.k, *cache.v)}) == 2 * c.n_layers
    assert math.isclose(KVCache.nbytes(CFG_GQA, 2, 10, torch.float32) * 2, KVCache.nbytes(c, 2, 10, torch.float32))
