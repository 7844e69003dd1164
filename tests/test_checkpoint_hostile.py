"""Broken and hostile checkpoint folders: each is refused with an error naming the file and the field
or key (a one-line message from the CLI, no traceback), and a refused conversion writes nothing.

Covers: config.json that is not a JSON object; integer / bool weights; corrupt side files that
convert would copy; files and shards outside the folder (index entries, symlinks); wrongly typed,
non-finite, absurd or inconsistent config fields; staging folders left by killed writes; and a
property-based fuzz of the config reader.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import januskit
from januskit.checkpoint.convert import hf_to_official, official_to_hf
from januskit.checkpoint.hf import SIDE_FILE, janus_to_hf_config, read_model_config
from januskit.checkpoint.io import _HOST, CheckpointError
from januskit.checkpoint.official import load_janus
from januskit.checkpoint.official_config import to_official
from januskit.cli import main
from januskit.config import ConfigError, preset
from januskit.models import build_model
from test_convert import copy_folder, edit_config, leftovers, read_tensors, rewrite_weights

ROOT = Path(__file__).resolve().parents[1]


def refused(fn, exc: type[BaseException], *patterns: str) -> None:
    """fn() raises `exc` (or a subclass) whose message contains every pattern."""
    with pytest.raises(exc) as e:
        fn()
    for p in patterns:
        assert p in str(e.value), f"{p!r} not in error message: {e.value}"


def convert_refused(src: Path, tmp_path: Path, exc: type[BaseException], *patterns: str) -> None:
    """Converting `src` (an HF-layout folder when it has our side file) refuses, and nothing is left at
    or beside the destination."""
    fn = hf_to_official if (src / SIDE_FILE).exists() else official_to_hf
    refused(lambda: fn(src, tmp_path / "dst"), exc, *patterns)
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path, "dst") == []


def cli_refused(capsys, argv: list[str], *patterns: str) -> None:
    """The CLI exits 2 with one line on stderr naming the problem, and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for p in patterns:
        assert p in err, f"{p!r} not in {err!r}"


# ---------------------------------------------------------------------------------------------
# 1. config.json that is not a JSON object

