"""Building the training module for FSDP2 on meta and filling each rank's shards (januskit/train/sharded.py):
the values equal the unsharded load exactly, and each rank reads only its own rows of the checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from januskit.checkpoint import io
from januskit.checkpoint.init import init_checkpoint, random_model
from januskit.checkpoint.io import CheckpointError
from januskit.checkpoint.official import load_official
from januskit.config import preset
from januskit.models import build_model
from januskit.train import parallel, sharded
from januskit.train.config import ModelSection
from januskit.train.flow import FlowSettings
from januskit.train.lora import LoraSettings, apply_lora
from januskit.train.losses import LossForward
from conftest import need

PRESETS = ("tiny-janus-pro", "tiny-janusflow")


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in m.state_dict().items()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_filled_on_meta_equals_random_model(name):
    spec = ModelSection(source=name, seed=3)
    model, extras = sharded.build_meta(spec)
    assert next(model.parameters()).is_meta and extras.files == {}
    loss = LossForward(model, FlowSettings(repa_layer=1) if "flow" in name else None, seed=0)
    held = sharded.real_tensors(loss)  # the REPA head of JanusFlow, built from the seed; nothing for Janus
    assert {k.split(".")[0] for k in held} == ({"repa_head"} if "flow" in name else set())
    sharded.fill(loss, sharded.sources_for(loss, spec, held, None, lambda k: k), torch.device("cpu"))
    ref = random_model(preset(name), 3)
    _assert_equal(_state(model), _state(ref))
    _assert_equal({k: v for k, v in _state(loss).items() if k.startswith("repa_head.")}, held)


def test_a_folder_filled_on_meta_equals_load_official(tmp_path):
    folder = init_checkpoint(tmp_path / "ckpt", arch="janusflow", dtype=torch.bfloat16, seed=1, vae=False)
    spec = ModelSection(source=str(folder), seed=0)
    model, extras = sharded.build_meta(spec)
    assert extras.files  # the unused official entries, for the export
    loss = LossForward(model, FlowSettings(repa_layer=1), seed=0)
    sharded.fill(loss, sharded.sources_for(loss, spec, sharded.real_tensors(loss), None, lambda k: k),
                 torch.device("cpu"))
    _assert_equal(_state(model), _state(load_official(folder, torch.float32)))


def test_fill_names_what_has_no_source_and_a_random_source_read_out_of_order():
    spec = ModelSection(source="tiny-janus-pro", seed=0)
    model, _ = sharded.build_meta(spec)
    sources = sharded.random_sources(model, 0)
    with pytest.raises(CheckpointError, match=r"no source for 1 tensor\(s\): vision_model"):
        sharded.fill(model, {k: v for k, v in sources.items() if k != next(iter(sources))}, torch.device("cpu"))
    names = list(sources)
    sources[names[1]](0, 1)
    with pytest.raises(RuntimeError, match=f"random source '{names[0]}' read out of order"):
        sources[names[0]](0, 1)


def _rank_reads(folder: str, out: str, lora: bool = False) -> None:
    """One rank: shard the meta model (with LoRA adapters when `lora`) over two ranks, fill from `folder`,
    and record which rows it read and its local shards (to compare with the file)."""
    parallel.init("cpu")
    reads: list[tuple[str, int, int]] = []
    real = io.read_rows

    def counting(entry, start, stop):
        reads.append((entry[0], start, stop))
        return real(entry, start, stop)

    sharded.read_rows = counting  # the name sharded.py calls
    spec = ModelSection(source=folder, seed=0)
    model, _ = sharded.build_meta(spec)
    loss = LossForward(model)
    model.gen_vision_model.requires_grad_(False)  # frozen, as every stage keeps it: replicated, read whole
    if lora:
        apply_lora(model, LoraSettings(r=4), seed=5)
    held = sharded.real_tensors(loss)  # the adapters, drawn at build time
    loss = parallel.wrap(loss, "fsdp", parallel.shard_plan(model))
    sharded.fill(loss, sharded.sources_for(loss, spec, held, None, lambda k: k), torch.device("cpu"))
    local = {k: (v.to_local() if isinstance(v, DTensor) else v).clone() for k, v in loss.state_dict().items()}
    torch.save({"reads": reads, "local": local}, Path(out) / f"rank{parallel.rank()}.pt")
    parallel.teardown()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_each_rank_reads_only_its_rows(tmp_path, lora):
    """Also with LoRA: the frozen base is read by rows like any weight (`q_proj.base_layer.weight` from the
    file's `q_proj.weight`), and each rank's rows of the adapters are those of the unsharded draw."""
    if lora:
        need("peft", "lora")
    folder = init_checkpoint(tmp_path / "ckpt", arch="janus", seed=2)
    parallel.spawn(_rank_reads, 2, str(folder), str(tmp_path), lora)
    ref = load_official(folder, torch.float32)
    full = ref.state_dict()
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    name = {k.removeprefix("model.").replace(".base_layer.", "."): k for k in got[0]["local"] if ".lora_" not in k}
    if lora:  # the adapters: each rank holds its torch.chunk rows of what the same call draws unsharded
        drawn = {k: v for k, v in apply_lora(ref, LoraSettings(r=4), seed=5).state_dict().items() if ".lora_" in k}
        assert len(drawn) == 2 * 7 * len(ref.llm.layers) + 4  # A and B of 7 projections a layer, the image head's 2
        for k, v in drawn.items():
            assert torch.equal(torch.cat([got[r]["local"]["model." + k] for r in range(2)]), v), k
    checked = 0
    for key, t in full.items():
        n = t.shape[0] if t.ndim else 0
        rows = [[(a, b) for k, a, b in g["reads"] if k == key] for g in got]
        if not t.ndim:
            continue  # a 0-d tensor (read whole)
        checked += 1
        if key.startswith(parallel.REPLICATED):  # the frozen VQ, whole on every rank (shard_plan)
            assert rows == [[(0, n)], [(0, n)]], (key, rows)
            for r in range(2):
                assert torch.equal(got[r]["local"][name[key]], t), key
            continue
        # one read per rank, the two halves torch.chunk gives (ceil(n / 2) rows, then the rest)
        half = -(-n // 2)
        assert rows == [[(0, half)], [(half, n)]], (key, rows)
        for r in range(2):
            assert torch.equal(got[r]["local"][name[key]], t[rows[r][0][0]:rows[r][0][1]]), key
    assert checked == sum(1 for t in full.values() if t.ndim) > 100  # every tensor of the model was read by rows


@pytest.mark.parametrize("arch", ["tiny-janus-pro", "tiny-janusflow"])
def test_shard_plan_units_cover_the_big_parts_and_replicate_only_a_frozen_vq(arch):
    """Every decoder layer, vision block, the towers, embeddings and heads are units of their own, children
    before parents (fully_shard's order); the root keeps only the small adaptors. The VQ is left whole when
    frozen and sharded as a unit when it trains (its gradients must be reduced)."""
    model = build_model(preset(arch))
    plan = parallel.shard_plan(model)
    names = {id(m): n for n, m in model.named_modules()}
    got = [names[id(u)] for u in plan.units]
    flow = arch.endswith("janusflow")
    tower = "vision_und_enc_model" if flow else "vision_model"
    depth = len(model.get_submodule(f"{tower}.vision_tower.blocks"))
    assert got[:len(model.llm.layers)] == [f"language_model.model.layers.{i}" for i in range(len(model.llm.layers))]
    n = len(model.llm.layers)
    assert got[n:n + depth + 1] == [f"{tower}.vision_tower.blocks.{i}" for i in range(depth)] + [tower]
    heads = ["language_model.model.embed_tokens", "language_model.lm_head"]
    assert got[n + depth + 1:] == (["vision_gen_enc_model", "vision_gen_dec_model", *heads] if flow else
                                   [*heads, "gen_head", "gen_vision_model"])
    in_units = {id(p) for u in plan.units for p in u.parameters()}
    left = sorted(n for n, p in model.named_parameters() if id(p) not in in_units)
    assert left and all(n.split(".")[0] in {"aligner", "gen_aligner", "gen_embed", "language_model", "beg_of_und_embed",
                        "vision_und_enc_aligner", "vision_gen_enc_aligner", "vision_gen_dec_aligner_norm",
                        "vision_gen_dec_aligner"} for n in left), left
    assert not plan.ignored  # everything trains in a fresh model
    if not flow:
        model.gen_vision_model.requires_grad_(False)
        plan = parallel.shard_plan(model)
        assert plan.ignored == set(model.gen_vision_model.parameters())
        assert model.gen_vision_model not in plan.units


def _lora_meta(spec: ModelSection, settings: LoraSettings) -> tuple[torch.nn.Module, LossForward]:
    model, _ = sharded.build_meta(spec)
    loss = LossForward(model)
    apply_lora(model, settings, seed=7)
    return model, loss


def test_lora_on_meta_draws_the_unsharded_adapters_and_resumes_from_an_adapter_file(tmp_path):
    """apply_lora on a meta model leaves the base on meta (no full copy) and draws real adapters equal to the
    same call on a real model; filled from a preset they make the unsharded adapted model; resumed from an adapter
    file, its trained adapters; a checkpoint without adapters is refused by name."""
    need("peft", "lora")
    from januskit.train.lora import save_adapter

    spec, settings = ModelSection(source="tiny-janus-pro", seed=3), LoraSettings(r=4, include_aligners=True)
    ref = apply_lora(random_model(preset("tiny-janus-pro"), 3), settings, seed=7)
    model, loss = _lora_meta(spec, settings)
    held = sharded.real_tensors(loss)
    assert held and all(".lora_" in k for k in held)
    assert all(p.is_meta for n, p in model.named_parameters() if ".lora_" not in n)
    sharded.fill(loss, sharded.sources_for(loss, spec, held, None, lambda k: k), torch.device("cpu"))
    _assert_equal(_state(model), _state(ref))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in ref.named_parameters() if p.requires_grad]
    with torch.no_grad():  # "trained" adapters, saved as a LoRA run's checkpoint saves them
        for n, p in ref.named_parameters():
            if ".lora_" in n:
                p.add_(torch.randn_like(p))
    ckpt = save_adapter(ref, tmp_path / "step-2")
    model, loss = _lora_meta(spec, settings)
    sharded.fill(loss, sharded.sources_for(loss, spec, sharded.real_tensors(loss), ckpt, lambda k: k),
                 torch.device("cpu"))
    _assert_equal(_state(model), _state(ref))
    plain, _ = sharded.build_meta(spec)
    with pytest.raises(ValueError, match=r"step-2: written by a run with \[lora\] enabled; resume it with the same"):
        sharded.sources_for(LossForward(plain), spec, {}, ckpt, lambda k: k)
    model, loss = _lora_meta(spec, LoraSettings(r=8, include_aligners=True))
    with pytest.raises(ValueError, match=r"step-2: adapter differs from the model's LoRA in \['r'\] "
                                         r"\(file, model: {'r': \(4, 8\)}\)"):
        sharded.sources_for(loss, spec, sharded.real_tensors(loss), ckpt, lambda k: k)
