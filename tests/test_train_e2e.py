"""`januskit train` end to end on a real on-disk dataset (JSONL + images): the data side's builder,
the trainer, checkpoints, resume and the exported folder working together."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

import januskit
from januskit.checkpoint.init import init_checkpoint
from januskit.cli import main


def _dataset(root: Path) -> None:
    (root / "img").mkdir(parents=True)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    und, gen, txt = [], [], []
    for i, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (96, 64), rgb).save(root / "img" / f"{name}.png")
        und.append({"kind": "understanding", "images": [f"img/{name}.png"],
                    "messages": [{"role": "user", "content": "<image_placeholder>\nWhat colour is this?"},
                                 {"role": "assistant", "content": f"It is {name}."}]})
        gen.append({"kind": "generation", "caption": f"a {name} square", "image": f"img/{name}.png"})
        txt.append({"kind": "text", "text": f"The colour {name} is number {i}."})
    for name, rows in (("und", und), ("gen", gen), ("text", txt)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _config(tmp: Path, model: Path, data: Path, steps: int, stage: str = "janus-pro/3", extra: str = "") -> Path:
    """A run on the _dataset files; `extra`: more TOML tables (e.g. [flow])."""
    cfg = tmp / "run.toml"
    cfg.write_text(f"""{extra}
[model]
source = "{model}"
[stage]
name = "{stage}"
steps = {steps}
warmup = 0
batch_size = 4
lr = 1e-3
[train]
out = "{tmp / 'out'}"
micro_batch_size = 2
seq_len = 256
threads = 1
save_every = 2
log_every = 1
export_dtype = "float32"
keep_last = 2
[data]
builder = "januskit.train.data.loader:build"
understanding = "{data / 'und.jsonl'}"
text = "{data / 'text.jsonl'}"
generation = "{data / 'gen.jsonl'}"
prefetch = 0
""")
    return cfg


def test_train_on_jsonl_resume_and_load(tmp_path: Path):
    model = init_checkpoint(tmp_path / "base", preset_name="tiny-janus-pro", seed=0)
    _dataset(tmp_path / "data")
    cfg = _config(tmp_path, model, tmp_path / "data", steps=4)
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["tokens"] > 0 for r in rows)
    assert all("loss_und" in r and "loss_gen" in r for r in rows)  # Stage III ratio 5:1:4 mixes all kinds
    trained = januskit.load(out).model
    base = januskit.load(model).model
    vq_same = all(torch.equal(a, b) for a, b in zip(trained.gen_vision_model.parameters(),
                                                     base.gen_vision_model.parameters()))
    assert vq_same  # the VQ tokenizer is always frozen
    assert not torch.equal(trained.vision_model.vision_tower.pos_embed, base.vision_model.vision_tower.pos_embed)

    # Continue the same run to 6 steps with --resume: same as a straight 6-step run.
    cfg6 = _config(tmp_path, model, tmp_path / "data", steps=6)
    assert main(["train", str(cfg6), "--resume"]) == 0
    resumed = januskit.load(out).model
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    cfg_s = _config(straight_dir, model, tmp_path / "data", steps=6)
    assert main(["train", str(cfg_s)]) == 0
    straight = januskit.load(straight_dir / "out").model
    for (n, a), (_, b) in zip(resumed.named_parameters(), straight.named_parameters()):
        assert torch.equal(a, b), n
