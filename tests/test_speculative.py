"""Speculative Jacobi decoding (januskit.sampling.speculative): the tokens are distributed as ordinary
sampling draws them (checked against the exact joint of a model small enough to enumerate, with a bound
that a broken acceptance rule fails), greedy decoding and window 1 give ordinary sampling's own tokens,
an image does not depend on its batch, and a confident model needs fewer LLM forwards than tokens."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import januskit
from januskit.checkpoint.init import random_model
from januskit.cli import main
from januskit.config import preset
from januskit.eval.world import EvalSettings, evaluate, format_report
from januskit.models.llama import KVCache
from januskit.pipelines.base import UnsupportedOption
from januskit.sampling import speculative
from januskit.sampling.image_ar import cfg_rows, generate_image_tokens
from januskit.sampling.logits import filter_logits, row_generator
from januskit.sampling.speculative import _compact, _keep, _race, _residual, speculative_image_tokens

pytestmark = pytest.mark.filterwarnings("ignore:.*preset with RANDOM weights")

N_TOK = 64  # VQ tokens per image in the tiny presets


@pytest.fixture(scope="module")
def pipe():
    return januskit.load("tiny-janus-pro")


def prompts_of(pipe, texts):
    return [pipe.processor.generation_prompt(t) for t in texts]


def gens(seed, n):
    return [row_generator(seed, i) for i in range(n)]


def chi2_bound(dof: int, z: float = 5.0) -> float:
    """Wilson-Hilferty: the chi-square(dof) quantile z standard deviations out (z=5: a 3e-7 tail)."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of observed counts against cell probabilities, cells expecting < 5 pooled."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


# -- the acceptance step alone -----------------------------------------------------------------

@pytest.mark.parametrize("p, q", [
    ([0.5, 0.3, 0.1, 0.1, 0.0], [0.1, 0.1, 0.2, 0.3, 0.3]),  # q puts mass where p has none (a top-k cut)
    ([0.0, 0.0, 0.6, 0.4, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]),  # a uniform draft
    ([0.7, 0.1, 0.1, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]),  # a draft p never draws: always rejected
])
def test_keep_or_residual_draws_from_p(p, q):
    """x ~ q, kept with probability min(1, p(x)/q(x)), else redrawn from max(0, p - q): the result is
    distributed as p, and the keep rate is sum(min(p, q)) (1 - total variation)."""
    p, q = torch.tensor([p]), torch.tensor([q])
    N = 200_000
    g = torch.Generator().manual_seed(0)
    x = _race(q.expand(N, -1), torch.empty(N, 5).exponential_(generator=g))
    keep = _keep(p.expand(N, -1), q.expand(N, -1), x, torch.rand(N, generator=g))
    y = torch.where(keep, x, _race(_residual(p, q).expand(N, -1), torch.empty(N, 5).exponential_(generator=g)))
    freq = torch.bincount(y, minlength=5) / N
    sd = (p * (1 - p) / N).sqrt()[0]
    assert ((freq - p[0]).abs() <= 5 * sd + 1e-9).all(), (freq, p)
    rate = torch.minimum(p, q).sum()
    assert abs(keep.float().mean() - rate) <= 5 * math.sqrt(rate * (1 - rate) / N) + 1e-9
    stat, dof = chi2(torch.bincount(y, minlength=5).float(), p[0])
    assert stat < chi2_bound(max(dof, 1))


def test_residual_of_equal_distributions_falls_back_to_p():
    p = torch.tensor([[0.25, 0.75]])
    assert torch.equal(_residual(p, p), p)
    assert torch.equal(_residual(p, torch.tensor([[0.5, 0.5]])), torch.tensor([[0.0, 0.25]]))


# -- the whole decoder's distribution, on a model small enough to enumerate ---------------------

V, T = 8, 4  # 8 codebook entries, a 2x2 token grid: 4096 possible images
PROMPT, PAD, CFG = [1, 17, 33, 2], 0, 3.0
LONGER = [1, 40, 41, 42, 43, 2]  # batched with PROMPT, so that PROMPT's rows are left-padded


