"""Online RL for image generation (januskit.train.rl): GRPO's parts against hand-computed values, the
teacher-forced log-probabilities against the sampler, rewards and prompt sources, and the [rl] stage end
to end on the tiny preset: it learns a toy reward, logs its metrics and resumes bit for bit."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import januskit
from januskit.train.config import RunConfig
from januskit.train.rl.grpo import GRPOLoss, group_advantages, image_token_logits, image_token_logprobs
from januskit.train.rl.prompts import FilePrompts, WorldPrompts, prompt_source
from januskit.train.rl.rewards import RewardPrompt, RewardSet, make_reward
from januskit.train.trainer import train
from januskit.sampling.image_ar import generate_image_tokens
from januskit.sampling.logits import row_generator
from januskit.world.dataset import held_out
from januskit.world.judge import detect, score
from januskit.world.prompts import Prompt, make_prompt, scene_for
from januskit.world.render import render

from train_helpers import PRESET, rl_config

DEFAULT_MODEL = Path(januskit.__file__).parent / "assets" / "default-model"
pytestmark = pytest.mark.filterwarnings("ignore:.*preset with RANDOM weights")


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4, eps=0.0)
    # group 1: mean 0.25, std sqrt(3)/4 -> (0.75, -0.25 x3) / 0.4330
    assert a[:4].tolist() == pytest.approx([3 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)])
    assert a[4:].tolist() == [0.0] * 4  # no signal in a group scored alike
    assert float(a[:4].sum()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_grpo_loss_surrogate_clip_and_kl():
    loss = GRPOLoss(clip=0.2, kl_weight=0.5)
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.25]])).requires_grad_()
    adv = torch.tensor([2.0, -1.0])
    # on-policy (old = lp), reference = policy: loss = -A per token, KL 0, nothing clipped
    per, st = loss(lp, lp.detach(), lp.detach(), adv)
    assert per.tolist() == pytest.approx([-2.0, 1.0]) and st["kl"].tolist() == [0.0, 0.0]
    per.sum().backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-1.0, -1.0, 0.5, 0.5])  # d(-A * ratio)/d lp / 2 tokens
    # ratio 1.5: clipped (no gradient) where A > 0, kept where A < 0 (the pessimistic bound)
    old = lp.detach() - math.log(1.5)
    per, st = loss(lp, old, lp.detach(), adv)
    assert st["clipped"].tolist() == [1.0, 0.0]
    assert per.tolist() == pytest.approx([-2.0 * 1.2, 1.5])
    # KL k3 estimator: exp(d) - d - 1 with d = ref - lp
    ref = lp.detach() + math.log(2.0)
    _, st = loss(lp, lp.detach(), ref, adv)
    assert st["kl"].tolist() == pytest.approx([2 - math.log(2) - 1] * 2)


@pytest.fixture(scope="module")
def pipe():
    p = januskit.load(PRESET, seed=3)
    return p


def test_teacher_forced_logits_are_the_samplers(pipe):
    """Greedy CFG decoding of left-padded prompts of different lengths; the teacher-forced guided logits
    pick every token the sampler picked, and log-probs of sampled tokens match a one-image recomputation."""
    m, proc = pipe.model, pipe.processor
    ids = [proc.generation_prompt("a red circle"), proc.generation_prompt("two blue squares above a green star")]
    assert len(ids[0]) != len(ids[1])
    toks = generate_image_tokens(m, ids, pad_id=proc.pad_id, cfg_weight=3.0, temperature=0)
    with torch.no_grad():
        logits = image_token_logits(m, ids, toks, pad_id=proc.pad_id, cfg_weight=3.0, mode="cfg")
    assert logits.shape == (2, m.config.vq.n_tokens, m.config.vq.codebook_size)
    assert torch.equal(logits.argmax(-1), toks)
    # sampled at temperature 0.7: each row's log-probs do not depend on the batch it is in
    gens = [row_generator(0, i) for i in range(2)]
    toks = generate_image_tokens(m, ids, pad_id=proc.pad_id, cfg_weight=3.0, temperature=0.7, generators=gens)
    with torch.no_grad():
        for mode in ("cfg", "cond"):
            both, ent = image_token_logprobs(m, ids, toks, pad_id=proc.pad_id, cfg_weight=3.0, temperature=0.7,
                                             mode=mode)
            one, _ = image_token_logprobs(m, ids[1:], toks[1:], pad_id=proc.pad_id, cfg_weight=3.0,
                                          temperature=0.7, mode=mode)
            assert torch.allclose(both[1], one[0], atol=1e-4), mode
            assert bool((both <= 0).all()) and bool((ent >= 0).all())
            assert float(ent.max()) <= math.log(m.config.vq.codebook_size) + 1e-4
    with pytest.raises(ValueError, match="logprob must be one of cfg, cond"):
        image_token_logits(m, ids, toks, pad_id=proc.pad_id, cfg_weight=3.0, mode="guided")


def test_world_reward_is_the_judge_and_rewards_combine():
    p = make_prompt("position", ("circle", "square"), ("red", "blue"), relation="left of")
    rp = RewardPrompt(p.text, {"prompt": p.to_json()})
    good = render(scene_for(p, np.random.default_rng(0)))
    other = Prompt.from_json(make_prompt("position", ("circle", "square"), ("red", "blue"), relation="right of").to_json())
    bad = render(scene_for(other, np.random.default_rng(0)))
    world = make_reward("world")
    assert world(rp, good) == 1.0 and world(rp, bad) == 0.0
    partial = make_reward("world_partial")
    assert partial(rp, good) == 1.0 and partial(rp, bad) == 0.5  # both objects there, wrong place
    blank = Image.new("RGB", good.size, "white")
    assert partial(rp, blank) == 0.0
    with pytest.raises(ValueError, match="needs the miniature world's structured prompt"):
        world(RewardPrompt(p.text), good)
    rs = RewardSet.from_table({"world": 2.0, "train_helpers:brightness": {"weight": 0.5}})
    total, each = rs([rp, rp], [good, blank])
    assert each["world"].tolist() == [1.0, 0.0] and each["train_helpers:brightness"][1] == 1.0
    assert total.tolist() == pytest.approx([2.0 + 0.5 * float(each["train_helpers:brightness"][0]), 0.5])
    for table, msg in (({"nope": 1}, "unknown reward 'nope'"), ({"os:nothing_here": 1}, "cannot be imported"),
                       ({"world": "x"}, "weight must be a number"), ({}, "at least one reward")):
        with pytest.raises(ValueError, match=msg):
            RewardSet.from_table(table)


def test_vqa_reward_reads_yes_against_no():
    """The chat judge on the shipped default model: P(yes) / (P(yes) + P(no)) of the first answer token
    (its spaced spelling " yes" is what the model says) is the answer_probabilities softmax, and each rendered
    object's own prompt gets the highest reward of the three."""
    pipe = januskit.load(DEFAULT_MODEL)
    r = make_reward("vqa", model=pipe, question="Is there {prompt} in the image?")
    objs = [("red", "circle"), ("blue", "square"), ("green", "triangle")]
    texts = [f"a {c} {s}" for c, s in objs]
    for c, s in objs:
        img = render(scene_for(make_prompt("colors", (s,), (c,)), np.random.default_rng(0)))
        v = [r(RewardPrompt(t), img) for t in texts]
        assert max(v) == v[texts.index(f"a {c} {s}")] and all(0 < x < 1 for x in v), (c, s, v)
    tok = pipe.processor.tokenizer
    y, n = tok.encode(" yes", add_bos=False), tok.encode(" no", add_bos=False)
    # the green triangle's own image and prompt (a reward near 0.76): an absent object's P(yes) is ~1e-4, where
    # batched and single-row logits differ by ~1e-3 relative
    p = pipe.answer_probabilities("Is there a green triangle in the image?", [img], y + n)
    assert r(RewardPrompt("a green triangle"), img) == pytest.approx(float(p[0] / (p[0] + p[1])), rel=1e-3)
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        pipe.answer_probabilities("hi", [], [10**9])
    with pytest.raises(ValueError, match="no spelling of 'zzqxj' is one token"):
        make_reward("vqa", model=pipe, yes="zzqxj")


