"""Checkpoint layouts and conversion: key tables (tiny and real sizes), lossless round trips,
loading the HF layout directly, sharding, and clear errors on bad input.

Fixtures (conftest.py): `tiny_ckpt.official` is a random tiny-janus-pro folder in the official
layout, `tiny_ckpt.hf` its official_to_hf conversion. Tests that edit a checkpoint work on copies.
"""
from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import januskit
from januskit.checkpoint import convert as convert_mod
from januskit.checkpoint.convert import (SIDE_CONFIG_KEY, convert, hf_to_official, load_hf_layout_with_extras,
                                         official_shapes, official_to_hf)
from januskit.checkpoint.hf import SIDE_FILE, janus_to_hf_config, official_to_hf_plan
from januskit.checkpoint.io import CheckpointError
from januskit.checkpoint.official import (load_janus, load_official_with_extras, official_key_order, official_state,
                                          save_janus)
from januskit.config import ConfigError, preset
from conftest import need

ASSETS = Path(__file__).parent / "assets"

transformers = need("transformers", "parity")  # the HF key tables


# ---------------------------------------------------------------------------------------------
# helpers

def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's weight files (safetensors or .bin, single or sharded)."""
    from januskit.checkpoint.io import iter_tensors, weight_files

    return {k: load() for k, load, _, _ in iter_tensors(weight_files(folder))}


def assert_same_folder(a: Path, b: Path) -> None:
    """Same file names, and every file byte-identical (safetensors headers hold key order, dtypes,
    shapes and offsets, so this is the strictest comparison there is)."""
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    assert names_a == names_b
    for n in names_a:
        assert filecmp.cmp(a / n, b / n, shallow=False), f"{n} differs between {a} and {b}"


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor equal with the same dtype. (Key order is not compared here:
    safetensors lists keys sorted within each file; assert_same_folder covers the file layout.)"""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def safetensors_header_order(path: Path) -> list[str]:
    """Keys in the order they are written in the file header."""
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return [k for k in json.loads(path.read_bytes()[8:8 + n]) if k != "__metadata__"]


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(folder: Path, edit) -> None:
    """Apply edit(dict) to the tensors of folder/model.safetensors, in place (metadata kept)."""
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as h:
        meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything atomic_folder may leave beside a destination `name` (temporary or .old folders)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------------------------------------
# key tables

def test_hf_conversion_keys_equal_a_fresh_hf_model(tiny_ckpt):
    """The HF folder holds exactly the state dict of a freshly built JanusForConditionalGeneration
    for its config.json: no missing / unexpected key, same shapes, float32 as the source."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    cfg = JanusConfig.from_pretrained(tiny_ckpt.hf)
    with torch.device("meta"):
        fresh = JanusForConditionalGeneration(cfg).state_dict()
    got = read_tensors(tiny_ckpt.hf)
    assert set(got) == set(fresh)
    for k, t in got.items():
        assert tuple(t.shape) == tuple(fresh[k].shape), k
        assert t.dtype == torch.float32, k
    side = read_tensors_file(tiny_ckpt.hf / SIDE_FILE)
    assert sorted(side) == sorted(k for k in official_key_order(preset("tiny-janus-pro"))
                                  if "attn_pool" in k or "codebook_used" in k)


def read_tensors_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


@pytest.mark.parametrize("name", ["janus-pro-1b", "janus-pro-7b"])
def test_real_size_official_layout_matches_reference(name):
    """official_key_order + shapes for the real configs (meta device) equal the key/shape dumps of
    the official classes (tests/assets/<name>.keys.tsv, copied from the reference material)."""
    rows = [line.split("\t") for line in (ASSETS / f"{name}.keys.tsv").read_text().splitlines() if line]
    want = [(k, tuple(int(x) for x in s.strip("()").split(",") if x.strip())) for k, s in rows]
    c = preset(name)
    shapes = official_shapes(c)
    got = [(k, shapes[k]) for k in official_key_order(c)]
    assert len(got) == len(want) == {"janus-pro-1b": 882, "janus-pro-7b": 936}[name]
    assert got == want