@pytest.fixture(scope="module")
def small():
    """tiny-janus-pro with an 8-entry codebook and 4 tokens per image; the image head's output layer
    scaled up so that the distributions are far from uniform and depend strongly on the tokens before."""
    base = preset("tiny-janus-pro")
    c = dataclasses.replace(base, vq=dataclasses.replace(base.vq, codebook_size=V, image_size=2 * base.vq.factor),
                            gen_head=dataclasses.replace(base.gen_head, image_token_size=V))
    model = random_model(c, seed=3)
    with torch.no_grad():
        model.gen_head.vision_head.weight.mul_(6.0)
    assert c.vq.n_tokens == T
    return model


def exact_joint(model, temperature=1.0, top_k=None) -> torch.Tensor:
    """(V,)*T: the probability of every image under ordinary sampling, by one full forward (no cache) of
    every token sequence."""
    ids, _ = cfg_rows([PROMPT], PAD)
    L = ids.shape[1]
    seqs = torch.cartesian_prod(*[torch.arange(V)] * T)  # (V^T, T)
    N = seqs.shape[0]
    with torch.no_grad():
        h = torch.cat([model.llm.embed_tokens(ids).repeat_interleave(N, 0),
                       model.gen_embeds(seqs[:, :T - 1]).repeat(2, 1, 1)], 1)
        hidden = model.llm(h, torch.arange(L + T - 1).expand(2 * N, -1))[:, L - 1:]
        logits = model.image_logits(hidden).float()
    g = logits[N:] + CFG * (logits[:N] - logits[N:])
    p = filter_logits(g / temperature, top_k, None).softmax(-1)  # (N, T, V)
    return p.gather(-1, seqs[..., None])[..., 0].prod(-1).reshape((V,) * T)


def pair_statistics(model, joint, n=5000, **kw) -> list[tuple[float, float]]:
    """SJD draws n images of PROMPT (left-padded: every other row is LONGER's); for each pair of
    neighbouring tokens, the chi-square statistic of their counts against the exact pair marginal, and
    its 3e-7 bound."""
    out = speculative_image_tokens(model, [PROMPT, LONGER] * n, pad_id=PAD, cfg_weight=CFG,
                                   generators=gens(11, 2 * n), **kw)
    x = out.tokens[0::2]
    res = []
    for j in range(T - 1):
        marginal = joint.sum(dim=tuple(d for d in range(T) if d not in (j, j + 1))).reshape(-1)
        counts = torch.bincount(x[:, j] * V + x[:, j + 1], minlength=V * V).float()
        stat, dof = chi2(counts, marginal)
        res.append((stat, chi2_bound(dof)))
    return res


@pytest.mark.parametrize("kw", [dict(window=4), dict(window=4, coupling=True), dict(window=2, coupling=True, top_k=5)])
def test_tokens_are_distributed_as_ordinary_sampling(small, kw):
    joint = exact_joint(small, top_k=kw.get("top_k"))
    assert math.isclose(float(joint.sum()), 1.0, rel_tol=1e-4)
    for stat, bound in pair_statistics(small, joint, **kw):
        assert stat < bound


@pytest.mark.parametrize("broken", ["keep every draft", "redraw a rejected draft from p, not the residual"])
def test_the_distribution_check_catches_a_broken_rule(small, monkeypatch, broken):
    """The same check fails by far when the acceptance rule is broken: the check has teeth."""
    joint = exact_joint(small)
    if broken == "keep every draft":
        monkeypatch.setattr(speculative, "_keep", lambda p, q, x, u: torch.ones_like(x, dtype=torch.bool))
    else:
        monkeypatch.setattr(speculative, "_residual", lambda p, q: p)
    stats = pair_statistics(small, joint, window=4)
    assert max(stat / bound for stat, bound in stats) > 4, stats


