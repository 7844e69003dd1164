"""LoRA fine-tuning through peft (januskit.train.lora) on the tiny preset, CPU: what trains and what
stays bit-identical, merging into a plain official checkpoint, adapter files (ours and PEFT's loader),
the trainer's [lora] table with exact resume, overfitting understanding + image-generation data, and
the error when peft is not installed."""
from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import januskit
import januskit.train.trainer as trainer
from januskit.checkpoint.init import random_model
from januskit.checkpoint.official import official_key_order, save_janus
from januskit.config import preset
from januskit.train.data.batch import TrainBatch
from januskit.train.config import RunConfig, load_run_config
from januskit.train.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings, apply_lora, has_lora, load_adapter,
                                 merge_lora, merged_state, save_adapter)
from januskit.train.plot import read_metrics
from januskit.train.losses import LossForward
from januskit.train.stages import get_stage
from januskit.train.data.synthetic import SyntheticData
from januskit.train.trainer import StepConfig, build_optimizer, train, train_step
from januskit.train.checkpoints import list_checkpoints
from reference_helpers import greedy_answer
from train_helpers import LORA, PRESET, Repeat, crash_after, pack_by_hand, run_config

needs_peft = pytest.mark.needs("peft", "lora")  # conftest: skips without peft, fails under CI=true
CONFIGS = Path(__file__).parent.parent / "configs"
C = preset(PRESET)
ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def tiny_model():
    return random_model(C, 0).train()


def all_kinds_batch() -> TrainBatch:
    """A synthetic micro-batch with understanding, text and generation samples (every adapter on the path)."""
    data = SyntheticData(micro_batch_size=3, seq_len=256, ratio=(1, 1, 1), seed=0, vocab_size=C.llm.vocab_size,
                         codebook_size=C.vq.codebook_size, n_und_tokens=C.vision.n_tokens,
                         n_gen_tokens=C.vq.n_tokens, image_size=C.vision.image_size, text_len=(4, 16))
    for i in range(50):
        b = data.make(i)
        if {0, 1, 2} <= set(b.kinds.unique().tolist()) and b.pixel_values is not None:
            return b
    raise AssertionError("no synthetic batch with all three kinds")


def adapted_modules(s: LoraSettings) -> set[str]:
    """The module names LoRA must wrap for settings `s`, written out by hand."""
    out = {f"language_model.model.layers.{i}.{'self_attn' if t in ATTN else 'mlp'}.{t}"
           for i in range(C.llm.n_layers) for t in s.targets if t != "lm_head"}
    if "lm_head" in s.targets:
        out.add("language_model.lm_head")
    if s.include_aligners:
        out |= {f"{a}.layers.{j}" for a in ("aligner", "gen_aligner") for j in (0, 2)}
    if s.include_gen_head:
        out |= {"gen_head.output_mlp_projector", "gen_head.vision_head"}
    return out


