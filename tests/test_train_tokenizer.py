"""`januskit train-tokenizer`: the bundled model's VQ (trained on flat coloured shapes) retrained on black ink
strokes reconstructs held-out strokes better than before; the output folder is the source with only the
tokenizer's tensors changed (and provenance.json recording it), loads with januskit and reproduces the recorded figures; a JanusFlow folder's VAE
likewise; bad input is refused naming what is wrong, before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import januskit
from januskit.checkpoint.official_config import to_official
from januskit.cli import DEFAULT_MODEL, main
from januskit.config import preset
from januskit.train.image_tokenizer import list_images, read_images

FAST = ["--steps", "12", "--batch-size", "4", "--lr", "5e-4", "--held-out", "8", "--threads", "1"]


def write_glyphs(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (96, 80)) -> Path:
    """Black ink strokes on white (lines and arcs of random width), not square and in both formats: nothing
    like the flat coloured shapes the bundled VQ was trained on."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.new("RGB", size, "white")
        d = ImageDraw.Draw(img)
        for _ in range(rng.integers(2, 5)):
            x0, y0, x1, y1 = (int(v) for v in rng.integers(8, min(size) - 8, 4))
            w = int(rng.integers(2, 5))
            if rng.random() < 0.5:
                d.line([(x0, y0), (x1, y1)], fill="black", width=w)
            else:
                box = [min(x0, x1), min(y0, y1), max(x0, x1) + 6, max(y0, y1) + 6]
                d.arc(box, int(rng.integers(0, 180)), int(rng.integers(180, 360)), fill="black", width=w)
        img.save(folder / f"g{i:03d}.{'png' if i % 3 else 'jpg'}")
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def test_vq_retrained_on_strokes_beats_the_base_on_held_out_images(tmp_path, capsys):
    images, out = write_glyphs(tmp_path / "ink", 40), tmp_path / "ink-model"
    assert main(["train-tokenizer", str(images), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "januskit finetune" in printed and "PSNR" in printed

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["base_model_path"] == str(DEFAULT_MODEL.resolve())
    rec = prov["image_tokenizer"]
    before, after = rec["before"]["held_out"], rec["after"]["held_out"]
    assert rec["kind"] == "vq" and rec["trained_on"]["images"] == 40 and rec["trained_on"]["train"] == 32
    assert len(rec["trained_on"]["held_out"]) == 8 and rec["settings"]["steps"] == 12
    assert after["mae_255"] < 0.95 * before["mae_255"] and after["psnr"] > before["psnr"] + 0.3, (before, after)
    assert 0 < after["usage"] <= 1 and "januskit finetune" in rec["next"]

    # The same folder but the VQ: every other file and tensor as it was; the records of how the source was made
    # and scored (the old VQ's training report in components.json among them) left behind, as an export does.
    src_files = {p.name for p in DEFAULT_MODEL.iterdir()} - {"eval.json", "recipe.json", "components.json"}
    assert {p.name for p in out.iterdir()} == src_files | {"provenance.json"}
    for name in src_files - {"model.safetensors"}:
        assert (out / name).read_bytes() == (DEFAULT_MODEL / name).read_bytes(), name
    old, new = _tensors(DEFAULT_MODEL), _tensors(out)
    assert list(old) == list(new)
    for k in old:
        assert old[k].dtype == new[k].dtype, k
        changed = not torch.equal(old[k], new[k])
        if k.startswith("gen_vision_model.") and k != "gen_vision_model.quantize.codebook_used":
            continue  # trained (most of them change; checked below)
        assert not changed, k
    assert not torch.equal(old["gen_vision_model.decoder.conv_out.weight"], new["gen_vision_model.decoder.conv_out.weight"])

    # Loads as a model and round-trips the held-out images with the recorded error.
    pipe = januskit.load(out)
    held = read_images([images / n for n in rec["trained_on"]["held_out"]], 64)
    vq = pipe.model.gen_vision_model
    with torch.no_grad():
        recon = vq.decode(vq.encode(held)).float().clamp(-1, 1)
    mae = float(((recon - held) * 0.5).abs().mean() * 255)
    assert mae == pytest.approx(after["mae_255"], abs=0.01)


def test_vae_of_a_janusflow_folder_is_retrained(tmp_path):
    pytest.importorskip("diffusers")
    from januskit.checkpoint.init import init_checkpoint

    src = init_checkpoint(tmp_path / "flow", arch="janusflow", preset_name="mini-janusflow", seed=0)
    images, out = write_glyphs(tmp_path / "ink", 12), tmp_path / "flow-ink"
    assert main(["train-tokenizer", str(images), "--model", str(src), "--out", str(out), "--steps", "8",
                 "--batch-size", "4", "--held-out", "2", "--threads", "1", "--json"]) == 0
    rec = json.loads((out / "provenance.json").read_text())["image_tokenizer"]
    assert rec["kind"] == "vae" and rec["files_changed"] == ["vae/"]
    assert rec["after"]["held_out"]["mae_255"] < rec["before"]["held_out"]["mae_255"]  # a random VAE at first
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() != \
        (src / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    pipe = januskit.load(out)
    assert pipe.vae is not None and pipe.vae.scaling_factor == pytest.approx(rec["last"]["scaling_factor"])


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_by_name_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "a.txt").write_text("not an image")
    err = _fails(capsys, ["train-tokenizer", str(empty), "--out", str(out)])
    assert "no images found" in err and str(empty) in err
    assert "no such folder" in _fails(capsys, ["train-tokenizer", str(tmp_path / "missing"), "--out", str(out)])

    bad = write_glyphs(tmp_path / "bad", 4)
    (bad / "sub").mkdir()
    (bad / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = _fails(capsys, ["train-tokenizer", str(bad), "--out", str(out)])
    assert str(bad / "sub" / "broken.png") in err and "cannot read this image" in err
    assert len(list_images(bad)) == 5

    one = write_glyphs(tmp_path / "one", 1)
    assert "need at least 2" in _fails(capsys, ["train-tokenizer", str(one), "--out", str(out)])

    # A full-size release: refused from its config alone (its VQ is general), unless --force.
    real = tmp_path / "janus-pro-1b"
    real.mkdir()
    (real / "config.json").write_text(json.dumps(to_official(preset("janus-pro-1b"), "bfloat16")))
    err = _fails(capsys, ["train-tokenizer", str(bad), "--model", str(real), "--out", str(out)])
    assert "full-size checkpoint" in err and "needs no retraining" in err and "--force" in err

    err = _fails(capsys, ["train-tokenizer", str(one), "--model", str(DEFAULT_MODEL), "--out", str(DEFAULT_MODEL)])
    assert "is MODEL_DIR" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    assert "not empty" in _fails(capsys, ["train-tokenizer", str(one), "--out", str(taken)])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".staging" in p.name]