@pytest.mark.parametrize("name", ["janus-pro-1b", "janus-pro-7b"])
def test_real_size_hf_key_table(name):
    """The key table maps every official key of the real configs onto exactly the state dict of a
    freshly built (meta) HF model for the converted config, with the right shapes."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    c = preset(name)
    shapes = official_shapes(c)
    plan, extras = official_to_hf_plan(official_key_order(c))
    assert sorted(extras) == sorted(k for k in shapes if "attn_pool" in k or "codebook_used" in k)
    got = {hk: tuple(fn(*[torch.empty(shapes[s], device="meta") for s in srcs]).shape)
           for hk, (srcs, fn) in plan.items()}
    cfg = JanusConfig(**janus_to_hf_config(c, image_token_id=100581, pad_token_id=100002, bos_token_id=100000,
                                           eos_token_id=100001))
    with torch.device("meta"):
        fresh = {k: tuple(v.shape) for k, v in JanusForConditionalGeneration(cfg).state_dict().items()}
    assert set(got) == set(fresh)
    assert got == fresh


# ---------------------------------------------------------------------------------------------
# lossless round trips

def test_official_hf_official_is_bit_identical(tiny_ckpt, tmp_path):
    back = hf_to_official(tiny_ckpt.hf, tmp_path / "back")
    assert_same_folder(tiny_ckpt.official, back)
    a, b = read_tensors(tiny_ckpt.official), read_tensors(back)
    assert_same_tensors(a, b)
    p = "vision_model.vision_tower.attn_pool."
    assert a[p + "q.weight"].abs().sum() > 0 and a[p + "latent"].abs().sum() > 0  # random, not zeros
    assert "gen_vision_model.quantize.codebook_used" in b
    order = safetensors_header_order(back / "model.safetensors")
    assert order == safetensors_header_order(tiny_ckpt.official / "model.safetensors")


def test_hf_side_file_keeps_config_and_unused_entries(tiny_ckpt):
    with safe_open(str(tiny_ckpt.hf / SIDE_FILE), framework="pt") as h:
        assert h.metadata()[SIDE_CONFIG_KEY] == (tiny_ckpt.official / "config.json").read_text()
    gen = json.loads((tiny_ckpt.hf / "generation_config.json").read_text())
    assert set(gen["generation_kwargs"]) == {"boi_token_id"}


def test_model_cfg_weight_survives_both_conversions(tiny_ckpt, tmp_path):
    """A folder's own guidance_scale (generation_config.json) reaches HF's generation_config beside the
    special-token ids, and comes back to the official layout alone; a folder without one gets none."""
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt.official, src)
    (src / "generation_config.json").write_text(json.dumps({"guidance_scale": 2}))
    hf = official_to_hf(src, tmp_path / "hf")
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["guidance_scale"] == 2.0 and set(gen["generation_kwargs"]) == {"boi_token_id"}
    back = hf_to_official(hf, tmp_path / "back")
    assert json.loads((back / "generation_config.json").read_text()) == {"guidance_scale": 2.0}
    assert januskit.load(back).default_cfg_weight == januskit.load(hf).default_cfg_weight == 2.0
    assert "guidance_scale" not in json.loads((tiny_ckpt.hf / "generation_config.json").read_text())
    assert not (hf_to_official(tiny_ckpt.hf, tmp_path / "plain") / "generation_config.json").exists()


def test_load_save_is_bit_identical(tiny_ckpt, tmp_path):
    """load -> save_janus rewrites the same folder byte for byte, unused entries included
    (the loader returns them as extras; save_janus re-reads them from the source files, no zeros)."""
    model, extras = load_official_with_extras(tiny_ckpt.official)
    saved = save_janus(model, tmp_path / "saved", copy_from=tiny_ckpt.official, extras=extras)
    assert_same_folder(tiny_ckpt.official, saved)
    # the same from the HF layout: load_hf_layout -> save_janus gives the official folder back
    model, extras = load_hf_layout_with_extras(tiny_ckpt.hf)
    saved = save_janus(model, tmp_path / "saved_from_hf", copy_from=tiny_ckpt.official, extras=extras)
    assert_same_folder(tiny_ckpt.official, saved)


def test_save_without_source_writes_zeros_for_unused(tmp_path):
    from januskit.checkpoint.init import random_model

    model = random_model(preset("tiny-janus-pro"), seed=1)
    assert list(official_state(model)) == official_key_order(model.config)  # the order shards are filled in
    t = read_tensors(save_janus(model, tmp_path / "fresh"))
    assert sorted(t) == sorted(official_key_order(model.config))
    assert t["vision_model.vision_tower.attn_pool.q.weight"].abs().sum() == 0


@torch.no_grad()
def test_load_hf_layout_gives_same_outputs(tiny_ckpt, ours):
    """januskit.load on the HF folder = januskit.load on the official folder: same tensors, same
    processor ids, same logits / image logits / decoded pixels."""
    pipe = januskit.load(tiny_ckpt.hf)
    assert_same_tensors(ours.model.state_dict(), pipe.model.state_dict())
    assert pipe.config == ours.config
    assert pipe.processor.tokenizer.image_id == ours.processor.tokenizer.image_id
    ids = torch.tensor([ours.processor.generation_prompt("a cat")])
    for m in (ours.model, pipe.model):
        h = m.llm(m.text_embeds(ids), torch.arange(ids.shape[1])[None])
        m._probe = (m.text_logits(h), m.image_logits(h), m.gen_vision_model.decode(torch.arange(64)[None]))
    for a, b in zip(ours.model._probe, pipe.model._probe):
        assert torch.equal(a, b)
    del ours.model._probe, pipe.model._probe


@torch.no_grad()
def test_folder_saved_by_transformers_loads(tiny_ckpt, hf_loader, ours, tmp_path):
    """A folder written by transformers' own save_pretrained (its config has rope_parameters instead
    of rope_theta, `dtype`, many defaults; no side file) loads directly and converts to the official
    layout; the unused official entries then come out as zeros and config.json is derived."""
    hf = hf_loader("eager")
    folder = tmp_path / "saved_by_hf"
    hf.save_pretrained(folder)
    for f in ("tokenizer.json", "preprocessor_config.json", "processor_config.json"):
        shutil.copy(tiny_ckpt.official / f, folder / f)
    assert "rope_parameters" in json.loads((folder / "config.json").read_text())["text_config"]
    pipe = januskit.load(folder)
    assert_same_tensors(ours.model.state_dict(), pipe.model.state_dict())
    back = hf_to_official(folder, tmp_path / "official")
    t = read_tensors(back)
    assert sorted(t) == sorted(official_key_order(ours.config))
    assert t["vision_model.vision_tower.attn_pool.kv.weight"].abs().sum() == 0
    assert_same_tensors(ours.model.state_dict(), load_janus(back).state_dict())


def test_sharded_conversion(tiny_ckpt, hf_loader, ours, tmp_path):
    """A small max_shard_bytes gives model-0000i-of-0000n files + an index that both januskit and
    transformers load; converting back (sharded too) is lossless."""
    from transformers import JanusForConditionalGeneration

    hf_dir = official_to_hf(tiny_ckpt.official, tmp_path / "hf_sharded", max_shard_bytes=400_000)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (hf_dir / "model.safetensors").exists()
    assert shards == sorted(p.name for p in hf_dir.glob("model-*-of-*.safetensors"))
    assert index["weight_map"].keys() == read_tensors_file(tiny_ckpt.hf / "model.safetensors").keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_tensors(hf_dir).values())

    model, info = JanusForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    want = hf_loader("eager").state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert_same_tensors(ours.model.state_dict(), januskit.load(hf_dir).model.state_dict())

    back = hf_to_official(hf_dir, tmp_path / "official_sharded", max_shard_bytes=400_000)
    assert (back / "model.safetensors.index.json").is_file()
    assert_same_tensors(read_tensors(tiny_ckpt.official), read_tensors(back))
    assert_same_tensors(ours.model.state_dict(), load_janus(back).state_dict())


def test_select_layer_minus_two_round_trip(tiny_ckpt, tmp_path):
    """A select_layer -2 config builds one SigLIP block fewer than the checkpoint holds (official
    semantics). HF gets the built blocks only; the dropped block travels in the side file."""
    src = copy_folder(tiny_ckpt.official, tmp_path / "sel2")
    edit_config(src, lambda c: c["vision_config"]["params"].update(select_layer=-2))
    hf_dir = official_to_hf(src, tmp_path / "sel2_hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["vision_config"]["num_hidden_layers"] == 1
    assert any(k.startswith("vision_model.vision_tower.blocks.1.") for k in read_tensors_file(hf_dir / SIDE_FILE))
    from transformers import JanusForConditionalGeneration

    _, info = JanusForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()), info
    back = hf_to_official(hf_dir, tmp_path / "sel2_back")
    assert_same_folder(src, back)
    assert_same_tensors(load_janus(src).state_dict(), januskit.load(hf_dir).model.state_dict())


def test_convert_entry_point(tiny_ckpt, tmp_path):
    out = convert(tiny_ckpt.official, tmp_path / "via_convert", to="hf")
    assert_same_folder(tiny_ckpt.hf, out)
    with pytest.raises(ValueError, match="'hf' or 'official'"):
        convert(tiny_ckpt.official, tmp_path / "x", to="gguf")
    with pytest.raises(ConfigError, match="not an HF transformers Janus"):
        hf_to_official(tiny_ckpt.official, tmp_path / "y")
    with pytest.raises(ConfigError, match="not an official Janus"):
        official_to_hf(tiny_ckpt.hf, tmp_path / "z")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


# ---------------------------------------------------------------------------------------------
# bad input: each error names the key / file / field, and nothing half-written is left behind

KEY = "language_model.model.layers.1.mlp.down_proj.weight"


def _fails_cleanly(src: Path, tmp_path: Path, exc, *patterns: str) -> None:
    """load_janus and official_to_hf both raise `exc` whose message contains every pattern, and the
    conversion leaves no destination (nor temporary folder) behind."""
    for fn in (lambda: load_janus(src), lambda: official_to_hf(src, tmp_path / "dst")):
        with pytest.raises(exc) as e:
            fn()
        for p in patterns:
            assert p in str(e.value), f"{p!r} not in error message: {e.value}"
    assert not (tmp_path / "dst").exists()
    assert leftovers(tmp_path, "dst") == []


def test_missing_key(tiny_ckpt, tmp_path):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    rewrite_weights(src, lambda t: t.pop(KEY))
    _fails_cleanly(src, tmp_path, CheckpointError, "missing keys (1)", KEY, str(src))


def test_renamed_key(tiny_ckpt, tmp_path):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    rewrite_weights(src, lambda t: t.__setitem__("aligner.layers.3.weight", t.pop("aligner.layers.2.weight")))
    _fails_cleanly(src, tmp_path, CheckpointError, "missing keys (1): aligner.layers.2.weight",
                   "unexpected keys (1): aligner.layers.3.weight (model.safetensors)")


def test_reshaped_key(tiny_ckpt, tmp_path):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    rewrite_weights(src, lambda t: t.__setitem__("gen_embed.weight", t["gen_embed.weight"][:, :7].contiguous()))
    _fails_cleanly(src, tmp_path, CheckpointError, "wrong shapes (1)", "gen_embed.weight", "(512, 7)", "(512, 8)")


def test_truncated_safetensors(tiny_ckpt, tmp_path):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails_cleanly(src, tmp_path, CheckpointError, str(f), "truncated")
    with pytest.raises(CheckpointError, match="truncated"):
        januskit.load(src)


def test_unknown_model_type(tiny_ckpt, tmp_path):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    edit_config(src, lambda c: c.update(model_type="llava"))
    _fails_cleanly(src, tmp_path, ConfigError, str(src / "config.json"), "model_type 'llava'")
    with pytest.raises(ConfigError, match="model_type 'llava'"):
        januskit.load(src)


def test_config_missing_field(tiny_ckpt, tmp_path):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    edit_config(src, lambda c: c.pop("gen_head_config"))
    _fails_cleanly(src, tmp_path, ConfigError, "config.json", "missing field 'gen_head_config'")


def test_config_inconsistent_field(tiny_ckpt, tmp_path):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    edit_config(src, lambda c: c["aligner_config"]["params"].update(n_embed=96))
    _fails_cleanly(src, tmp_path, ConfigError, "aligner_config.params.n_embed = 96", "LLM hidden_size 64")


def test_index_lists_missing_shard(tiny_ckpt, tmp_path):
    hf_dir = official_to_hf(tiny_ckpt.official, tmp_path / "sharded", max_shard_bytes=400_000)
    victim = sorted(hf_dir.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        januskit.load(hf_dir)
    with pytest.raises(CheckpointError, match=victim.name):
        hf_to_official(hf_dir, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_hf_layout_missing_and_reshaped_keys(tiny_ckpt, tmp_path):
    q = "model.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    src = copy_folder(tiny_ckpt.hf, tmp_path / "hf_missing")
    rewrite_weights(src, lambda t: t.pop(q))
    for fn in (lambda: januskit.load(src), lambda: hf_to_official(src, tmp_path / "dst")):
        with pytest.raises(CheckpointError, match=rf"missing keys \(1\) \['{q}'\]"):
            fn()
    src = copy_folder(tiny_ckpt.hf, tmp_path / "hf_reshaped")
    rewrite_weights(src, lambda t: t.__setitem__(q, t[q][:32].contiguous()))
    for fn in (lambda: januskit.load(src), lambda: hf_to_official(src, tmp_path / "dst")):
        with pytest.raises(CheckpointError) as e:
            fn()
        assert q in str(e.value) and "vision_model.vision_tower.blocks.0.attn.qkv.weight" in str(e.value)
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path, "dst") == []


def _official_state(tiny_ckpt) -> dict[str, torch.Tensor]:
    return read_tensors(tiny_ckpt.official)


def test_bin_checkpoint_loads_with_weights_only(tiny_ckpt, ours, tmp_path):
    """pytorch_model.bin (torch.save of the state dict) loads through torch.load(weights_only=True),
    and so does the sharded variant with pytorch_model.bin.index.json; both convert to HF too."""
    state = _official_state(tiny_ckpt)
    single = tmp_path / "bin"
    single.mkdir()
    for f in ("config.json", "tokenizer.json", "preprocessor_config.json", "processor_config.json"):
        shutil.copy(tiny_ckpt.official / f, single / f)
    sharded = copy_folder(single, tmp_path / "bin_sharded")
    torch.save(state, single / "pytorch_model.bin")
    keys = list(state)
    parts = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
             "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, ks in parts.items():
        torch.save({k: state[k] for k in ks}, sharded / name)
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}))
    for folder in (single, sharded):
        assert_same_tensors(ours.model.state_dict(), januskit.load(folder).model.state_dict())
        hf_dir = official_to_hf(folder, tmp_path / f"{folder.name}_hf")
        assert_same_tensors(read_tensors(tiny_ckpt.hf), read_tensors(hf_dir))


class _Payload:
    """Unpickling this would call _mark(); weights_only loading must refuse it instead."""

    def __reduce__(self):
        return (_mark, ())


_MARKS: list[int] = []


def _mark():
    _MARKS.append(1)
    return {}


def test_bin_with_code_is_refused(tiny_ckpt, tmp_path):
    src = tmp_path / "evil"
    src.mkdir()
    shutil.copy(tiny_ckpt.official / "config.json", src / "config.json")
    torch.save({"gen_embed.weight": torch.zeros(2), "x": _Payload()}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        load_janus(src)
    assert str(src / "pytorch_model.bin") in str(e.value) and "weights_only" in str(e.value)
    assert _MARKS == []


def test_failing_conversion_leaves_nothing_half_written(tiny_ckpt, tmp_path, monkeypatch):
    """A conversion that dies after writing some shards leaves no destination and no temporary
    folder; over an existing destination (overwrite=True) the old folder stays intact."""
    real_apply, calls = convert_mod._apply, []

    def dying_apply(plan, src, key):
        calls.append(key)
        if len(calls) > 150:
            raise OSError("disk full (simulated)")
        return real_apply(plan, src, key)

    monkeypatch.setattr(convert_mod, "_apply", dying_apply)
    with pytest.raises(OSError, match="simulated"):
        official_to_hf(tiny_ckpt.official, tmp_path / "dst", max_shard_bytes=100_000)
    assert len(calls) > 150  # it did write shards before dying
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path, "dst") == []

    existing = copy_folder(tiny_ckpt.hf, tmp_path / "existing")
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        official_to_hf(tiny_ckpt.official, existing, overwrite=True, max_shard_bytes=100_000)
    assert_same_folder(tiny_ckpt.hf, existing)
    assert leftovers(tmp_path, "existing") == []

    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        hf_to_official(tiny_ckpt.hf, tmp_path / "back", max_shard_bytes=100_000)
    assert not (tmp_path / "back").exists() and leftovers(tmp_path, "back") == []


def test_existing_destination_is_not_overwritten(tiny_ckpt, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=str(dst)):
        official_to_hf(tiny_ckpt.official, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_stale_side_file_is_not_trusted(tiny_ckpt, tmp_path):
    """If the HF config.json was edited after conversion, the official config stored in the side
    file no longer describes the model: it is ignored (with a warning) and the config is derived."""
    src = copy_folder(tiny_ckpt.hf, tmp_path / "edited")
    edit_config(src, lambda c: c["text_config"].update(rms_norm_eps=1e-5))
    with pytest.warns(UserWarning, match="no longer matches"):
        back = hf_to_official(src, tmp_path / "back")
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["language_config"]["rms_norm_eps"] == 1e-5
    assert cfg["vision_config"]["params"]["model_name"] == "januskit_vit"  # derived, not the stored text
    assert load_janus(back).config.llm.norm_eps == 1e-5


def test_conversion_needs_tokenizer(tiny_ckpt, tmp_path):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    (src / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=f"{src / 'tokenizer.json'}: not found"):
        official_to_hf(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