@torch.no_grad()
def head_outputs(model, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Understanding logits (LM head, every slot) and image logits (gen head, every slot) of one batch:
    the forward passes through every adapted module (aligners, LLM, both heads)."""
    h = model.mixed_embeds(batch.input_ids, batch.und_mask, batch.pixel_values, batch.gen_mask, batch.gen_ids)
    hidden, _ = model.llm.forward_packed(h, batch.positions, batch.doc_ids)
    return model.text_logits(hidden), model.image_logits(hidden)


def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.1, include_aligners=True, include_gen_head=True)


@pytest.fixture(scope="module")
def trained():
    """(base state, state right after apply_lora, the LoRA model after 8 AdamW steps at lr 1e-2
    through the trainer's train_step, the batch it trained on)."""
    torch.manual_seed(0)
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, SETTINGS)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    batch = all_kinds_batch()
    stage = get_stage("janus-pro/3")
    opt = build_optimizer(model, stage)
    for g in opt.param_groups:
        g["lr"] = 1e-2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = StepConfig(grad_accum=1, micro_rows=None, n_und_tokens=C.vision.n_tokens, grad_clip=1.0,
                     device=torch.device("cpu"))
    batches = iter(Repeat(batch))
    for _ in range(8):
        train_step(LossForward(model), batches, opt, sched, cfg)  # dropout 0.1 is on (train mode)
    return base, init, model.eval(), batch


# ---------------------------------------------------------------------------------------------
# What trains, what is frozen, the names

@needs_peft
def test_only_adapters_train_and_names_are_predictable():
    model = tiny_model()
    base_keys = set(model.state_dict())
    apply_lora(model, SETTINGS)
    assert has_lora(model)
    mods = adapted_modules(SETTINGS)
    assert len(mods) == 7 * C.llm.n_layers + 4 + 2
    # Every adapted Linear `m` becomes m.base_layer.{weight,bias} + m.lora_{A,B}.default.weight;
    # every other key is unchanged.
    want = set()
    for k in base_keys:
        m, _, leaf = k.rpartition(".")
        want.add(f"{m}.base_layer.{leaf}" if m in mods else k)
    want |= {f"{m}.lora_{x}.default.weight" for m in mods for x in "AB"}
    assert set(model.state_dict()) == want
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{x}.default.weight" for m in mods for x in "AB"}
    assert not any(n.startswith("gen_vision_model.") for n in trainable)  # VQ always frozen
    a = model.get_submodule("language_model.model.layers.0.self_attn.q_proj")
    assert a.lora_A["default"].weight.shape == (4, C.llm.dim)


@needs_peft
def test_settings_validation_and_targets():
    with pytest.raises(ValueError, match="valid"):
        LoraSettings(targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="nothing to adapt"):
        LoraSettings(targets=(), include_gen_head=False)
    with pytest.raises(ValueError, match="r must be"):
        LoraSettings(r=0)
    only = LoraSettings(targets=["v_proj", "lm_head"], include_gen_head=False)  # lists from TOML are fine
    model = apply_lora(tiny_model(), only)
    assert {n.removesuffix(".lora_A.default.weight") for n, p in model.named_parameters()
            if p.requires_grad and "lora_A" in n} == adapted_modules(only)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, only)


@needs_peft
def test_training_changes_only_adapters(trained):
    base, init, model, _ = trained
    sd = model.state_dict()
    for k, v in sd.items():
        if ".lora_" in k:
            assert not torch.equal(v, init[k]), f"{k} did not train"
        else:
            assert torch.equal(v, base[k.replace(".base_layer.", ".")]), f"{k} changed"  # bit-identical


# ---------------------------------------------------------------------------------------------
# Merging and adapter files

@needs_peft
def test_merged_checkpoint_equals_adapted_model_and_has_the_official_keys(trained, tmp_path):
    base, _, model, batch = trained
    adapted = head_outputs(model, batch)
    plain = random_model(C, 0).eval()
    assert max_diff(adapted, head_outputs(plain, batch)) > 1e-2  # the adapters matter: not a vacuous check

    merged = merge_lora(copy.deepcopy(model))
    assert not has_lora(merged) and set(merged.state_dict()) == set(base)
    assert max_diff(adapted, head_outputs(merged, batch)) <= 1e-5
    # merged_state (the trainer's export path, from a gathered state dict) gives the same tensors.
    ms = merged_state(model, model.state_dict())
    assert all(torch.equal(ms[k], v) for k, v in merged.state_dict().items())

    folder = save_janus(merged, tmp_path / "merged")
    assert set(load_file(str(folder / "model.safetensors"))) == set(official_key_order(C))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "multi_modality"
    loaded = januskit.checkpoint.official.load_janus(folder)  # strict: any missing/unexpected key raises
    assert max_diff(adapted, head_outputs(loaded, batch)) <= 1e-5


@needs_peft
def test_adapter_files_round_trip_and_peft_reads_them(trained, tmp_path):
    import peft

    _, _, model, batch = trained
    adapted = head_outputs(model, batch)
    folder = save_adapter(model, tmp_path / "adapter", base=PRESET)
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    keys = set(load_file(str(folder / ADAPTER_WEIGHTS)))
    assert keys == {f"base_model.model.{m}.lora_{x}.weight" for m in adapted_modules(SETTINGS) for x in "AB"}

    fresh = load_adapter(random_model(C, 0), folder).eval()  # injects from adapter_config.json
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == \
           [n for n, p in model.named_parameters() if p.requires_grad]
    assert max_diff(adapted, head_outputs(fresh, batch)) == 0
    # PEFT's own loader on a januskit model gives the same model.
    pm = peft.PeftModel.from_pretrained(random_model(C, 0), str(folder)).eval()
    assert max_diff(adapted, head_outputs(pm.base_model.model, batch)) == 0

    other = apply_lora(random_model(C, 0), LoraSettings(r=8, alpha=8, include_aligners=True))
    with pytest.raises(ValueError, match="'r'"):
        load_adapter(other, folder)  # a different rank is refused, not half-loaded
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        load_adapter(random_model(C, 0), tmp_path)


