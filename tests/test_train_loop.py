"""Training on CPU with the tiny preset: stage table and freezing, the loss against a hand computation,
exact resume, crash safety of checkpoints, the exported folder, configs and CLI, and overfitting a
handful of samples until greedy decoding reproduces them."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import januskit
import januskit.models.llama as models_llama
import januskit.train.trainer as trainer
from januskit.checkpoint.init import random_model
from januskit.config import preset
from januskit.train.data.batch import IGNORE, TrainBatch
from januskit.train.config import RunConfig, load_run_config
from januskit.train.losses import batch_loss, batch_losses
from januskit.train.plot import read_metrics
from januskit.train.stages import ALWAYS_FROZEN, STAGES, apply_stage, get_stage, lr_multiplier
from januskit.train.data.synthetic import SyntheticData
from januskit.train.checkpoints import list_checkpoints
from januskit.train.trainer import train
from reference_helpers import greedy_answer
from train_helpers import PRESET, Repeat, crash_after, pack_by_hand, run_config

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture(scope="module")
def cfg_tiny():
    return preset(PRESET)


def tiny_model(seed: int = 0):
    return random_model(preset(PRESET), seed).train()


def synthetic(c, ratio=(1, 1, 1), rows=3, seq_len=256, seed=0) -> SyntheticData:
    return SyntheticData(micro_batch_size=rows, seq_len=seq_len, ratio=ratio, seed=seed, vocab_size=c.llm.vocab_size,
                         codebook_size=c.vq.codebook_size, n_und_tokens=c.vision.n_tokens, n_gen_tokens=c.vq.n_tokens,
                         image_size=c.vision.image_size, text_len=(4, 16))


def all_kinds_batch(c) -> TrainBatch:
    """A synthetic micro-batch that holds understanding, text and generation samples."""
    data = synthetic(c)
    for i in range(50):
        b = data.make(i)
        if {0, 1, 2} <= set(b.kinds.unique().tolist()):
            return b
    raise AssertionError("no synthetic batch with all three kinds")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def deterministic(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in trainer.TIMING_KEYS} for m in metrics]


# ---------------------------------------------------------------------------------------------
# Stage table, schedule, freezing

# The papers' numbers: (lr, schedule, wd, warmup, steps, batch, ratio und:text:gen, trainable parts).
PAPER = {
    "janus/1": (1e-3, "cosine", 0.0, 300, 10_000, 256, (1, 0, 1), "I"),
    "janus/2": (1e-4, "constant", 0.0, 5000, 180_000, 512, (2, 3, 5), "II"),
    "janus/3": (2e-5, "constant", 0.1, 0, 24_000, 256, (7, 3, 10), "III"),
    "janus-pro/1": (1e-3, "constant", 0.0, 600, 20_000, 256, (1, 0, 3), "I"),
    "janus-pro/2": (1e-4, "constant", 0.0, 5000, 270_000, 512, (2, 3, 5), "II"),  # 360K planned, stopped at 270K
    "janus-pro/3": (4e-5, "constant", 0.0, 0, 80_000, 128, (5, 1, 4), "III"),
    "janus-pro-7b/3": (4e-5, "constant", 0.0, 0, 40_000, 128, (5, 1, 4), "III"),
    # JanusFlow Table 1 (its ratio column is und:gen:text: 50:50:0, 30:50:20 first 10K, 14:80:6, 21:70:9)
    "janusflow/1": (1e-4, "constant", 0.0, 2000, 10_000, 512, (50, 0, 50), "F1"),
    "janusflow/2-early": (1e-4, "constant", 0.0, 2000, 10_000, 512, (30, 20, 50), "F2"),
    "janusflow/2": (1e-4, "constant", 0.0, 2000, 390_000, 512, (14, 6, 80), "F2"),
    "janusflow/3": (2e-5, "constant", 0.0, 1000, 26_000, 256, (21, 9, 70), "F3"),
}
PARTS = {"I": {"aligner", "gen_aligner", "gen_head", "gen_embed"},
         "II": {"aligner", "gen_aligner", "gen_head", "gen_embed", "language_model"},
         "III": {"aligner", "gen_aligner", "gen_head", "gen_embed", "language_model", "vision_model"}}
_F1 = {"vision_und_enc_aligner", "vision_gen_enc_model", "vision_gen_enc_aligner", "vision_gen_dec_model",
       "vision_gen_dec_aligner_norm", "vision_gen_dec_aligner", "repa_head"}
PARTS.update(F1=_F1, F2=_F1 | {"language_model"}, F3=_F1 | {"language_model", "vision_und_enc_model"})


RL_STAGES = {"janus-pro/rl", "janusflow/rl"}  # januskit's own (online RL, januskit.train.rl): not in the papers


def test_stage_table_matches_the_papers():
    assert set(STAGES) == set(PAPER) | RL_STAGES
    for name, (lr, sched, wd, warm, steps, batch, ratio, kind) in PAPER.items():
        s = get_stage(name)
        assert (s.lr, s.schedule, s.weight_decay, s.warmup, s.steps, s.batch_size, tuple(s.ratio)) == \
               (lr, sched, wd, warm, steps, batch, ratio), name
        assert s.betas == (0.9, 0.95) and s.grad_clip == 1.0
        assert set(s.trainable) == PARTS[kind]
    assert get_stage("janus-pro/2").horizon == 360_000
    with pytest.raises(KeyError, match="valid stages"):
        get_stage("janus-pro/4")


def test_scale_and_lr_schedule():
    s = get_stage("janus/1").scaled(0.01)  # 100 steps, 3 warm-up, batch 3 (rounded)
    assert (s.steps, s.warmup, s.batch_size, s.lr) == (100, 3, 3, 1e-3)
    assert [lr_multiplier(i, s) for i in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_multiplier(3, s) == pytest.approx(1.0)
    assert lr_multiplier(3 + 97 // 2, s) == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 97)))
    assert lr_multiplier(99, s) == pytest.approx(0.5 * (1 + math.cos(math.pi * 96 / 97)))
    p = get_stage("janus-pro/2").scaled(0.001)
    assert (p.steps, p.warmup, p.batch_size) == (270, 5, 1)
    assert [lr_multiplier(i, p) for i in (0, 4, 5, 269)] == [0.2, 1.0, 1.0, 1.0]
    assert get_stage("janus/3").scaled(1) is get_stage("janus/3")


@pytest.mark.parametrize("name", sorted(n for n in PAPER if not n.startswith("janusflow")))  # flow: test_train_flow
def test_apply_stage_freezes_exactly_the_intended_parts(name, cfg_tiny):
    model = tiny_model()
    counts = apply_stage(model, get_stage(name))
    want = PARTS[PAPER[name][-1]]
    assert not want & set(ALWAYS_FROZEN)
    for n, p in model.named_parameters():
        assert p.requires_grad == (n.split(".")[0] in want), n
    assert {k for k, (t, _) in counts.items() if t} == want
    assert counts["gen_vision_model"][0] == 0 and counts["gen_vision_model"][1] > 0

    batch_losses(model, all_kinds_batch(cfg_tiny)).total.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} trains but got no gradient"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"


def test_rl_stage_trains_what_draws_and_not_the_text_head():
    model = tiny_model()
    apply_stage(model, get_stage("janus-pro/rl"))
    for n, p in model.named_parameters():
        draws = n.startswith(("gen_aligner.", "gen_head.", "gen_embed.", "language_model.model."))
        assert p.requires_grad == draws, n
    s = get_stage("janus-pro/rl")
    assert (s.lr, s.schedule, s.warmup, s.ratio) == (1e-5, "constant", 0, (0, 0, 1))


def test_vq_can_never_be_trained():
    bad = dataclasses.replace(get_stage("janus-pro/3"), trainable=("aligner", "gen_vision_model.decoder"))
    with pytest.raises(ValueError, match="frozen"):
        apply_stage(tiny_model(), bad)
    typo = dataclasses.replace(get_stage("janus-pro/3"), trainable=("aligners",))
    with pytest.raises(ValueError, match="match no parameter"):
        apply_stage(tiny_model(), typo)


# ---------------------------------------------------------------------------------------------
# Losses

def _hand_sample_ce(model, s: dict) -> tuple[list[float], list[float]]:
    """Token CEs of one sample run ALONE through the cache-free plain-causal forward, log-softmax by hand."""
    ids = torch.tensor(s["ids"])[None]
    h = model.text_embeds(ids).clone()
    if s.get("und"):
        h[0, s["und"]] = model.image_embeds(s["pixels"][None])[0]
    if s.get("gen"):
        slots = list(s["gen"])
        h[0, slots] = model.gen_embeds(torch.tensor([s["gen"][j] for j in slots]))
    hidden = model.llm(h, torch.arange(ids.shape[1])[None])[0]
    text = [-torch.log_softmax(model.text_logits(hidden[j]), -1)[v].item() for j, v in s.get("text", {}).items()]
    image = [-torch.log_softmax(model.image_logits(hidden[j]), -1)[v].item() for j, v in s.get("image", {}).items()]
    return text, image


@torch.no_grad()
def test_loss_equals_hand_computation_and_ignores_unlabelled_slots(cfg_tiny):
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    n_und, V, K = cfg_tiny.vision.n_tokens, cfg_tiny.llm.vocab_size, cfg_tiny.vq.codebook_size
    r = lambda n, hi: torch.randint(3, hi, (n,), generator=g).tolist()  # noqa: E731
    und_ids = [1, 5] + [7] * n_und + [6] + r(9, V)  # image, then 5 question + 4 answer tokens
    und = {"ids": und_ids, "und": list(range(2, 2 + n_und)), "pixels": torch.randn(3, 128, 128, generator=g),
           "text": {j: und_ids[j + 1] for j in range(len(und_ids) - 5, len(und_ids) - 1)}, "kind": 0}
    vq = r(6, K)
    gen_ids = [1] + r(4, V) + [9] + [0] * 6  # prompt, <boi>, 6 image tokens
    gen = {"ids": gen_ids, "gen": {6 + j: vq[j] for j in range(6)}, "image": {5 + j: vq[j] for j in range(6)},
           "kind": 2}
    txt_ids = r(12, V)
    txt = {"ids": txt_ids, "text": {j: txt_ids[j + 1] for j in range(11)}, "kind": 1}
    batch = pack_by_hand([[und, gen], [txt]], T=len(und_ids) + len(gen_ids) + 5)  # two packed + padding

    sums = batch_losses(model, batch)
    hand = {k: _hand_sample_ce(model, s) for k, s in (("und", und), ("gen", gen), ("text", txt))}
    every = [x for t, i in hand.values() for x in t + i]
    assert sums.count.tolist() == [4, 11, 6, 0]  # und, text, gen, edit
    assert sums.total.item() == pytest.approx(sum(every), rel=1e-5)
    loss, per = batch_loss(model, batch)
    assert loss.item() == pytest.approx(sum(every) / len(every), rel=1e-5)
    assert per["und"] == pytest.approx(np.mean(hand["und"][0]), rel=1e-5)
    assert per["text"] == pytest.approx(np.mean(hand["text"][0]), rel=1e-5)
    assert per["gen"] == pytest.approx(np.mean(hand["gen"][1]), rel=1e-5)

    # Slots with -100 contribute nothing: unlabel the text sample -> exactly its CEs disappear.
    batch.text_labels[1] = IGNORE
    s2 = batch_losses(model, batch)
    assert s2.count.tolist() == [4, 0, 6, 0]
    assert s2.total.item() == pytest.approx(sum(every) - sum(hand["text"][0]), rel=1e-5)
    # ... and what sits at unlabelled slots never matters: scribble over the padding inputs.
    pad = batch.doc_ids == -1
    batch.input_ids[pad] = 123
    assert batch_losses(model, batch).total.item() == pytest.approx(s2.total.item(), rel=1e-6)


def test_unused_branches_get_zero_not_missing_gradients(cfg_tiny):
    """A text-only batch still gives every trainable part a gradient tensor (zeros off its path):
    DDP buckets and FSDP reduce-scatters need the same parameters on every rank."""
    model = tiny_model()
    apply_stage(model, get_stage("janus-pro/3"))
    batch = synthetic(cfg_tiny, ratio=(0, 1, 0)).make(0)
    batch_losses(model, batch).total.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            if n.startswith(("vision_model", "aligner", "gen_embed", "gen_aligner", "gen_head")):
                assert p.grad.abs().sum() == 0, n


# ---------------------------------------------------------------------------------------------
# The loop: resume, crash safety, export

STEPS = 6


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted reference run: 6 steps, checkpoints every 2."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return train(run_config(out, steps=STEPS))


def test_straight_run_outputs(straight):
    metrics = read_metrics(straight / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["loss_tokens"] > 0 and 0 < m["packing"] <= 1
    assert metrics[0]["lr"] == pytest.approx(1e-3)  # warm-up 1: full LR from the first step
    assert [s for s, _ in list_checkpoints(straight / "checkpoints")] == [4, 6]  # keep_last 2
    png = Image.open(straight / "loss.png")
    assert png.format == "PNG" and png.size == (800, 480)
    assert json.loads((straight / "run_config.json").read_text())["stage"]["name"] == "janus-pro/3"


def test_output_folder_loads_and_equals_trained_weights(straight):
    last = weights(straight / "checkpoints" / f"step-{STEPS:08d}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = januskit.load(straight, dtype="float32")
    sd = pipe.model.state_dict()
    assert set(sd) == set(last)
    for k, v in last.items():
        assert torch.equal(sd[k], v), k
    start = random_model(preset(PRESET), 0).state_dict()
    assert not torch.equal(sd["gen_head.vision_head.weight"], start["gen_head.vision_head.weight"])
    vq = "gen_vision_model.quantize.embedding.weight"
    assert torch.equal(sd[vq], start[vq])  # frozen
    assert pipe.chat("hi", max_new_tokens=3) == greedy_answer(pipe, "hi", 3)


def test_resume_is_exact_and_ignores_uncommitted_checkpoints(straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = run_config(out, steps=STEPS)
    with monkeypatch.context() as m:
        crash_after(m, 3)  # steps 1-3 done, checkpoint at 2, killed during step 4
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]
    assert len(read_metrics(out / "metrics.jsonl")) == 3
    with pytest.raises(FileExistsError, match="resume"):
        train(cfg)
    # A newer folder without its commit marker (a writer killed before DONE) must be ignored.
    fake = out / "checkpoints" / "step-00000004"
    shutil.copytree(out / "checkpoints" / "step-00000002", fake)
    (fake / "DONE").unlink()
    (fake / "model.safetensors").write_bytes(b"garbage")
    (out / "checkpoints" / ".step-00000004.tmpxyz").mkdir()  # and a leftover temporary folder

    train(cfg, resume=True)
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert deterministic(read_metrics(out / "metrics.jsonl")) == deterministic(read_metrics(straight / "metrics.jsonl"))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4, 6]
    assert not [d for d in (out / "checkpoints").iterdir() if d.name.startswith(".")]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = run_config(out, steps=STEPS)
    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **k):
        if Path(f).name == "trainer.pt":
            calls.append(f)
            if len(calls) == 2:  # the step-4 checkpoint: model and optimizer written, then the disk fills
                raise OSError("No space left on device (simulated)")
        return real_save(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", failing_save)
        with pytest.raises(OSError, match="simulated"):
            train(cfg)
    ckpts = out / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [2]
    assert sorted(d.name for d in ckpts.iterdir()) == ["step-00000002"]  # the partial step-4 was removed
    manifest = json.loads((ckpts / "step-00000002" / "DONE").read_text())
    assert manifest["step"] == 2 and set(manifest["files"]) >= {"model.safetensors", "optimizer.pt", "trainer.pt"}

    train(cfg, resume=True)
    a, b = weights(straight), weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_per_step_source_equals_micro_batch_source(tmp_path, cfg_tiny):
    """A data source that yields a whole step (4 rows, split by the trainer) trains like one that
    yields the same rows as 4 micro-batches: the loss divisor is the step's token count either way."""
    rows = synthetic(cfg_tiny, rows=1, seq_len=192)

    class PerStep:
        per_step = True

        def __init__(self):
            self.i = 0

        def __iter__(self):
            while True:
                bs = [rows.make(4 * self.i + j) for j in range(4)]
                self.i += 1
                yield TrainBatch(**{f: (torch.cat([b.pixel_values for b in bs if b.pixel_values is not None])
                                        if any(b.pixel_values is not None for b in bs) else None)
                                    if f == "pixel_values" else
                                    (None if getattr(bs[0], f) is None else torch.cat([getattr(b, f) for b in bs]))
                                    for f in TrainBatch.__dataclass_fields__})

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, s):
            self.i = s["i"]

    # Stage II: SigLIP frozen. Its key bias has an exactly-zero true gradient (softmax ignores it), which
    # Adam would turn into lr-sized steps of rounding noise that differ between summation orders.
    a = train(run_config(tmp_path / "a", steps=3, stage="janus-pro/2"), data=rows)
    b = train(run_config(tmp_path / "b", steps=3, stage="janus-pro/2", micro_batch_size=2),  # 2 x 2 rows
              data=PerStep())
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