def test_prompt_sources_are_pure_functions_of_the_index(tmp_path):
    w = WorldPrompts(seed=0)
    held = held_out()
    drawn = [w(i) for i in range(400)]
    assert [str(p) for p in drawn[:20]] == [str(w(i)) for i in range(20)]  # no hidden state
    cats = {p.meta["prompt"]["category"] for p in drawn}
    assert cats == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert not any(held.prompt_held_out(Prompt.from_json(p.meta["prompt"])) for p in drawn)
    only = WorldPrompts(seed=0, categories=["position"])
    assert {only(i).meta["prompt"]["category"] for i in range(50)} == {"position"}
    # colours with a relation, the README prompt's kind: canonical wording, never held out, true of its own scene
    cp = [WorldPrompts(seed=0, categories=["color_position"])(i) for i in range(200)]
    parsed = [Prompt.from_json(p.meta["prompt"]) for p in cp]
    assert {p.category for p in parsed} == {"color_position"} and len({str(p) for p in cp}) > 100
    assert not any(held.prompt_held_out(p) or held.mentioned_by(p) for p in parsed)
    rng = np.random.default_rng(0)
    assert all(score(p, detect(render(scene_for(p, rng)))) for p in parsed[:50])
    assert all(str(c) == p.text for c, p in zip(cp, parsed)) and str(cp[0]) == "a blue square to the right of a green circle"
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "meta": {"k": 1}}\n{"prompt": "a cow"}\n')
    fp = FilePrompts(f, seed=1)
    first, second = [str(fp(i)) for i in range(3)], [str(fp(i)) for i in range(3, 6)]
    assert sorted(first) == sorted(second) == ["a cat", "a cow", "a dog"]  # every prompt once a pass
    assert [fp(i).meta for i in range(3) if str(fp(i)) == "a dog"] == [{"k": 1}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        FilePrompts(bad)
    bad.write_text('{"prompt": "ok"}\n\n{"prompt": "x"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
        FilePrompts(bad)
    with pytest.raises(ValueError, match="valid are"):
        prompt_source("world", 0, ["nonsense"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        prompt_source(str(tmp_path / "missing.txt"), 0)


def test_rl_settings_refuse_bad_values(tmp_path):
    base = rl_config(tmp_path).to_dict()
    for key, value, msg in (("algorithm", "ppo", "algorithm must be one of"), ("group_size", 1, "group_size must be"),
                            ("logprob", "x", "logprob must be one of"), ("temperature", 0, "temperature must be > 0"),
                            ("clip", -1, "clip must be a finite number"), ("rewards", {}, "rewards must be")):
        d = json.loads(json.dumps(base))
        d["rl"][key] = value
        with pytest.raises(ValueError, match=msg):
            RunConfig.from_dict(d)


def test_grpo_under_fsdp_is_refused_before_loading(tmp_path):
    """Rollouts sample outside a training forward, where FSDP holds shards: refused with the way out, and
    nothing is written."""
    with pytest.raises(ValueError, match=r'parallel = "fsdp" with \[rl\] algorithm \'grpo\'.*use parallel = "ddp"'):
        train(rl_config(tmp_path / "run", parallel="fsdp"))
    assert not (tmp_path / "run").exists()


def test_one_grpo_update_moves_each_image_by_its_advantage(pipe):
    """One plain gradient step on the GRPO loss (on-policy, no KL) over four images of one prompt with
    advantages 1.5, 0.5, -0.5, -1.5: the best image's log-probability rises, the worst one's falls."""
    import copy

    from januskit.train.rl.grpo import GRPOObjective

    m = copy.deepcopy(pipe.model)
    proc = pipe.processor
    rows = [proc.generation_prompt("a red circle to the left of a blue square")] * 4
    gens = [row_generator(1, i) for i in range(4)]
    toks = generate_image_tokens(m, rows, pad_id=proc.pad_id, cfg_weight=2.0, temperature=1.0, generators=gens).clone()
    adv = torch.tensor([1.5, 0.5, -0.5, -1.5])
    for mode in ("cfg", "cond"):
        model = copy.deepcopy(m)
        obj = GRPOObjective(model, GRPOLoss(clip=0.2, kl_weight=0.0), pad_id=proc.pad_id, cfg_weight=2.0,
                            temperature=1.0, mode=mode)
        with torch.no_grad():
            before = obj.logprobs(rows, toks)[0].sum(-1)
        per_image, lp, _ = obj(rows, toks, adv, None, (torch.zeros(4, toks.shape[1]), None))
        assert torch.allclose(lp.sum(-1), before, atol=1e-4)  # old = current on the first update
        per_image.mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
            delta = obj.logprobs(rows, toks)[0].sum(-1) - before
        assert float(delta[0]) > 0 > float(delta[3]), (mode, delta.tolist())
        assert float(delta[0]) > float(delta[3])


def test_grpo_stage_runs_and_logs_its_metrics(tmp_path):
    """8 steps of 2 prompts x 4 images on the tiny preset: one metrics line a step with every metric,
    KL 0 at the first step and above it later, no clipping with one update per rollout, an exported model
    that generates, and the text head untouched (the RL stage trains what draws)."""
    out = train(rl_config(tmp_path / "run", steps=8, lr=3e-3, save_every=8))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 9))
    for k in ("reward", "reward_std", "reward_train_helpers:brightness", "kl", "clipped", "entropy", "flat_groups",
              "distinct", "loss", "lr", "grad_norm"):
        assert all(math.isfinite(m[k]) for m in lines), k
    assert all(m["images"] == 8 for m in lines)
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6) and lines[-1]["kl"] > 1e-4
    assert all(m["clipped"] == 0.0 for m in lines)  # one update per rollout: the ratio is 1
    trained = januskit.load(out)
    assert trained.generate_images("a red circle", n=1, seed=0).images[0].size[0] > 0
    start = januskit.load(PRESET, seed=0)
    head = "language_model.lm_head.weight"
    sd_a, sd_b = dict(trained.model.named_parameters()), dict(start.model.named_parameters())
    assert torch.equal(sd_a[head], sd_b[head])
    assert not torch.equal(sd_a["gen_head.output_mlp_projector.weight"], sd_b["gen_head.output_mlp_projector.weight"])


def test_rl_resume_after_a_kill_is_bit_identical(tmp_path, monkeypatch):
    """Killed after step 3 of 6 (checkpoints every 2), resumed: weights and metrics equal an uninterrupted
    run (inner_steps 2, so the ratio and its clip are exercised)."""
    from januskit.train.rl import loop

    cfg = dict(steps=6, save_every=2, rl={"inner_steps": 2})
    full = train(rl_config(tmp_path / "full", **cfg))
    real, calls = loop.rollout_tokens, [0]

    def dying(*a, **k):
        if calls[0] == 2:  # the third rollout starts step 5: steps 1-4 done, checkpoint at 4
            raise KeyboardInterrupt("simulated kill")
        calls[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(loop, "rollout_tokens", dying)
    with pytest.raises(KeyboardInterrupt):
        train(rl_config(tmp_path / "resumed", **cfg))
    monkeypatch.setattr(loop, "rollout_tokens", real)
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(rl_config(tmp_path / "resumed", **cfg))
    again = train(rl_config(tmp_path / "resumed", **cfg), resume=True)
    from safetensors.torch import load_file
    a, b = load_file(str(full / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(full / "metrics.jsonl") == strip(again / "metrics.jsonl")
    changed = dict(steps=6, save_every=2, rl={"inner_steps": 2, "kl_weight": 0.1})
    with pytest.raises(ValueError, match="cannot resume: the checkpoint's \\[rl\\] settings"):
        train(rl_config(tmp_path / "resumed", **changed), resume=True)


# -- Flow-GRPO --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory):
    from januskit.checkpoint.init import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("flow") / "ckpt", arch="janusflow", seed=0)


def test_sde_keeps_the_ode_marginal_on_a_gaussian_path():
    """On data x ~ N(0, 0.25 I), the exact velocity of the path z_s = s x + (1 - s) eps is linear in z; the
    SDE sampler with that velocity (noise level 0.7, 100 steps) ends with the data's variance, as the ODE
    (noise level ~0) does (both within 3%; Euler's own error shrinks with the steps), and its first step's
    noise is finite (s floored at 1/K)."""
    from januskit.train.rl.flow_grpo import sde_std, sde_step

    var_x = 0.25

    def u(z, s):  # E[x - eps | z] for Gaussian x: cov(x - eps, z) / var(z) * z
        var_z = s * s * var_x + (1 - s) ** 2
        return (s * var_x - (1 - s)) / var_z * z
    g = torch.Generator().manual_seed(0)
    K = 100
    for a in (1e-6, 0.7):
        z = torch.randn(200_000, generator=g)
        for k in range(K):
            mean, std = sde_step(z, u(z, k / K), k, K, a)
            z = mean + std * torch.randn(z.shape, generator=g)
        assert float(z.var()) == pytest.approx(var_x, rel=0.03), a
    assert math.isfinite(sde_std(0, K, 0.7)) and sde_std(K - 1, K, 0.7) < sde_std(1, K, 0.7)


def test_flow_trajectory_logprobs_match_the_sampler(flow_ckpt):
    """The rollout's transitions are Gaussian draws around the means `trajectory_logprobs` recomputes with
    gradients, whole-sequence (the rollout used the KV-cached path): standardised residuals have mean ~0 and
    std ~1, and with noise_level -> 0 the SDE rollout is the ODE sampler's own result."""
    from januskit.sampling.flow import generate_latents, initial_latents
    from januskit.train.rl.flow_grpo import rollout_trajectory, sde_std, trajectory_logprobs

    pipe = januskit.load(flow_ckpt)
    m, proc = pipe.model, pipe.processor
    rows = [proc.generation_prompt("a red circle"), proc.generation_prompt("two blue squares above a star")]
    gens = [row_generator(0, i) for i in range(2)]
    z0 = initial_latents(m.config.latent_shape, [row_generator(0, i) for i in range(2)])
    traj = rollout_trajectory(m, rows, z0, steps=4, cfg_weight=2.0, noise_level=0.7, generators=gens)
    assert traj.shape == (2, 5, *m.config.latent_shape) and torch.equal(traj[:, 0], z0)
    with torch.no_grad():
        lp, mean = trajectory_logprobs(m, rows, traj, cfg_weight=2.0, noise_level=0.7)
    assert lp.shape == (2, 4) and mean.shape == (2, 4, *m.config.latent_shape)
    for k in range(4):
        r = (traj[:, k + 1] - mean[:, k]) / sde_std(k, 4, 0.7)
        assert abs(float(r.mean())) < 0.05 and float(r.std()) == pytest.approx(1.0, abs=0.05), k
    ode = generate_latents(m, rows, z0, steps=4, cfg_weight=2.0)
    quiet = rollout_trajectory(m, rows, z0, steps=4, cfg_weight=2.0, noise_level=1e-6,
                               generators=[row_generator(0, i) for i in range(2)])
    # with a -> 0 the drift correction and noise vanish (up to the floored first step's a^2 / (2 ds) term)
    assert torch.allclose(quiet[:, -1], ode, atol=1e-4)


def test_flow_grpo_stage_runs_and_resumes(tmp_path, flow_ckpt, monkeypatch):
    """flow_grpo on the tiny JanusFlow folder (its VAE scores the images): metrics, the exact KL starting
    at 0, and a killed-and-resumed run equal to an uninterrupted one; Janus models are refused clearly."""
    from januskit.train.rl import loop

    def cfg(out, steps=4):
        d = rl_config(out, steps=steps, save_every=2, rl={"algorithm": "flow_grpo", "sde_steps": 3}).to_dict()
        d["model"]["source"] = str(flow_ckpt)
        d["stage"]["name"] = "janusflow/rl"
        return RunConfig.from_dict(d)
    full = train(cfg(tmp_path / "full"))
    lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[0]["kl"] == 0.0 and lines[-1]["kl"] > 0 and lines[0]["distinct"] == 1.0
    real, calls = loop.rollout_trajectory, [0]

    def dying(*a, **k):
        if calls[0] == 2:
            raise KeyboardInterrupt("simulated kill")
        calls[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(loop, "rollout_trajectory", dying)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "resumed"))
    monkeypatch.setattr(loop, "rollout_trajectory", real)
    again = train(cfg(tmp_path / "resumed"), resume=True)
    from safetensors.torch import load_file
    a, b = load_file(str(full / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    d = cfg(tmp_path / "x").to_dict()
    d["model"]["source"] = PRESET
    with pytest.raises(ValueError, match="'flow_grpo' is for JanusFlow; tiny-janus-pro is janus"):
        train(RunConfig.from_dict(d))


def test_ddp_splits_the_groups_across_ranks_as_one_process_would(tmp_path):
    """Two DDP ranks (one group each) against one process (both groups): the same images and rewards,
    and the same weights to float tolerance (gradients averaged over all ranks' images)."""
    from safetensors.torch import load_file

    from januskit.train import parallel

    one = train(rl_config(tmp_path / "one", steps=3, save_every=3, threads=1))
    parallel.spawn(train, 2, rl_config(tmp_path / "two", steps=3, save_every=3, parallel="ddp", threads=1))
    two = tmp_path / "two"
    ma = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ma, mb, strict=True):
        assert (x["distinct"], x["images"]) == (y["distinct"], y["images"])
        assert y["reward"] == pytest.approx(x["reward"], rel=1e-12)  # the same images (sums in another order)
        assert y["kl"] == pytest.approx(x["kl"], rel=1e-3, abs=1e-7)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    start = januskit.load(PRESET, seed=0).model.state_dict()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a if k in start)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5 < moved / 100, (worst, moved)


# -- DPO ---------------------------------------------------------------------------------------------

def _pairs_file(tmp_path, n_tok: int, codebook: int) -> Path:
    g = torch.Generator().manual_seed(0)
    lines = []
    for k in range(4):
        c, r = torch.randint(0, codebook, (2, n_tok), generator=g).tolist()
        lines.append({"kind": "preference", "prompt": f"picture {k}", "chosen_vq_ids": c, "rejected_vq_ids": r})
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "blue.png")
    lines.append({"kind": "preference", "prompt": "a red square", "chosen": "red.png", "rejected": "blue.png"})
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return f


def test_dpo_prefers_the_chosen_images(tmp_path):
    """DPO on five pairs (four as VQ ids, one as image files): the implicit reward margin starts at 0 and
    grows, preference accuracy reaches 1, and the trained model's own log p(chosen) - log p(rejected) rises
    for every pair against the initial model's."""
    from januskit.train.rl.dpo import DPOObjective, read_pairs

    c = januskit.load(PRESET, seed=0).config
    f = _pairs_file(tmp_path, c.vq.n_tokens, c.vq.codebook_size)
    d = rl_config(tmp_path / "run", steps=12, prompts_per_step=5, lr=3e-3, save_every=12,
                  rl={"algorithm": "dpo", "pairs": str(f), "dpo_beta": 0.1}).to_dict()
    out = train(RunConfig.from_dict(d))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["margin"] == pytest.approx(0.0, abs=1e-4) and lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert lines[-1]["margin"] > 0.5 and lines[-1]["accuracy"] == 1.0 and lines[-1]["loss"] < lines[0]["loss"]
    pairs, root = read_pairs(f)
    before, after = januskit.load(PRESET, seed=0), januskit.load(out)
    for pipe in (before, after):
        pipe.model.gen_vision_model = before.model.gen_vision_model  # the VQ is frozen: same tokens both times
    from januskit.train.rl.dpo import _tokens
    gaps = []
    for pipe in (before, after):
        obj = DPOObjective(pipe.model, pad_id=pipe.processor.pad_id, beta=0.1)
        ids = [pipe.processor.generation_prompt(p.prompt) for p in pairs]
        with torch.no_grad():
            gaps.append(obj.logprobs(ids, _tokens(pipe.model, pairs, root, "chosen"))
                        - obj.logprobs(ids, _tokens(pipe.model, pairs, root, "rejected")))
    assert bool((gaps[1] > gaps[0]).all()), gaps


def test_dpo_pairs_are_validated_with_file_and_line(tmp_path):
    from januskit.train.data.records import DataError
    from januskit.train.rl.dpo import read_pairs

    cases = [('{"kind": "generation", "caption": "x"}', 'expected an object with "kind": "preference"'),
             ('{"kind": "preference", "prompt": "", "chosen": "a.png", "rejected": "b.png"}', "'prompt' must be"),
             ('{"kind": "preference", "prompt": "x", "chosen": "a.png"}', "exactly one of 'rejected'"),
             ('{"kind": "preference", "prompt": "x", "chosen": "../a.png", "rejected": "b.png"}', "contains '..'"),
             ('{"kind": "preference", "prompt": "x", "chosen": "/etc/passwd", "rejected": "b.png"}', "is absolute"),
             ('{"kind": "preference", "prompt": "x", "chosen_vq_ids": [1, 2], "rejected": "b.png"}', "has 2 ids"),
             ('{"kind": "preference", "prompt": "x", "chosen_vq_ids": [1, 99999], "rejected": "b.png"}',
              r"must lie in \[0, 512\)"),
             ("not json", "malformed JSON")]
    for k, (line, msg) in enumerate(cases):
        f = tmp_path / f"p{k}.jsonl"
        f.write_text('{"kind": "preference", "prompt": "ok", "chosen": "a.png", "rejected": "b.png"}\n' + line + "\n")
        with pytest.raises(DataError, match=msg) as e:
            read_pairs(f, n_tokens=2 if "[1, 99999]" in line else 64, codebook=512)
        assert f"p{k}.jsonl:2" in str(e.value)
    d = rl_config(tmp_path / "run", rl={"algorithm": "dpo"}).to_dict()
    with pytest.raises(ValueError, match='needs pairs = "path/to/pairs.jsonl"'):
        train(RunConfig.from_dict(d))


def test_world_rl_recipe_end_to_end(tmp_path):
    """`januskit world rl` in miniature on the shipped model (2 steps of 2 prompts x 2 images, a checkpoint a
    step, a small eval): the run, the val curve at steps 0, 1, 2, the before/after report with the README
    command's verdicts and diversity, both grids and the curve plot; a rerun reuses everything."""
    from januskit.eval.world import EvalSettings
    from januskit.recipes.rl_world import RLPlan, run

    plan = RLPlan(steps=2, prompts_per_step=2, group_size=2, eval_every=1, val_prompts_per_category=1, threads=1)
    small = EvalSettings(images_per_prompt=2, prompts_per_category=1, questions_per_type=2)
    rep = run(DEFAULT_MODEL, tmp_path, plan, eval_settings=small)
    curve = [json.loads(x) for x in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [0, 1, 2] and all(0 <= c["val_geneval"] <= 1 for c in curve)
    for side in ("before", "after"):
        r = rep[side]
        assert len(r["readme"]) == 4 and set(r["categories"]) >= {"single_object", "position"}
        assert 0 < r["diversity"]["distinct_images"] <= 1 and 0 <= r["diversity"]["token_difference"] <= 1
        assert (tmp_path / f"grid-{side}.png").is_file()
    assert (tmp_path / "curve.png").is_file() and (tmp_path / "rl" / "reward.png").is_file()
    stamp = (tmp_path / "report.json").stat().st_mtime_ns
    assert run(DEFAULT_MODEL, tmp_path, plan, eval_settings=small) == rep
    assert (tmp_path / "report.json").stat().st_mtime_ns == stamp


class _MeanColour(torch.nn.Module):
    """A 'classifier' of the image's dominant channel: logits = 10 x mean of R, G, B."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * x.mean(dim=(2, 3))


def test_classifier_reward_is_the_class_probability(tmp_path):
    path = tmp_path / "clf.pt2"
    torch.export.save(torch.export.export(_MeanColour(), (torch.zeros(1, 3, 16, 16),)), str(path))
    r = make_reward("classifier", model=str(path), label="red", classes=["red", "green", "blue"], size=16)
    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    expect = float(torch.tensor([10.0, 0.0, 0.0]).softmax(-1)[0])
    assert r(RewardPrompt("x"), red) == pytest.approx(expect, rel=1e-5)
    assert r(RewardPrompt("x"), blue) == pytest.approx(float(torch.tensor([0.0, 0.0, 10.0]).softmax(-1)[0]), rel=1e-5)
    by_index = make_reward("classifier", model=str(path), label=2, size=16)
    assert by_index(RewardPrompt("x"), blue) == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError, match="label 'cat' is not in classes"):
        make_reward("classifier", model=str(path), label="cat", classes=["red"])
    with pytest.raises(ValueError, match="class index 7 but the model gives 3 logits"):
        make_reward("classifier", model=str(path), label=7, size=16)(RewardPrompt("x"), red)
    with pytest.raises(ValueError, match="must be a torch.export file"):
        make_reward("classifier", model=str(tmp_path / "clf.pt"), label=0)


def test_grpo_with_lora_trains_the_adapters_against_the_base(tmp_path):
    """[lora] enabled: the reference is the base model (adapters switched off, no copy), so the KL starts at 0
    and grows; the adapters move and the export is the merged model, which differs from the base."""
    from train_helpers import DIST_LORA

    out = train(rl_config(tmp_path / "lora", steps=4, lr=1e-2, save_every=2, lora=DIST_LORA))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-7) and lines[-1]["kl"] > 0
    from januskit.train.checkpoints import list_checkpoints
    assert (list_checkpoints(out / "checkpoints")[-1][1] / "adapter_model.safetensors").is_file()
    merged, base = januskit.load(out).model.state_dict(), januskit.load(PRESET, seed=0).model.state_dict()
    changed = [k for k in base if k in merged and not torch.equal(merged[k], base[k])]
    assert changed and all(k.startswith(("language_model.", "gen_", "aligner")) for k in changed), changed


def test_world_rl_plan_becomes_the_run_config_of_either_architecture(flow_ckpt, tmp_path):
    """RLPlan -> RunConfig: prompt categories (a repeated one drawn more often), weighted rewards and the rollout
    CFG pass through; a Janus source gets GRPO on `janus-pro/rl`, a JanusFlow one Flow-GRPO on `janusflow/rl`
    with the plan's SDE settings; the CLI's NAME=WEIGHT options are checked."""
    from januskit.cli import _weighted
    from januskit.recipes.rl_world import RLPlan, rl_run_config

    plan = RLPlan(steps=3, categories=("position", "position", "colors"), cfg_weight=3.0, sde_steps=4,
                  rewards=(("world", 0.7), ("world_partial", 0.3)), logprob="cond", autocast="none")
    cfg = rl_run_config(plan, DEFAULT_MODEL, tmp_path / "a")
    assert (cfg.stage.name, cfg.rl.algorithm, cfg.rl.logprob) == ("janus-pro/rl", "grpo", "cond")
    assert cfg.rl.prompt_categories == ["position", "position", "colors"] and cfg.rl.cfg_weight == 3.0
    assert cfg.rl.rewards == {"world": 0.7, "world_partial": 0.3} and cfg.train.autocast == "none"
    prompts = WorldPrompts(seed=0, categories=cfg.rl.prompt_categories)
    cats = [prompts(i).meta["prompt"]["category"] for i in range(300)]
    assert set(cats) == {"position", "colors"} and 150 < cats.count("position") < 250  # 2 : 1
    flow = rl_run_config(plan, flow_ckpt, tmp_path / "b", autocast="bf16")
    assert (flow.stage.name, flow.rl.algorithm, flow.rl.sde_steps) == ("janusflow/rl", "flow_grpo", 4)
    assert flow.train.autocast == "bf16" and flow.rl.noise_level == plan.noise_level
    assert _weighted(["world=2", "world_partial"], "--reward") == (("world", 2.0), ("world_partial", 1.0))
    with pytest.raises(SystemExit, match=r"--reward 'world=x': the weight after '=' is not a number"):
        _weighted(["world=x"], "--reward")


def test_world_rl_recipe_runs_flow_grpo_on_a_janusflow_model(flow_ckpt, tmp_path):
    """`januskit world rl` from a JanusFlow folder: Flow-GRPO steps, the report with pixel-based diversity."""
    from januskit.eval.world import EvalSettings
    from januskit.recipes.rl_world import RLPlan, run

    plan = RLPlan(steps=1, prompts_per_step=2, group_size=2, eval_every=1, val_prompts_per_category=1, threads=1,
                  sde_steps=2, autocast="none")
    small = EvalSettings(images_per_prompt=2, prompts_per_category=1, questions_per_type=1, steps=2)
    rep = run(flow_ckpt, tmp_path, plan, eval_settings=small)
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["images"] == 4
    assert json.loads((tmp_path / "rl" / "run_config.json").read_text())["rl"]["algorithm"] == "flow_grpo"
    for side in ("before", "after"):
        d = rep[side]["diversity"]
        assert d["distinct_images"] == 1.0 and 0 < d["token_difference"] <= 1  # random weights: noisy, all distinct