@pytest.mark.parametrize("text, says", [
    (b"[]", "must hold a JSON object, got list []"),
    (b'"janus"', "must hold a JSON object, got str 'janus'"),
    (b"null", "must hold a JSON object, got null None"),
    (b"{", "not valid JSON"),
    (b'{"model_type": "multi_\xff"}', "not UTF-8 text"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_config_json_not_an_object(tiny_ckpt, tmp_path, capsys, text, says):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    cfg = src / "config.json"
    cfg.write_bytes(text)
    refused(lambda: januskit.load(src), ConfigError, str(cfg), says)
    refused(lambda: official_to_hf(src, tmp_path / "dst"), ConfigError, str(cfg), says)
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path, "dst") == []
    cli_refused(capsys, ["chat", "--model", str(src), "hi"], str(cfg), says)
    cli_refused(capsys, ["convert", "--to", "hf", str(src), str(tmp_path / "dst")], str(cfg), says)
    cli_refused(capsys, ["info", str(src)], str(cfg), says)


# ---------------------------------------------------------------------------------------------
# 2. non-floating weights, and corrupt files that convert copies along

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_or_bool_weight(tiny_ckpt, tmp_path, capsys, dtype):
    key = "gen_embed.weight"
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    rewrite_weights(src, lambda t: t.__setitem__(key, t[key].to(dtype)))
    name = {torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}[dtype]
    says = (str(src / "model.safetensors"), f"tensor {key!r} has dtype {name}", "must be floating point")
    refused(lambda: januskit.load(src), CheckpointError, *says)
    convert_refused(src, tmp_path, CheckpointError, *says)
    cli_refused(capsys, ["convert", "--to", "hf", str(src), str(tmp_path / "dst")], *says)
    assert not (tmp_path / "dst").exists()


def test_integer_weight_in_hf_layout_and_bin(tiny_ckpt, tmp_path):
    q = "model.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    hf = copy_folder(tiny_ckpt.hf, tmp_path / "hf")
    rewrite_weights(hf, lambda t: t.__setitem__(q, t[q].to(torch.int16)))
    refused(lambda: januskit.load(hf), CheckpointError, f"tensor {q!r} has dtype I16")
    convert_refused(hf, tmp_path, CheckpointError, f"tensor {q!r} has dtype I16")
    # pytorch_model.bin: the same check on the unpickled tensors
    src = copy_folder(tiny_ckpt.official, tmp_path / "bin")
    state = read_tensors(tiny_ckpt.official)
    (src / "model.safetensors").unlink()
    state["gen_embed.weight"] = state["gen_embed.weight"].to(torch.uint8)
    torch.save(state, src / "pytorch_model.bin")
    refused(lambda: load_janus(src), CheckpointError, "'gen_embed.weight' has dtype uint8")


# (file, content, whether januskit.load reads the file, what the message says)
CORRUPT_SIDE_FILES = [
    ("preprocessor_config.json", "[]", True, "must hold a JSON object, got list"),
    ("preprocessor_config.json", "{", True, "not valid JSON"),
    ("preprocessor_config.json", '{"image_mean": "grey"}', True, "image_mean must be a finite number"),
    ("preprocessor_config.json", '{"image_std": [0.5, 0, 0.5]}', True, "image_std[1] must be a finite number in (0"),
    ("preprocessor_config.json", '{"image_size": 384}', True, "image_size 384 does not match the vision encoder's"),
    ("processor_config.json", '{"system_prompt": 3}', True, "system_prompt must be a string, got int 3"),
    ("processor_config.json", b"\xff\xfe", True, "not UTF-8 text"),
    ("processor_config.json", '{"image_placement": 1}', True, "image_placement must be a string, got int 1"),
    ("generation_config.json", '{"guidance_scale": NaN}', True, "guidance_scale must be a finite number"),
    ("tokenizer.json", "{", True, "invalid tokenizer file"),
    ("tokenizer_config.json", "[1]", False, "must hold a JSON object, got list [1]"),
]


@pytest.mark.parametrize("layout", ["official", "hf"])
@pytest.mark.parametrize("name, content, loaded, says", CORRUPT_SIDE_FILES)
def test_corrupt_side_file_is_refused_before_writing(tiny_ckpt, tmp_path, layout, name, content, loaded, says):
    src = copy_folder(getattr(tiny_ckpt, layout), tmp_path / "src")
    (src / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    convert_refused(src, tmp_path, ValueError, str(src / name), says)
    if loaded:
        refused(lambda: januskit.load(src), ValueError, str(src / name), says)


# ---------------------------------------------------------------------------------------------
# 3. files outside the folder

@pytest.fixture
def outside(tiny_ckpt, tmp_path) -> Path:
    """A complete copy of the checkpoint outside the folders under test: anything read from it would load."""
    return copy_folder(tiny_ckpt.official, tmp_path / "x")


@pytest.mark.parametrize("target", ["relative", "absolute"])
def test_index_pointing_outside_the_folder(tiny_ckpt, tmp_path, outside, target):
    src = copy_folder(tiny_ckpt.official, tmp_path / "a" / "b" / "src")
    (src / "model.safetensors").unlink()
    shard = "../../../x/model.safetensors" if target == "relative" else str(outside / "model.safetensors")
    keys = json.loads((outside / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (outside / "model.safetensors").read_bytes()[:8], "little")])
    index = src / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: shard for k in keys if k != "__metadata__"}}))
    says = (str(index), "weight_map lists a shard outside the folder", "outside the checkpoint folder")
    refused(lambda: januskit.load(src), CheckpointError, *says)
    convert_refused(src, tmp_path, CheckpointError, *says)


def test_index_with_wrong_shapes_of_values(tiny_ckpt, tmp_path):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    (src / "model.safetensors").unlink()
    index = src / "model.safetensors.index.json"
    for bad, says in ((["x"], "must hold a JSON object"), ({"weight_map": {"k": 3}}, "weight_map must be"),
                      ({"weight_map": {"k": "config.json"}}, "not .safetensors files: ['config.json']")):
        index.write_text(json.dumps(bad))
        refused(lambda: januskit.load(src), CheckpointError, str(index), says)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"])
