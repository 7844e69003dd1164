"""SigLIP pretraining of the understanding tower (januskit.train.pretrain.siglip) on miniature-world
images at a micro size (32 px, patch 8, width 32, one block): each test takes a second or less."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from januskit.config import SigLIPConfig
from januskit.models.siglip import VisionTower
from januskit.processing.image import ImageTransform
from januskit.processing.synthetic_tokenizer import build_synthetic_tokenizer
from januskit.train.pretrain import siglip as sp
from januskit.train.pretrain.siglip import (SigLIPPair, SigLIPTrainConfig, caption_labels, init_vision_tower,
                                            retrieval_accuracy, sigmoid_loss, train_siglip)
from januskit.world.render import render
from januskit.world.scene import CELL_NAMES, random_scene

SIZE = 32
MICRO = SigLIPConfig(image_size=SIZE, patch_size=8, width=32, layers=1, heads=2, model_name="micro_vit")


def micro_cfg(**kw) -> SigLIPTrainConfig:
    base = dict(steps=40, batch_size=32, lr=2e-3, warmup=5, embed_dim=32, text_width=32, text_layers=1,
                text_heads=2, log_every=10, seed=0)
    return SigLIPTrainConfig(**{**base, **kw})


def caption(scene) -> str:  # stand-in for januskit.world.captions.describe
    parts = [f"a {o.colour} {o.shape} at the {CELL_NAMES[o.cell]}" for o in scene]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(256)]
    texts = [caption(s) for s in scenes]
    tok = build_synthetic_tokenizer(512, style="pro", seed_text="\n".join(texts))
    t = ImageTransform(size=SIZE)
    pixels = torch.stack([t(render(s, SIZE)) for s in scenes])
    return pixels, [tok.encode(x) for x in texts], tok.pad_id


def tower(seed: int = 0) -> VisionTower:
    return init_vision_tower(VisionTower(MICRO), seed)


def test_loss_falls_and_metrics(world):
    pixels, caps, pad = world
    tw = tower()
    hist = train_siglip(tw, pixels[:192], caps[:192], pad, micro_cfg(), progress=False,
                        eval_pixels=pixels[192:], eval_captions=caps[192:])
    assert [m["step"] for m in hist] == [10, 20, 30, 40]
    assert set(hist[0]) == {"step", "loss", "t", "b", "acc", "lr", "eval_acc"}
    assert hist[-1]["loss"] < 0.75 * hist[0]["loss"], hist
    assert all(0.0 <= m["acc"] <= 1.0 and 0.0 <= m["eval_acc"] <= 1.0 for m in hist)
    assert not tw.training


def test_gradients_reach_the_tower(world):
    pixels, caps, pad = world
    tw = tower()
    pair = SigLIPPair(tw, micro_cfg(), 512, pad, max(map(len, caps)))
    tokens, lengths = pair.pad(caps[:8])
    loss = sigmoid_loss(pair.encode_image(pixels[:8]), pair.encode_text(tokens, lengths), pair.log_t, pair.bias,
                        caption_labels(caps[:8]))
    loss.backward()
    for name, p in tw.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert pair.log_t.grad is not None and pair.bias.grad is not None
    # and training moves every tower tensor
    before = {k: v.clone() for k, v in tw.state_dict().items()}
    train_siglip(tw, pixels, caps, pad, micro_cfg(steps=2), progress=False)
    changed = [k for k, v in tw.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == list(before), set(before) - set(changed)


def test_caption_labels_mark_duplicates():
    labels = caption_labels([[5, 6], [7], [5, 6], [5]])
    want = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(labels, want)


def test_sigmoid_loss_matches_hand_computation():
    # images 0 and 2 share a caption: pairs (0, 2) and (2, 0) are positives too
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    log_t, bias = torch.tensor(math.log(2.0)), torch.tensor(-1.0)
    # logits = 2 * cos - 1; cos rows: [1, 0, .6], [0, 1, .8], [1, 0, .6]
    logit = [[1.0, -1.0, 0.2], [-1.0, 1.0, 0.6], [1.0, -1.0, 0.2]]
    z = [[1, -1, 1], [-1, 1, -1], [1, -1, 1]]
    want = sum(math.log1p(math.exp(-z[i][j] * logit[i][j])) for i in range(3) for j in range(3)) / 3
    got = sigmoid_loss(img, txt, log_t, bias, labels)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # treating the duplicate as a negative flips z on (0, 2) and (2, 0): log(1 + e^-l) -> log(1 + e^l),
    # i.e. +l per pair: (0.2 + 1.0) / 3 more
    diag = sigmoid_loss(img, txt, log_t, bias, torch.eye(3, dtype=torch.bool))
    assert diag.item() - got.item() == pytest.approx(1.2 / 3, rel=1e-5)


def test_training_labels_come_from_caption_equality(world, monkeypatch):
    pixels, caps, pad = world
    caps = [caps[i % 3] for i in range(64)]  # three captions, each repeated: many in-batch duplicates
    seen = []

    def spy(img, txt, log_t, bias, labels):
        seen.append((txt.detach(), labels))
        return sigmoid_loss(img, txt, log_t, bias, labels)

    monkeypatch.setattr(sp, "sigmoid_loss", spy)
    train_siglip(tower(), pixels[:64], caps, pad, micro_cfg(steps=3, batch_size=16), progress=False)
    assert len(seen) == 3
    for txt, labels in seen:  # a caption's embedding is a function of the caption alone
        same_text = (txt[:, None, :] == txt[None, :, :]).all(-1)
        assert torch.equal(labels, same_text)
        assert labels.sum() > 16  # off-diagonal positives present


def test_same_seed_same_weights(world):
    pixels, caps, pad = world
    cfg = micro_cfg(steps=6, log_every=3)
    a, b, c = tower(), tower(), tower()
    ha = train_siglip(a, pixels, caps, pad, cfg, progress=False)
    hb = train_siglip(b, pixels, caps, pad, cfg, progress=False)
    train_siglip(c, pixels, caps, pad, micro_cfg(steps=6, log_every=3, seed=1), progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ha == hb
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_retrieval_accuracy_counts_duplicate_captions(world):
    pixels, caps, pad = world
    pair = SigLIPPair(tower(), micro_cfg(), 512, pad, max(map(len, caps)))
    same = [caps[0]] * 10  # every candidate is the right caption
    assert retrieval_accuracy(pair, pixels[:10], same) == 1.0
    cands = caps[:40]
    cands[8:12] = [cands[15]] * 4  # duplicates in the second group of 8 (the untrained pair picks caption 15 there)
    acc = retrieval_accuracy(pair, pixels[:40], cands, group=8)
    pair.eval()
    with torch.no_grad():  # by hand: per group of 8, does the most similar caption read the same as the image's own?
        img, txt = pair.encode_image(pixels[:40]), pair.encode_text(*pair.pad(cands))
    pick = []
    for i in range(40):
        g = i - i % 8  # the first pair of i's group
        pick.append(g + int((img[i] @ txt[g:g + 8].t()).argmax()))
    assert acc == sum(cands[j] == cands[i] for i, j in enumerate(pick)) / 40
    assert 0 < acc < 1 and any(j != i and cands[j] == cands[i] for i, j in enumerate(pick))  # duplicates counted


def test_bad_input_is_a_clear_value_error(world):
    pixels, caps, pad = world
    tw = tower()
    cfg = micro_cfg(steps=1)
    with pytest.raises(ValueError, match=r"31 captions for 32 images"):
        train_siglip(tw, pixels[:32], caps[:31], pad, cfg, progress=False)
    big = torch.zeros(32, 3, 64, 64)
    with pytest.raises(ValueError, match=r"images are 64x64 but the tower's image_size is 32"):
        train_siglip(tw, big, caps[:32], pad, cfg, progress=False)
    with pytest.raises(ValueError, match=r"expected shape \(N, 3, 32, 32\), got \(32, 32, 32\)"):
        train_siglip(tw, pixels[:32, 0], caps[:32], pad, cfg, progress=False)
    with pytest.raises(ValueError, match=r"values span \[\d+, 255\]; expected pixels normalised to \[-1, 1\]"):
        train_siglip(tw, (pixels[:32] + 1) * 127.5, caps[:32], pad, cfg, progress=False)
    with pytest.raises(ValueError, match=r"captions\[3\] is empty"):
        train_siglip(tw, pixels[:32], caps[:3] + [[]] + caps[4:32], pad, cfg, progress=False)
    with pytest.raises(ValueError, match=r"batch_size 32 is larger than the 16 training pairs"):
        train_siglip(tw, pixels[:16], caps[:16], pad, cfg, progress=False)
    with pytest.raises(ValueError, match=r"eval_captions: 4 captions for 5 images in eval_pixels"):
        train_siglip(tw, pixels[:32], caps[:32], pad, cfg, progress=False, eval_pixels=pixels[:5],
                     eval_captions=caps[:4])
    with pytest.raises(ValueError, match=r"grad_clip must be > 0, or None for no clipping"):  # 0 no longer means off
        train_siglip(tw, pixels[:32], caps[:32], pad, micro_cfg(steps=1, grad_clip=0.0), progress=False)


def test_groups_are_drawn_into_one_batch():
    groups = [i // 4 for i in range(40)]  # ten groups of four
    members = sp._group_members(groups, 40, 8)
    order = sp._epoch_order(members, 40, torch.Generator().manual_seed(0)).tolist()
    assert sorted(order) == list(range(40))
    for s in range(0, 40, 4):  # groups of 4 stay contiguous, so a batch of 8 holds two whole groups
        assert len({i // 4 for i in order[s: s + 4]}) == 1
    with pytest.raises(ValueError, match=r"groups: group 0 has 9 pairs, more than batch_size 8"):
        sp._group_members([0] * 9 + [1], 10, 8)
    with pytest.raises(ValueError, match=r"groups: 3 group ids for 10 images"):
        sp._group_members([0, 1, 2], 10, 8)


def test_patch_labels_name_each_cells_object():
    from januskit.world.scene import COLOUR_NAMES, PATCH_CLASSES, SHAPES, Obj, patch_labels

    scene = (Obj("circle", "red", 0), Obj("diamond", "purple", 3))
    lab = patch_labels(scene, 4).reshape(4, 4, 3)  # 2 x 2 patches a cell; (shape, colour, cell) each
    circle, diamond = 1 + SHAPES.index("circle"), 1 + SHAPES.index("diamond")
    red, purple = 1 + COLOUR_NAMES.index("red"), 1 + COLOUR_NAMES.index("purple")
    assert (circle, diamond, red, purple) == (1, 4, 1, 6) and PATCH_CLASSES == (5, 7, 4)
    assert lab[..., 0].tolist() == [[circle, circle, 0, 0], [circle, circle, 0, 0], [0, 0, diamond, diamond],
                                    [0, 0, diamond, diamond]]
    assert lab[..., 1].tolist() == [[red, red, 0, 0], [red, red, 0, 0], [0, 0, purple, purple], [0, 0, purple, purple]]
    assert lab[..., 2].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert patch_labels((), 8)[:, :2].tolist() == [[0, 0]] * 64
    with pytest.raises(ValueError, match="per_side 3 is odd"):
        patch_labels(scene, 3)


def test_dense_objective_learns_patch_labels_and_checks_them(world):
    """The dense heads learn each patch's cell object and cell (every factor right well above the empty-cell
    share), the log carries it, and labels that do not fit are refused by name."""
    from januskit.world.scene import PATCH_CLASSES, patch_labels

    pixels, caps, pad = world
    rng = np.random.default_rng(0)  # the fixture's scenes again, for their labels
    scenes = [random_scene(rng) for _ in range(256)]
    labels = torch.from_numpy(np.stack([patch_labels(s, SIZE // 8) for s in scenes]))
    cfg = micro_cfg(steps=200, dense_classes=PATCH_CLASSES, lr=3e-3, log_every=40)
    hist = train_siglip(tower(), pixels, caps, pad, cfg, progress=False, patch_labels=labels)
    assert {"dense_loss", "dense_acc"} <= set(hist[-1])
    empty = float((labels[..., 0] == 0).float().mean())  # right on empty patches only would score this
    assert hist[-1]["dense_loss"] < 0.6 * hist[0]["dense_loss"] and hist[-1]["dense_acc"] > empty + 0.15, (hist, empty)
    with pytest.raises(ValueError, match=r"dense_classes = \(5, 7, 4\) needs patch_labels \(256, 16, 3\)"):
        train_siglip(tower(), pixels, caps, pad, cfg, progress=False)
    with pytest.raises(ValueError, match=r"expected a long tensor \(256, 16, 3\).*got \(256, 15, 3\)"):
        train_siglip(tower(), pixels, caps, pad, cfg, progress=False, patch_labels=labels[:, :15])
    bad = labels.clone()
    bad[3, 5, 1] = 9
    with pytest.raises(ValueError, match=r"factor 1 spans \[0, 9\], outside \[0, 7\) \(dense_classes\[1\]\)"):
        train_siglip(tower(), pixels, caps, pad, cfg, progress=False, patch_labels=bad)
    with pytest.raises(ValueError, match="dense objective is off"):
        train_siglip(tower(), pixels, caps, pad, micro_cfg(), progress=False, patch_labels=labels)


def test_pooled_dense_objective_reads_every_patch_from_the_mean_and_leaves_the_rest_alone(world):
    """pooled_dense_weight: one head reads every patch's labels from the mean patch feature; it learns (the
    logged pooled_loss falls, pooled_acc above the empty-patch share), its loss reaches the tower, and it is refused without the dense objective or with a bad weight."""
    from januskit.world.scene import PATCH_CLASSES, patch_labels

    pixels, caps, pad = world
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(np.stack([patch_labels(random_scene(rng), SIZE // 8) for _ in range(256)]))
    cfg = micro_cfg(steps=200, dense_classes=PATCH_CLASSES, lr=3e-3, log_every=40, pooled_dense_weight=1.0)
    hist = train_siglip(tower(), pixels, caps, pad, cfg, progress=False, patch_labels=labels)
    empty = float((labels[..., 0] == 0).float().mean())
    assert hist[-1]["pooled_loss"] < 0.8 * hist[0]["pooled_loss"] and hist[-1]["pooled_acc"] > empty, (hist, empty)
    off = dataclasses.replace(cfg, steps=5, pooled_dense_weight=0.0)
    a, b = tower(), tower()
    assert "pooled_acc" not in train_siglip(a, pixels, caps, pad, off, progress=False, patch_labels=labels)[-1]
    train_siglip(b, pixels, caps, pad, dataclasses.replace(off, pooled_dense_weight=1.0), progress=False,
                 patch_labels=labels)  # the pooled loss reaches the tower's weights
    assert not torch.equal(a.state_dict()["vision_tower.pos_embed"], b.state_dict()["vision_tower.pos_embed"])
    with pytest.raises(ValueError, match="pooled_dense_weight > 0 needs the dense objective"):
        train_siglip(tower(), pixels, caps, pad, micro_cfg(pooled_dense_weight=1.0), progress=False)
    with pytest.raises(ValueError, match="pooled_dense_weight must be a finite number >= 0, got -1"):
        train_siglip(tower(), pixels, caps, pad, dataclasses.replace(cfg, pooled_dense_weight=-1.0), progress=False,
                     patch_labels=labels)
