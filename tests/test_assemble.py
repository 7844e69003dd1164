"""`januskit assemble`: a Stage-I starting checkpoint from an HF Llama folder, a timm SigLIP file and a
LlamaGen VQ file, all cut synthetically out of a random tiny official checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import januskit
from januskit.checkpoint.assemble import FRESH_PARTS, assemble
from januskit.checkpoint.init import init_checkpoint
from januskit.checkpoint.io import CheckpointError
from januskit.cli import main
from januskit.config import preset
from januskit.processing.tokenizer import BOS_TOKEN, EOS_TOKEN, TextTokenizer, special_tokens_for_style
from januskit.processing.synthetic_tokenizer import build_synthetic_tokenizer
from januskit.train.config import RunConfig
from januskit.train.trainer import train

PRESET = "tiny-janus-pro"
LLM, SIG, VQ = "language_model.", "vision_model.vision_tower.", "gen_vision_model."


class NotAllowed:  # a pickled class: weights_only=True must refuse it
    pass


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.clone() for k, v in sd.items() if k.startswith(prefix)}


def _base_tokenizer(n_rows: int) -> str:
    """A DeepSeek-LLM-like tokenizer.json: BPE + BOS/EOS only (no Janus specials), ids 0..n_rows-14."""
    tok = build_synthetic_tokenizer(n_rows, style="pro")
    data = json.loads(tok.to_json_str())
    drop = [t for t in special_tokens_for_style("pro") if t not in (BOS_TOKEN, EOS_TOKEN)]
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] not in drop]
    for t in drop:
        data["model"]["vocab"].pop(t)
    return json.dumps(data, ensure_ascii=False)


def _write_llm(folder: Path, sd: dict[str, torch.Tensor], tokenizer_rows: int = 910) -> None:
    c = preset(PRESET).llm
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len, "torch_dtype": "float32"}))
    (folder / "tokenizer.json").write_text(_base_tokenizer(tokenizer_rows), encoding="utf-8")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parts")
    base = init_checkpoint(root / "base", preset_name=PRESET, seed=7)
    full = load_file(str(base / "model.safetensors"))
    llm, sig, vq = _strip(full, LLM), _strip(full, SIG), _strip(full, VQ)
    _write_llm(root / "llm", llm)
    save_file(sig, str(root / "siglip.safetensors"))
    torch.save({"model": vq, "steps": 400000}, root / "vq.pt")  # LlamaGen saves a wrapped dict
    return dict(root=root, full=full, llm=llm, sig=sig, vq=vq)


def _assemble(parts: dict, dst: Path, **kw) -> Path:
    r = parts["root"]
    kw = {"preset_name": PRESET, "dtype": torch.float32, **kw}
    return assemble(kw.pop("llm_dir", r / "llm"), kw.pop("siglip", r / "siglip.safetensors"),
                    kw.pop("vq", r / "vq.pt"), dst, **kw)


def test_assemble_copies_parts_and_adds_tokens(parts, tmp_path: Path):
    dst = _assemble(parts, tmp_path / "a", seed=3)
    pipe = januskit.load(dst)  # strict official-layout load
    out = load_file(str(dst / "model.safetensors"))
    assert list(out) == list(parts["full"])  # exactly the official keys, in the official order
    for prefix, src in ((LLM, parts["llm"]), (SIG, parts["sig"]), (VQ, parts["vq"])):
        for k, v in src.items():
            assert torch.equal(out[prefix + k], v), prefix + k
    sd = pipe.model.state_dict()
    assert torch.equal(sd["language_model.model.embed_tokens.weight"], parts["llm"]["model.embed_tokens.weight"])

    tok = TextTokenizer.from_file(dst / "tokenizer.json")
    base = TextTokenizer.from_file(parts["root"] / "llm" / "tokenizer.json")
    assert tok.bos_id == base.bos_id and tok.eos_id == base.eos_id
    new = [t for t in special_tokens_for_style("pro") if not base.has_token(t)]
    ids = [tok.token_id(t) for t in new]
    assert ids == list(range(base.vocab_size, base.vocab_size + len(new)))  # next free ids, in order
    assert all(tok.encode(t, add_bos=False) == [tok.token_id(t)] for t in special_tokens_for_style("pro"))
    assert max(ids) < pipe.config.llm.vocab_size
    assert tok.is_pro_format
    assert tok.encode("a red circle", add_bos=False) == base.encode("a red circle", add_bos=False)
    assert (dst / "processor_config.json").is_file() and (dst / "preprocessor_config.json").is_file()

    # Fresh parts: a function of the seed only.
    same = load_file(str(_assemble(parts, tmp_path / "b", seed=3) / "model.safetensors"))
    other = load_file(str(_assemble(parts, tmp_path / "c", seed=4) / "model.safetensors"))
    fresh = [k for k in out if k.startswith(FRESH_PARTS)]
    assert {k.split(".")[0] for k in fresh} == {"aligner", "gen_aligner", "gen_head", "gen_embed"}
    for k in fresh:
        assert torch.equal(out[k], same[k]), k
        assert not torch.equal(out[k], other[k]), k
        assert not torch.equal(out[k], parts["full"][k]), k  # not copied from anywhere
    assert all(torch.equal(out[k], other[k]) for k in out if not k.startswith(FRESH_PARTS))


def test_cli_bf16_and_stage1_training(parts, tmp_path: Path):
    r = parts["root"]
    dst = tmp_path / "init"
    assert main(["assemble", "--llm", str(r / "llm"), "--siglip", str(r / "siglip.safetensors"), "--vq",
                 str(r / "vq.pt"), "--preset", PRESET, str(dst), "--seed", "1"]) == 0
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(str(dst / "model.safetensors"))[LLM + "lm_head.weight"].dtype == torch.bfloat16
    cfg = RunConfig.from_dict({
        "model": {"source": str(dst)},
        "stage": {"name": "janus-pro/1", "steps": 2, "batch_size": 2, "lr": 1e-3, "warmup": 0},
        "train": {"out": str(tmp_path / "run"), "micro_batch_size": 1, "seq_len": 192, "threads": 1,
                  "save_every": 2, "log_every": 1, "export_dtype": "float32", "progress": False},
        "data": {"builder": "januskit.train.data.synthetic:build", "text_len": [4, 16]},
    })
    out = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(row["loss"] > 0 for row in rows)
    trained, start = januskit.load(out).model.state_dict(), januskit.load(dst).model.state_dict()
    assert all(torch.equal(trained[k], start[k]) for k in trained if k.startswith((LLM, SIG, VQ)))  # frozen
    assert not torch.equal(trained["gen_head.vision_head.weight"], start["gen_head.vision_head.weight"])


def _fails(parts: dict, dst: Path, match: str, **kw) -> None:
    with pytest.raises((CheckpointError, ValueError)) as e:
        _assemble(parts, dst, **kw)
    for word in match.split("|"):
        assert word in str(e.value), (word, str(e.value))
    assert not dst.exists() and not any(p.name.startswith(f".{dst.name}") for p in dst.parent.iterdir())


def test_errors_name_file_and_key_and_write_nothing(parts, tmp_path: Path):
    llm = dict(parts["llm"])
    del llm["model.layers.1.mlp.up_proj.weight"]
    _write_llm(tmp_path / "llm_missing", llm)
    _fails(parts, tmp_path / "d1", "llm_missing|missing keys|model.layers.1.mlp.up_proj.weight",
           llm_dir=tmp_path / "llm_missing")

    sig = dict(parts["sig"])
    sig["pos_embed"] = torch.zeros(1, 3, sig["pos_embed"].shape[-1])
    save_file(sig, str(tmp_path / "bad_siglip.safetensors"))
    _fails(parts, tmp_path / "d2", "bad_siglip.safetensors|wrong shapes|pos_embed",
           siglip=tmp_path / "bad_siglip.safetensors")

    torch.save({"model": parts["vq"], "args": NotAllowed()}, tmp_path / "unsafe_vq.pt")
    _fails(parts, tmp_path / "d3", "unsafe_vq.pt|weights_only", vq=tmp_path / "unsafe_vq.pt")

    sig = {k: v for k, v in parts["sig"].items() if k != "attn_pool.latent"}
    save_file(sig, str(tmp_path / "nopool.safetensors"))
    _fails(parts, tmp_path / "d4", "nopool.safetensors|attn_pool.latent", siglip=tmp_path / "nopool.safetensors")

    _write_llm(tmp_path / "llm_full_vocab", parts["llm"], tokenizer_rows=1030)  # ids up to 1029 > 1024 rows
    _fails(parts, tmp_path / "d5", "tokenizer.json|1024 rows", llm_dir=tmp_path / "llm_full_vocab")