# -- exactness against ordinary sampling's own tokens ---------------------------------------------

@pytest.mark.parametrize("window", [2, 5, 64])
@pytest.mark.parametrize("coupling", [False, True])
def test_greedy_gives_the_ordinary_greedy_tokens(pipe, window, coupling):
    """temperature 0: p is one-hot, a draft stays only if it is the argmax, so SJD is Jacobi decoding
    and gives exactly the ordinary argmax tokens; prompts of different lengths (left padding), and with
    slack=0 (the cache compacted as soon as the holes of rejected drafts fill it)."""
    prompts = prompts_of(pipe, ["a cat", "a large red circle above a small blue square"])
    want = generate_image_tokens(pipe.model, prompts, pad_id=pipe.processor.pad_id, cfg_weight=3.0, temperature=0)
    for slack in (None, 0):
        got = speculative_image_tokens(pipe.model, prompts, pad_id=pipe.processor.pad_id, cfg_weight=3.0,
                                       temperature=0, window=window, coupling=coupling, slack=slack)
        assert torch.equal(got.tokens, want)
        assert (got.forwards <= N_TOK).all()


def test_window_one_is_ordinary_sampling_draw_for_draw(pipe):
    """No drafts: every round is one ordinary step drawing the same noise, so the same generators give
    ordinary sampling's tokens (with top-k and top-p too), in n_tokens forwards."""
    prompts = prompts_of(pipe, ["a cat", "a dog", "a large red circle above a small blue square"])
    kw = dict(pad_id=pipe.processor.pad_id, cfg_weight=[2.0, 5.0, 3.0], temperature=0.9, top_k=100, top_p=0.95)
    want = generate_image_tokens(pipe.model, prompts, generators=gens(4, 3), **kw)
    for coupling in (False, True):
        got = speculative_image_tokens(pipe.model, prompts, generators=gens(4, 3), window=1, coupling=coupling, **kw)
        assert torch.equal(got.tokens, want)
        assert got.forwards.tolist() == [N_TOK] * 3 and got.batch_forwards == N_TOK


@pytest.mark.parametrize("coupling", [False, True])
def test_an_image_depends_only_on_its_generator(pipe, coupling, monkeypatch):
    """Rows advance independently and draw a fixed amount per round: image 1 alone, or in a batch whose
    other images take other paths, or with the cache compacted along the way, is the same image."""
    prompts = prompts_of(pipe, ["a cat", "a large red circle above a small blue square", "a dog"])
    kw = dict(pad_id=pipe.processor.pad_id, cfg_weight=4.0, window=8, coupling=coupling)
    batch = speculative_image_tokens(pipe.model, prompts, generators=gens(9, 3), **kw)
    alone = speculative_image_tokens(pipe.model, prompts[1:2], generators=gens(9, 3)[1:2], **kw)
    compactions = []
    monkeypatch.setattr(speculative, "_compact", lambda *a: compactions.append(1) or _compact(*a))
    compacted = speculative_image_tokens(pipe.model, prompts, generators=gens(9, 3), slack=0, **kw)
    assert compactions  # the holes did fill the cache
    assert torch.equal(batch.tokens[1], alone.tokens[0])
    assert batch.forwards[1] == alone.forwards[0]
    assert torch.equal(compacted.tokens, batch.tokens)
    assert batch.batch_forwards == int(batch.forwards.max())
    again = speculative_image_tokens(pipe.model, prompts, generators=gens(9, 3), **kw)
    assert torch.equal(again.tokens, batch.tokens)