def test_gradient_checkpointing_and_bf16_autocast(tmp_path):
    a = train(run_config(tmp_path / "a", steps=2))
    b = train(run_config(tmp_path / "b", steps=2, gradient_checkpointing=True))
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    c = train(run_config(tmp_path / "c", steps=2, autocast="bfloat16"))
    ma, mc = read_metrics(a / "metrics.jsonl"), read_metrics(c / "metrics.jsonl")
    # Step 1: same weights, bf16 matmuls; step 2: after one bf16-autocast update. bf16 keeps 8 mantissa bits
    # (2^-8 ~ 4e-3 per op); averaged over the step's loss tokens the runs differ by 1.5e-4 relative (measured).
    assert [m["loss"] for m in mc] == pytest.approx([m["loss"] for m in ma], rel=2e-3)
    # The update: the float32 master weights of exactly the same tensors take Adam steps (about lr = 1e-3 per
    # element per step whatever the gradient's scale; weight decay and rounding add < 1%) in the same
    # direction as float32 training's. bf16 master weights could not: a 1e-3 step is below bf16's ulp at 1.
    w0, wc = random_model(preset(PRESET), 0).state_dict(), weights(c)
    moved = sorted(k for k in w0 if not torch.equal(wa[k], w0[k]))
    assert moved and moved == sorted(k for k in w0 if not torch.equal(wc[k], w0[k]))
    da, dc = (torch.cat([(w[k] - w0[k]).flatten() for k in moved]) for w in (wa, wc))
    assert wc[moved[0]].dtype == torch.float32 and dc.abs().max() <= 2e-3 * 1.01
    # bf16 gradients differ by rounding: cosine 0.997 and 7% relative error measured
    assert torch.cosine_similarity(da, dc, dim=0) > 0.99 and (dc - da).norm() < 0.15 * da.norm()


