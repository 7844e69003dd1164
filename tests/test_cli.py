"""The command line, end to end on a tiny random checkpoint: init, info, generate, chat, convert, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from januskit.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "model"
    assert main(["init", str(d), "--preset", "tiny-janus-pro", "--seed", "7"]) == 0
    return d


def test_init_writes_official_layout(ckpt: Path):
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
                     "tokenizer.json"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "multi_modality"
    assert cfg["gen_vision_config"]["cls"] == "VQ-16"


def test_info(ckpt: Path, capsys):
    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "official" and info["arch"] == "janus"
    assert info["preset"] == "tiny-janus/tiny-janus-pro"
    assert info["tokenizer"]["format"].startswith("Janus-Pro")
    assert info["tensors"] == 416  # 402 model tensors + 13 attn_pool entries + codebook_used


def test_info_describes_janusflow(tmp_path: Path, capsys):
    """A JanusFlow preset or folder: the UViT generation path over the VAE latent instead of a VQ
    tokenizer (`info tiny-janusflow` once crashed on the missing .vq), and the folder's vae/."""
    from januskit.checkpoint.init import init_checkpoint

    # tiny-janusflow: 4x16x16 latent, patchify 2/2 -> 8x8 grid = 64 tokens; UViT width 32.
    flow = {"arch": "janusflow", "preset": "tiny-janusflow",
            "understanding_encoder": "SigLIP januskit_tiny_vit: 2 blocks, width 64, 128px -> 64 tokens",
            "generation_latent": "VAE latent 4x16x16 -> 64 tokens",
            "generation_encoder": "ShallowUViT: patchify 2/2, width 32, 2 ConvNeXt blocks",
            "generation_decoder": "ShallowUViT: width 32, 2 ConvNeXt blocks, 1 unpatchify -> 4 latent channels"}
    assert main(["info", "tiny-janusflow", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {k: info[k] for k in flow} == flow and "generation_tokenizer" not in info
    ckpt = init_checkpoint(tmp_path / "jf", arch="janusflow", seed=0, vae=False)
    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {k: info[k] for k in flow} == flow and info["layout"] == "official"
    assert info["vae"] == "none in the folder (load with --vae DIR)"
    assert set(info["parameters_millions"]) == {
        "beg_of_und_embed", "language_model", "vision_und_enc_model", "vision_und_enc_aligner", "vision_gen_enc_model",
        "vision_gen_enc_aligner", "vision_gen_dec_model", "vision_gen_dec_aligner", "vision_gen_dec_aligner_norm"}
    (ckpt / "vae").mkdir()
    (ckpt / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4,
                                                          "block_out_channels": [8, 16, 32], "scaling_factor": 0.5}))
    assert main(["info", str(ckpt)]) == 0
    assert "vae: unusable: VAE folder " in capsys.readouterr().out  # config but no weights
    (ckpt / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # info reads no weights
    assert main(["info", str(ckpt)]) == 0
    assert "\nvae: AutoencoderKL in vae/: 4 latent channels, factor 4, scaling 0.5\n" in capsys.readouterr().out


def test_generate_json_and_files(ckpt: Path, tmp_path: Path, capsys):
    out = tmp_path / "imgs"
    assert main(["generate", "--model", str(ckpt), "a red circle", "-n", "2", "--seed", "5", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == [str(out / "img_5_000.png"), str(out / "img_5_001.png")]
    assert summary["tokens_per_image"] == 64
    a = np.asarray(Image.open(out / "img_5_000.png"))
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    # Same seed again -> identical pixels.
    assert main(["generate", "--model", str(ckpt), "a red circle", "-n", "1", "--seed", "5", "--out",
                 str(tmp_path / "again"), "--json"]) == 0
    capsys.readouterr()
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "again" / "img_5_000.png")))


def test_generate_cfg_weight_alias_and_janusflow(ckpt: Path, tmp_path: Path, capsys):
    """--cfg is --cfg-weight's older name; on JanusFlow the summary reports steps and the latent shape,
    and the Janus-only flags are not used."""
    from januskit.checkpoint.init import init_checkpoint

    for flag in ("--cfg-weight", "--cfg"):
        assert main(["generate", "--model", str(ckpt), "a red circle", "--seed", "5", "--out", str(tmp_path / flag),
                     flag, "2.5", "--json"]) == 0
        s = json.loads(capsys.readouterr().out)
        assert (s["cfg"], s["temperature"], s["tokens_per_image"]) == (2.5, 1.0, 64) and "steps" not in s
    a, b = (np.asarray(Image.open(tmp_path / f / "img_5_000.png")) for f in ("--cfg-weight", "--cfg"))
    assert np.array_equal(a, b)
    flow = init_checkpoint(tmp_path / "jf", arch="janusflow", seed=0)
    assert main(["generate", "--model", str(flow), "a red circle", "-n", "2", "--steps", "2", "--temperature", "0.5",
                 "--out", str(tmp_path / "jf-out"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["cfg"], s["steps"], s["latent_shape"]) == (2.0, 2, [4, 16, 16]) and "temperature" not in s
    assert len(s["files"]) == 2


def test_chat_json_matches_stream(ckpt: Path, tmp_path: Path, capsys):
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (0, 128, 255)).save(img)
    args = ["chat", "--model", str(ckpt), "--image", str(img), "What colour?", "--max-new-tokens", "6"]
    assert main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == [str(img)]
    assert 1 <= summary["new_tokens"] <= 6
    assert main(args) == 0
    assert capsys.readouterr().out == summary["answer"] + "\n"


def test_convert_round_trip(ckpt: Path, tmp_path: Path):
    from safetensors.torch import load_file

    assert main(["convert", "--to", "hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "janus"
    assert main(["convert", "--to", "official", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    a, b = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def test_errors_are_clear(ckpt: Path, tmp_path: Path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "nope: no such checkpoint folder" in capsys.readouterr().err
    assert main(["init", str(ckpt)]) == 2  # refuses to overwrite
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["init", str(tmp_path / "x"), "--preset", "janus-9b"])
    assert "invalid choice: 'janus-9b'" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert main(["info", str(bad)]) == 2
    assert "unknown architecture: model_type 'llava'" in capsys.readouterr().err
    assert main(["chat", "--model", str(ckpt), "--image", str(tmp_path / "missing.png"), "hi"]) == 2
    assert "missing.png: file not found" in capsys.readouterr().err