def test_a_confident_model_takes_fewer_forwards_than_tokens():
    """An image head that always puts ~all mass on token 7: every draft is kept, so after the prefill
    (token 0) each forward gives `window` tokens: 1 + ceil(63 / 8) = 9 forwards for 64 tokens."""
    p = januskit.load("tiny-janus-pro")
    head = p.model.gen_head.vision_head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[7] = 30.0
    out = speculative_image_tokens(p.model, prompts_of(p, ["a cat", "a dog"]), pad_id=p.processor.pad_id,
                                   cfg_weight=5.0, generators=gens(0, 2), window=8)
    assert (out.tokens == 7).all()
    assert out.forwards.tolist() == [9, 9] and out.batch_forwards == 9
    res = p.generate_images("a cat", n=2, speculative="mc-sjd", window=8)
    assert res.info["llm_forwards"] == [9, 9] and res.info["speculative"] == "mc-sjd" and res.info["window"] == 8


def test_compact_squeezes_out_holes_in_order():
    c = preset("tiny-janus-pro").llm
    cache = KVCache(c, 2, 8, torch.float32)
    for k, v in zip(cache.k, cache.v):
        k[:] = torch.arange(8.0)[:, None]  # a slot's keys hold its index
        v[:] = -torch.arange(8.0)[:, None]
    valid = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 0], [0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert _compact(cache, valid, 7) == 5
    assert valid.tolist() == [[False, True, True, True, True, False, False, False], [True] * 5 + [False] * 3]
    assert cache.k[0][0, 0, 1:5, 0].tolist() == [0, 1, 3, 6]  # row 0's visible slots, in order, right-aligned
    assert cache.k[0][1, 0, :5, 0].tolist() == [1, 2, 3, 4, 5]
    assert cache.v[1][1, 1, :5, 0].tolist() == [-1, -2, -3, -4, -5]


# -- the pipeline, the CLI, the evaluation ---------------------------------------------------------

def test_pipeline_reports_forwards_and_checks_options(pipe):
    plain = pipe.generate_images("a cat", n=2, seed=3)
    assert plain.info["llm_forwards"] == [N_TOK, N_TOK] and "speculative" not in plain.info
    one = pipe.generate_images("a cat", n=2, seed=3, speculative="sjd", window=1)
    assert torch.equal(one.tokens, plain.tokens)
    res = pipe.generate_images("a cat", n=2, seed=3, speculative="sjd")
    assert res.info["window"] == speculative.DEFAULT_WINDOW and len(res.info["llm_forwards"]) == 2
    with pytest.raises(ValueError, match="only speculative decoding"):
        pipe.generate_images("a cat", window=4)
    with pytest.raises(ValueError, match="speculative must be"):
        pipe.generate_images("a cat", speculative="jacobi")
    with pytest.raises(ValueError, match="window must be an integer"):
        pipe.generate_images("a cat", speculative="sjd", window=0)
    flow = januskit.load("tiny-janusflow")
    with pytest.raises(UnsupportedOption, match="speculative"):
        flow.generate_images("a cat", speculative="sjd", steps=2)


def test_cli_generate_and_eval_with_sjd(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-janus-pro", "a cat", "-n", "2", "--out", str(tmp_path), "--sjd",
                 "--sjd-window", "4", "--sjd-coupling", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["speculative"] == "mc-sjd" and info["window"] == 4 and len(info["llm_forwards"]) == 2
    assert all(16 <= f <= N_TOK for f in info["llm_forwards"])  # at most 4 tokens a forward
    with pytest.raises(SystemExit, match="need --sjd"):
        main(["generate", "--model", "tiny-janus-pro", "a cat", "--out", str(tmp_path), "--sjd-window", "4"])
    assert main(["generate", "--model", "tiny-janusflow", "a cat", "--steps", "2", "--out", str(tmp_path),
                 "--sjd"]) == 2
    assert "speculative" in capsys.readouterr().err


def test_eval_world_with_sjd(pipe):
    s = EvalSettings(images_per_prompt=1, prompts_per_category=1, questions_per_type=0, speculative="sjd", window=4)
    rep = evaluate(pipe, None, s)
    assert 16 <= rep.generation["llm_forwards_per_image"] <= N_TOK
    assert rep.settings["speculative"] == "sjd" and "sjd window 4" in format_report(rep)