def test_segment_attention_and_compiled_layers_train_like_the_mask(tmp_path, cfg_tiny):
    """train.attention = "segments" (padding dropped, each packed sample attended alone) and train.compile =
    "layers" (bench/bench_train_step.py) are the default's math in another summation order: the same losses
    and weights up to float32 rounding (Stage II, as in the per-step test above)."""
    assert models_llama.PackedSegments.of(synthetic(cfg_tiny, rows=4, seq_len=192).make(0).doc_ids) is not None
    a = train(run_config(tmp_path / "a", steps=2, stage="janus-pro/2"))
    b = train(run_config(tmp_path / "b", steps=2, stage="janus-pro/2", attention="segments"))
    c = train(run_config(tmp_path / "c", steps=2, stage="janus-pro/2", attention="segments", compile="layers"))
    wa, la = weights(a), [m["loss"] for m in read_metrics(a / "metrics.jsonl")]
    for out in (b, c):
        assert [m["loss"] for m in read_metrics(out / "metrics.jsonl")] == pytest.approx(la, rel=1e-5)
        w = weights(out)
        # Adam turns the rounding noise of a few near-zero gradient entries into steps of up to lr (1e-3): measured
        # 1-6 entries per tensor differ, by at most 4e-5; a real difference moves most entries by ~lr.
        for k in wa:
            torch.testing.assert_close(w[k], wa[k], rtol=0, atol=2e-4, msg=k)
            assert int(((w[k] - wa[k]).abs() > 1e-6).sum()) <= max(8, wa[k].numel() // 1000), k
    with pytest.raises(ValueError, match="attention"):
        run_config(tmp_path / "d", attention="flash")
    with pytest.raises(ValueError, match="compile"):
        run_config(tmp_path / "d", compile="max-autotune")


# ---------------------------------------------------------------------------------------------
# Configs and CLI

@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_run_config(path)
    stage = cfg.resolved_stage()
    assert stage.steps > 0 and stage.batch_size > 0
    if path.name.startswith("janus-pro-stage"):
        n = path.name.removeprefix("janus-pro-stage").removesuffix(".toml")
        assert stage == get_stage(f"janus-pro/{n}")  # the paper's row, unscaled
        assert cfg.train.seq_len == 4096 and cfg.train.autocast == "bfloat16"
    if path.name.startswith("janusflow-stage"):
        n = path.name.removeprefix("janusflow-stage").removesuffix(".toml")
        assert stage == get_stage(f"janusflow/{n}")
        assert (cfg.flow.repa_layer, cfg.flow.repa_weight) == (6, 1.0) and cfg.data.options["cfg_drop"] == 0.1


def test_config_errors_name_the_key(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text('[model]\nsource = "tiny-janus-pro"\n[stage]\nname = "janus-pro/1"\nlrr = 1\n[train]\nout = "o"\n')
    with pytest.raises(ValueError, match="lrr"):
        load_run_config(p).resolved_stage()
    p.write_text('[model]\nsource = "tiny-janus-pro"\n[stage]\nname = "janus-pro/1"\n[train]\nout = "o"\nmicro = 1\n')
    with pytest.raises(ValueError, match=r"\[train\].*micro"):
        load_run_config(p)
    cfg = load_run_config(CONFIGS / "tiny-smoke.toml", ["train.out=elsewhere", "stage.scale=0.5", "stage.lr=3e-4"])
    assert cfg.train.out == "elsewhere" and cfg.resolved_stage().lr == 3e-4 and cfg.resolved_stage().steps == 20
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_train_and_resume(tmp_path, capsys):
    from januskit.cli import main

    out = tmp_path / "smoke"
    args = ["train", str(CONFIGS / "tiny-smoke.toml"), "--set", f"train.out={out}", "--set", "stage.steps=4",
            "--set", "train.save_every=2", "--set", "train.progress=false"]
    assert main(args) == 0
    assert str(out) in capsys.readouterr().out
    assert main(args) == 2  # refuses to start over a run that has checkpoints
    assert "resume" in capsys.readouterr().err
    assert main(args[:-2] + ["--set", "stage.steps=6", "--set", "train.progress=false", "--resume"]) == 0
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert januskit.load(out).config.llm.dim == 64


# ---------------------------------------------------------------------------------------------
# Overfitting: greedy decoding reproduces the training answers and images

def test_tiny_model_overfits_and_greedy_decoding_reproduces_the_data(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = januskit.load(PRESET)
    proc, c = pipe.processor, pipe.config
    tok = proc.tokenizer
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)) for _ in range(2)]
    answers = [" a red square", " two blue circles"]
    prompts = ["a red square", "two blue circles"]
    vq = [rng.integers(0, c.vq.codebook_size, c.vq.n_tokens).tolist() for _ in prompts]

    samples = []
    for img, ans in zip(images, answers):  # understanding: loss on the answer and the stop token
        enc = proc.encode_chat(proc.user_turn("What is in the image?", [img]))
        a = tok.encode(ans, add_bos=False) + [tok.eos_id]
        ids = enc.ids + a
        samples.append({"ids": ids, "und": [j for j, t in enumerate(enc.ids) if t == tok.image_id],
                        "pixels": enc.images[0], "kind": 0,
                        "text": {j: ids[j + 1] for j in range(len(enc.ids) - 1, len(ids) - 1)}})
    for p, v in zip(prompts, vq):  # generation: loss on every image token
        ids = proc.generation_prompt(p)
        L = len(ids)
        samples.append({"ids": ids + [0] * len(v), "gen": {L + j: t for j, t in enumerate(v)},
                        "image": {L - 1 + j: t for j, t in enumerate(v)}, "kind": 2})
    batch = pack_by_hand([[s] for s in samples], T=max(len(s["ids"]) for s in samples))

    cfg = RunConfig.from_dict({
        "model": {"source": PRESET},
        "stage": {"name": "janus-pro/3", "steps": 150, "warmup": 10, "lr": 3e-3, "batch_size": 4},
        "train": {"out": str(tmp_path / "overfit"), "micro_batch_size": 4, "seq_len": batch.input_ids.shape[1],
                  "log_every": 10, "save_every": 1000, "export_dtype": "float32", "progress": False}})
    out = train(cfg, data=Repeat(batch))
    metrics = read_metrics(out / "metrics.jsonl")
    assert metrics[0]["loss"] > 1.0  # step 10 (about 3.8; a uniform guess over 512 codes is 6.2)
    final = metrics[-1]
    assert final["loss"] < 0.01, final  # about 3e-4 at step 150 on CPU
    assert final["loss_und"] < 0.01 and final["loss_gen"] < 0.01

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = januskit.load(out)
    for img, ans in zip(images, answers):
        got = trained.chat_ids("What is in the image?", [img], max_new_tokens=12, temperature=0)
        assert got == tok.encode(ans, add_bos=False)  # and it stopped at EOS
    for p, v in zip(prompts, vq):
        # cfg 1: logits = cond exactly (the unconditional pad prompt was never trained, so any other
        # guidance weight would mix in an untrained distribution); temperature 0 = argmax.
        res = trained.generate_images(p, n=1, cfg_weight=1.0, temperature=0)
        assert res.tokens[0].tolist() == v


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_autocast_on_a_cpu_without_native_bf16_warns(tmp_path, monkeypatch, caplog, fast):
    """bf16 autocast on an AVX2-only CPU runs PyTorch's reference bf16 matmul (measured 20x slower than
    float32 on this project's AVX2 machine): the run says so, naming the setting; with native bf16 it is quiet."""
    import logging

    import januskit.train.trainer as trainer

    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: fast)
    with caplog.at_level(logging.WARNING, logger="januskit.train"):
        train(run_config(tmp_path / "bf16", steps=1, autocast="bfloat16"))
    warned = [r.getMessage() for r in caplog.records if "without native bf16" in r.getMessage()]
    assert warned == [] if fast else (len(warned) == 1 and 'autocast = "none"' in warned[0])