# ---------------------------------------------------------------------------------------------
# The trainer's [lora] table

STEPS = 6


def lora_cfg(out: Path, **lora) -> RunConfig:
    return run_config(out, steps=STEPS, stage="janus-pro/3", lr=5e-3, lora={**LORA, **lora})


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    return train(lora_cfg(tmp_path_factory.mktemp("lora-straight") / "run"))


def ckpt_adapter(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / ADAPTER_WEIGHTS))


@needs_peft
def test_trainer_lora_checkpoints_and_merged_export(straight):
    ck = straight / "checkpoints" / f"step-{STEPS:08d}"
    assert {p.name for p in ck.iterdir()} >= {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "optimizer.pt", "trainer.pt"}
    assert not (ck / "model.safetensors").exists()  # adapter-only: the base is rebuilt from [model]
    assert json.loads((ck / "run_config.json").read_text())["lora"]["enabled"] is True
    # The export: plain official layout, exactly the official keys, loads strictly, and equals base +
    # the last checkpoint's adapter merged.
    exported = load_file(str(straight / "model.safetensors"))
    assert set(exported) == set(official_key_order(C))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = januskit.load(straight)
    assert pipe.chat("hi", max_new_tokens=2) == greedy_answer(pipe, "hi", 2)
    m = load_adapter(random_model(C, 0), ck)
    for k, v in merge_lora(m).state_dict().items():
        assert torch.equal(exported[k], v), k
    start = random_model(C, 0).state_dict()
    vq = "gen_vision_model.quantize.embedding.weight"
    assert torch.equal(exported[vq], start[vq])
    sig = "vision_model.vision_tower.blocks.0.attn.qkv.weight"
    assert torch.equal(exported[sig], start[sig])  # not adapted: untouched even in Stage III
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported[q], start[q])  # adapted and merged


@needs_peft
def test_lora_resume_is_exact(straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = lora_cfg(out)
    with monkeypatch.context() as m:
        crash_after(m, 3)  # checkpoint at step 2, killed during step 4
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]
    # The checkpoint belongs to a LoRA run: resuming without [lora] is refused by name.
    plain = RunConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "lora"})
    with pytest.raises(ValueError, match=r"with \[lora\]"):
        train(plain, resume=True)
    train(cfg, resume=True)
    for step in (4, 6):
        a, b = ckpt_adapter(straight, step), ckpt_adapter(out, step)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda ms: [{k: v for k, v in x.items() if k not in trainer.TIMING_KEYS} for x in ms]  # noqa: E731
    assert strip(read_metrics(out / "metrics.jsonl")) == strip(read_metrics(straight / "metrics.jsonl"))