def test_file_symlinked_out_of_the_folder(tiny_ckpt, tmp_path, outside, name):
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    (src / name).unlink()
    (src / name).symlink_to(outside / name)
    says = (str(src / name), "outside the checkpoint folder")
    refused(lambda: januskit.load(src), ValueError, *says)
    convert_refused(src, tmp_path, ValueError, *says)


def test_side_file_symlinked_out_is_not_copied(tiny_ckpt, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    (src / "README.md").symlink_to(secret)
    convert_refused(src, tmp_path, CheckpointError, str(src / "README.md"), "outside the checkpoint folder")
    (src / "README.md").unlink()
    (src / "vae").mkdir()
    (src / "vae" / "notes").symlink_to(tmp_path, target_is_directory=True)
    convert_refused(src, tmp_path, CheckpointError, str(src / "vae" / "notes"), "outside the checkpoint folder")


def test_huggingface_cache_layout_still_loads(tiny_ckpt, tmp_path, ours):
    """huggingface_hub's cache links snapshots/<rev>/<file> to ../../blobs/<hash>: still one repo."""
    repo = tmp_path / "models--deepseek-ai--tiny"
    snap, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(tiny_ckpt.official.iterdir())):
        (blobs / f"blob{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    pipe = januskit.load(snap)
    assert all(torch.equal(a, b) for a, b in zip(pipe.model.state_dict().values(), ours.model.state_dict().values()))
    # ... but a blobs/ folder that is itself a link elsewhere is not the cache
    (tmp_path / "elsewhere").mkdir()
    blobs.rename(tmp_path / "elsewhere" / "blobs")
    blobs.symlink_to(tmp_path / "elsewhere" / "blobs", target_is_directory=True)
    refused(lambda: januskit.load(snap), ValueError, "outside the checkpoint folder")


# ---------------------------------------------------------------------------------------------
# 4. config fields: types, finiteness, bounds, geometry

def _set(path: str, value):
    """An edit_config function setting the dotted `path` (the value None deletes the key)."""
    *parents, last = path.split(".")

    def edit(cfg: dict) -> None:
        for p in parents:
            cfg = cfg[p]
        if value is None:
            del cfg[last]
        else:
            cfg[last] = value
    return edit


OFFICIAL_FIELD_ERRORS = [
    ("language_config.hidden_size", "64", "language_config.hidden_size must be an integer in [1, 65536], got str '64'"),
    ("language_config.hidden_size", True, "language_config.hidden_size must be an integer in [1, 65536], got bool True"),
    ("language_config.num_attention_heads", 5, "language_config.num_attention_heads 5 does not divide hidden_size 64"),
    ("language_config.num_attention_heads", 64, "language_config.num_attention_heads 64 gives an odd head_dim 1"),
    ("language_config.num_key_value_heads", 3, "language_config.num_key_value_heads 3 does not divide"),
    ("language_config.rms_norm_eps", float("nan"), "language_config.rms_norm_eps must be a finite number in (0, 1], got "
                                                   "float nan"),
    ("language_config.rope_theta", float("inf"), "language_config.rope_theta must be a finite number"),
    ("language_config.max_position_embeddings", 10**9, "language_config.max_position_embeddings must be an integer in "
                                                       "[1, 1048576], got int 1000000000"),
    ("language_config.max_position_embeddings", 1e9, "max_position_embeddings must be an integer in [1, 1048576], got "
                                                     "float 1000000000.0"),
    ("language_config.vocab_size", -1, "language_config.vocab_size must be an integer in [1, 1048576], got int -1"),
    ("language_config", [], "language_config must be a JSON object, got list []"),
    ("vision_config.params.heads", 5, "vision_config.params.heads 5 does not divide vision_config.params.width 64"),
    ("vision_config.params.patch_size", 256, "vision_config.params.patch_size 256 is larger than"),
    ("vision_config.params.mlp_ratio", "4", "vision_config.params.mlp_ratio must be a finite number"),
    ("vision_config.cls", 7, "vision_config.cls must be a string, got int 7"),
    ("gen_vision_config.params.ch", 48, "gen_vision_config.params.ch 48 is not a multiple of 32"),
    ("gen_vision_config.params.ch_mult", [1, "2"], "gen_vision_config.params.ch_mult[1] must be an integer"),
    ("gen_vision_config.params.image_size", 100, "gen_vision_config.params.image_size 100 is not a multiple of the VQ "
                                                 "downsampling factor 16"),
    ("aligner_config.params.input_dim", None, "missing field 'aligner_config.params.input_dim'"),
    ("gen_head_config.params", "x", "gen_head_config.params must be a JSON object, got str 'x'"),
]


@pytest.mark.parametrize("path, value, says", OFFICIAL_FIELD_ERRORS)
def test_official_config_field_errors(tiny_ckpt, tmp_path, path, value, says):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((tiny_ckpt.official / "config.json").read_text())
    edit_config(src, _set(path, value))
    refused(lambda: read_model_config(src), ConfigError, str(src / "config.json"), says)


HF_FIELD_ERRORS = [
    ("text_config.hidden_size", "64", "text_config.hidden_size must be an integer in [1, 65536], got str '64'"),
    ("text_config.rms_norm_eps", -1e-6, "text_config.rms_norm_eps must be a finite number in (0, 1]"),
    ("text_config.head_dim", 8, "text_config.head_dim 8 != hidden_size / num_attention_heads = 16"),
    ("vision_config.num_attention_heads", 5, "vision_config.num_attention_heads 5 does not divide "
                                             "vision_config.hidden_size 64"),
    ("vq_config.base_channels", 40, "vq_config.base_channels 40 is not a multiple of 32"),
    ("vq_config.projection_dim", 96, "vq_config.projection_dim = 96 does not match the LLM hidden_size 64"),
    ("vq_config", 3, "vq_config must be a JSON object, got int 3"),
]


@pytest.mark.parametrize("path, value, says", HF_FIELD_ERRORS)
def test_hf_config_field_errors(tiny_ckpt, tmp_path, path, value, says):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((tiny_ckpt.hf / "config.json").read_text())
    edit_config(src, _set(path, value))
    refused(lambda: read_model_config(src), ConfigError, str(src / "config.json"), says)


def test_config_field_errors_end_to_end(tiny_ckpt, tmp_path, capsys):
    """The same checks stop januskit.load, both conversions and the CLI before any weight is read."""
    src = copy_folder(tiny_ckpt.official, tmp_path / "src")
    edit_config(src, _set("language_config.hidden_size", "64"))
    says = (str(src / "config.json"), "language_config.hidden_size must be an integer")
    refused(lambda: januskit.load(src), ConfigError, *says)
    convert_refused(src, tmp_path, ConfigError, *says)
    cli_refused(capsys, ["convert", "--to", "hf", str(src), str(tmp_path / "dst")], *says)
    cli_refused(capsys, ["chat", "--model", str(src), "hi"], *says)
    hf = copy_folder(tiny_ckpt.hf, tmp_path / "hf")
    edit_config(hf, _set("text_config.num_attention_heads", 3))
    says = (str(hf / "config.json"), "text_config.num_attention_heads 3 does not divide hidden_size 64")
    refused(lambda: januskit.load(hf), ConfigError, *says)
    convert_refused(hf, tmp_path, ConfigError, *says)


# ---------------------------------------------------------------------------------------------
# 5. staging folders of killed writes

KILLED_WRITE = """
import os, signal, sys
from januskit.checkpoint.io import atomic_folder
with atomic_folder(sys.argv[1], overwrite=True) as tmp:
    for f in sys.argv[2:]:  # a copy complete enough to load, as a write killed at its end leaves
        (tmp / os.path.basename(f)).write_bytes(open(f, "rb").read())
    os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_write(dst: Path, files: list[Path]) -> Path:
    """Run atomic_folder(dst) in a process killed mid-write; return the staging folder it leaves."""
    before = set(dst.parent.iterdir()) if dst.parent.exists() else set()
    r = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(dst), *map(str, files)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    (left,) = set(dst.parent.iterdir()) - before
    assert left.name.startswith(f".{dst.name}.staging-{_HOST}-")
    return left


def test_killed_convert_leaves_nothing_loadable_and_the_next_run_cleans_up(tiny_ckpt, tmp_path):
    dst = tmp_path / "dst"
    stale = killed_write(dst, sorted(tiny_ckpt.hf.iterdir()))
    assert not dst.exists()
    # complete, but a staging folder: refused by name
    for fn in (lambda: januskit.load(stale), lambda: hf_to_official(stale, tmp_path / "back")):
        refused(fn, CheckpointError, str(stale), "staging folder")
    # staging folders the next run must keep: a live writer's (this process), another host's, not ours
    live = tmp_path / f".dst.staging-{_HOST}-{os.getpid()}-live1234"
    other_host = tmp_path / f".dst.staging-otherhost{_HOST}-{stale.name.split('-')[-2]}-abcd1234"
    other_dst = tmp_path / f".dst2.staging-{_HOST}-{stale.name.split('-')[-2]}-abcd1234"
    legacy = tmp_path / ".dst.abcd1234"
    for d in (live, other_host, other_dst, legacy):
        d.mkdir()
    official_to_hf(tiny_ckpt.official, dst)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
        p.name for p in (live, other_host, other_dst, legacy))
    assert januskit.load(dst).config == januskit.load(tiny_ckpt.hf).config


def test_killed_export_is_cleaned_by_the_next_export(tiny_ckpt, tmp_path):
    """A run's export stages in <out>/..export.staging-*: the resumed run's export removes the one a
    killed export left, and the run folder ends with the model and no hidden folder."""
    from januskit.checkpoint.official import load_official_with_extras
    from januskit.train.checkpoints import export_model
    from januskit.train.config import ModelSection

    out = copy_folder(tiny_ckpt.official, tmp_path / "run")
    stale = killed_write(out / ".export", sorted(tiny_ckpt.official.iterdir()))
    assert stale.parent == out and stale.name.startswith("..export.staging-")
    model, extras = load_official_with_extras(tiny_ckpt.official)
    export_model(model, out, ModelSection(source=str(tiny_ckpt.official)), torch.float32, extras)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert januskit.load(out).config == model.config


# ---------------------------------------------------------------------------------------------
# fuzz: the config reader either reads a config or raises ConfigError naming config.json

def _bases() -> dict[str, dict]:
    c = preset("tiny-janus-pro")
    return {"janus": to_official(c), "janusflow": to_official(preset("tiny-janusflow")),
            "hf": janus_to_hf_config(c, image_token_id=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)}


BASES = _bases()
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=6))
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                        max_size=3), max_leaves=8)
# Values near the valid ones, where a missing check would slip through rather than fail loudly.
NEAR = st.sampled_from([0, 1, 2, 3, 5, 7, 16, 31, 33, 48, 64, 65, 96, 128, 1024, 65536, 65537, 2**20 + 1, -1,
                        1e-9, 0.5, 1.0, 4.0, 1e9, "64", True, False, [], {}, [1], [0], [1, 2, 3], None])


def _paths(d, prefix=()) -> list[tuple]:
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_fuzz_config_reader(fuzz_dir, data):
    kind = data.draw(st.sampled_from(["bytes", "json", *BASES]), label="kind")
    cfg_path = fuzz_dir / "config.json"
    if kind == "bytes":
        cfg_path.write_bytes(data.draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode)))
    elif kind == "json":
        cfg_path.write_text(json.dumps(data.draw(JSON, label="value")))
    else:
        cfg = copy.deepcopy(BASES[kind])
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            *parent, last = data.draw(st.sampled_from(_paths(cfg)), label="path")
            holder = cfg
            for p in parent:
                holder = holder[p]
            if isinstance(holder, dict) and data.draw(st.booleans(), label="delete"):
                del holder[last]
            else:
                holder[last] = data.draw(NEAR | JSON, label="value")
        cfg_path.write_text(json.dumps(cfg))
    try:
        arch, c = read_model_config(fuzz_dir)
    except ConfigError as e:  # anything else (TypeError, KeyError, ...) fails the test
        assert str(cfg_path) in str(e)
        return
    with torch.device("meta"):  # a config that reads must also build
        build_model(c)