@needs_peft
def test_adapter_only_export(straight, tmp_path):
    out = train(lora_cfg(tmp_path / "run", merge_on_export=False))
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == PRESET
    a, b = load_file(str(out / ADAPTER_WEIGHTS)), ckpt_adapter(straight, STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same run, same adapter
    merged = merge_lora(load_adapter(random_model(C, 0), out)).state_dict()
    full = load_file(str(straight / "model.safetensors"))
    assert all(torch.equal(full[k], v) for k, v in merged.items())


@needs_peft
def test_config_table_and_cli(tmp_path):
    cfg = load_run_config(CONFIGS / "tiny-lora.toml", ["lora.r=4", "lora.targets=['q_proj', 'v_proj']"])
    assert cfg.lora.enabled and cfg.lora.r == 4 and cfg.lora.targets == ("q_proj", "v_proj")
    assert cfg.lora.include_gen_head and cfg.lora.merge_on_export
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert not load_run_config(CONFIGS / "tiny-smoke.toml").lora.enabled  # no [lora] table: off
    with pytest.raises(ValueError, match=r"\[lora\].*rank"):
        load_run_config(CONFIGS / "tiny-lora.toml", ["lora.rank=4"])
    with pytest.raises(ValueError, match=r"\[lora\].*targets"):
        load_run_config(CONFIGS / "tiny-lora.toml", ["lora.targets=['qproj']"])

    from januskit.cli import main

    out = tmp_path / "cli"
    assert main(["train", str(CONFIGS / "tiny-lora.toml"), "--set", f"train.out={out}", "--set", "stage.steps=2",
                 "--set", "train.progress=false", "--set", "train.save_every=2"]) == 0
    assert set(load_file(str(out / "model.safetensors"))) == set(official_key_order(C))
    assert (out / "checkpoints" / "step-00000002" / ADAPTER_WEIGHTS).is_file()


# ---------------------------------------------------------------------------------------------
# Overfitting understanding + image-generation data with LoRA (r=8 on the LLM and the gen head)

OVERFIT_STEPS = 80


@needs_peft
def test_lora_overfits_generation_and_understanding(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = januskit.load(PRESET)
    proc, tok = pipe.processor, pipe.processor.tokenizer
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    answer = " a red square"
    prompts = ["a red square", "two blue circles"]
    vq = [rng.integers(0, C.vq.codebook_size, C.vq.n_tokens).tolist() for _ in prompts]

    enc = proc.encode_chat(proc.user_turn("What is in the image?", [image]))
    ids = enc.ids + tok.encode(answer, add_bos=False) + [tok.eos_id]
    samples = [{"ids": ids, "und": [j for j, t in enumerate(enc.ids) if t == tok.image_id],
                "pixels": enc.images[0], "kind": 0,
                "text": {j: ids[j + 1] for j in range(len(enc.ids) - 1, len(ids) - 1)}}]
    for p, v in zip(prompts, vq):  # generation: loss on every image token
        g = proc.generation_prompt(p)
        samples.append({"ids": g + [0] * len(v), "gen": {len(g) + j: t for j, t in enumerate(v)},
                        "image": {len(g) - 1 + j: t for j, t in enumerate(v)}, "kind": 2})
    batch = pack_by_hand([[s] for s in samples], T=max(len(s["ids"]) for s in samples))

    cfg = RunConfig.from_dict({
        "model": {"source": PRESET},
        "stage": {"name": "janus-pro/3", "steps": OVERFIT_STEPS, "warmup": 5, "lr": 1e-2, "batch_size": 3},
        "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "include_gen_head": True},
        "train": {"out": str(tmp_path / "overfit"), "micro_batch_size": 3, "seq_len": batch.input_ids.shape[1],
                  "log_every": 1, "save_every": 1000, "export_dtype": "float32", "progress": False}})
    out = train(cfg, data=Repeat(batch))
    metrics = read_metrics(out / "metrics.jsonl")
    first, last = metrics[0], metrics[-1]
    # Measured on CPU: loss 6.54 -> 0.018 (gen 6.50 -> 6e-5, und 8.07 -> 0.58).
    assert first["loss"] > 5.0
    assert last["loss"] < first["loss"] / 100, last
    assert last["loss_gen"] < 1e-3, last
    # The understanding loss levels off near 0.58: the LM head is frozen (not a target here) and the
    # final RMSNorm bounds the hidden norm, which caps the margin a random tiny LM head can give one
    # token over the whole vocabulary. Adding "lm_head" to targets takes it to 1e-4 in the same steps.
    assert last["loss_und"] < 1.0, last

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = januskit.load(out)  # the merged export, official layout
    got = tuned.chat_ids("What is in the image?", [image], max_new_tokens=12, temperature=0)
    assert got == tok.encode(answer, add_bos=False)  # argmax is right even at that loss, and it stops at EOS
    for p, v in zip(prompts, vq):
        # cfg 1: logits = conditional exactly; temperature 0 = argmax.
        assert tuned.generate_images(p, n=1, cfg_weight=1.0, temperature=0).tokens[0].tolist() == v


# ---------------------------------------------------------------------------------------------
# peft is optional

def test_missing_peft_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'januskit\[lora\]'"):
        apply_lora(tiny_model(), LoraSettings())
    with pytest.raises(ImportError, match=r"januskit\[lora\]"):
        train(lora_cfg(tmp_path / "lora"))
    # Without [lora] nothing needs peft.
    out = train(run_config(tmp_path / "plain", steps=1, save_every=1))
    assert (out / "model.safetensors").is_file()

