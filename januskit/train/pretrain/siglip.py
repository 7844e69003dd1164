"""Pretrain the understanding encoder (SigLIP `VisionTower`) from scratch with the SigLIP loss.

Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training": every (image, caption) pair in a
batch is an independent binary classification, positive on matching pairs and negative elsewhere,

    logits_ij = exp(t') * <x_i, y_j> + b            x, y: L2-normalised image / text embeddings
    loss      = -1/B * sum_ij log sigmoid(z_ij * logits_ij)      z_ij = +1 positive, -1 negative

with a learnable temperature t' (initialised to log 10) and bias b (initialised to -10, so the
loss starts near its value with every pair predicted negative; the many negatives dominate).

Random captions collide (in the miniature world every one-object scene is one of only 96 captions),
so two images in a batch may share a caption. Treating such a pair as a negative would teach the model
to push apart two images that are described identically; here z_ij is +1 whenever caption i equals
caption j (token for token), not only on the diagonal. In-batch and held-out retrieval count a hit
the same way: the top caption is right if it equals the image's own caption.

What is trained: the given `VisionTower` (whose per-patch features after the final LayerNorm are what
the Janus LLM reads through its aligner), a pooling + projection head on top of it, and a small text
tower (token embedding, learned positions, pre-norm `siglip.Block`s, mean over the caption's tokens,
projection). Only the tower is kept; `SigLIPPair` holds the rest for callers that want to evaluate.

    tower = VisionTower(SigLIPConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4))
    init_vision_tower(tower, seed=0)
    history = train_siglip(tower, pixels, captions, tok.pad_id, SigLIPTrainConfig(steps=300))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ...config import SigLIPConfig
from ...models.siglip import Block, VisionTower
from ..optim import decay_groups, lr_at
from .common import check_grad_clip

__all__ = ["SigLIPTrainConfig", "SigLIPPair", "TextTower", "caption_labels", "init_vision_tower",
           "refresh_center", "retrieval_accuracy", "sigmoid_loss", "tower_image_size", "train_siglip"]

POOLS = ("mean", "attn", "flatten")


@dataclass
class SigLIPTrainConfig:
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3  # peak AdamW lr, reached after `warmup` steps, then cosine to 0 at `steps`
    warmup: int = 30
    weight_decay: float = 0.05  # matrices only (not norms, biases, positions, t', b)
    embed_dim: int = 128  # shared image/text embedding width
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    seed: int = 0  # initialises the heads and text tower, and orders the batches
    log_every: int = 25
    pool: str = "mean"  # vision head over patch features: "mean", "attn" (learned queries) or "flatten"
    # ("flatten" = one projection of all patches concatenated, i.e. a separate linear map per patch position)
    center: bool = True  # BatchNorm (no affine) on both pooled features before the projections; see SigLIPPair
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    text_max_len: int | None = None  # captions are padded to this; None = longest caption given
    vocab_size: int | None = None  # text embedding rows; None = largest id given (or pad_id) + 1
    init_log_t: float = math.log(10.0)
    init_bias: float = -10.0
    # Dense objective beside the sigmoid loss: linear heads on every patch feature classify that patch's labels
    # (train_siglip's `patch_labels`, e.g. the shape, colour and cell of the object in its grid cell), one
    # cross-entropy per factor, summed and weighted by dense_weight. Each patch token then carries its object's
    # attributes as separate linear directions, which is what the LLM's attention can look up.
    dense_classes: tuple[int, ...] = ()  # classes of each factor; () = off
    dense_weight: float = 1.0
    # The same labels read from the mean of all patch features: one linear head classifies every patch's factors
    # from that single vector, so the average (what an LLM's evenly spread attention reads) must keep which
    # attribute sits where, not a bag of attributes. Needs the dense objective; 0 = off.
    pooled_dense_weight: float = 0.0


# ---------------------------------------------------------------------------------------------
# Loss and labels

def caption_labels(captions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, B) bool: True where caption i equals caption j (the diagonal and every duplicate)."""
    ids: dict[tuple[int, ...], int] = {}
    cid = torch.tensor([ids.setdefault(tuple(c), len(ids)) for c in captions])
    return cid[:, None] == cid[None, :]


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, log_t: torch.Tensor, bias: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """SigLIP loss of (B, D) image and text embeddings (already L2-normalised) under a (B, B) bool
    positive mask: -sum_ij log sigmoid(z_ij (exp(log_t) x_i.y_j + bias)) / B, z = +1 / -1."""
    logits = img @ txt.t() * log_t.exp() + bias
    z = labels.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


# ---------------------------------------------------------------------------------------------
# Model: the tower being trained, and the parts that are thrown away afterwards

class TextTower(nn.Module):
    """Token embedding + learned positions + pre-norm `siglip.Block`s + final LayerNorm, mean over the
    caption's own tokens. `siglip.Attention` takes no mask, so pad positions are attended to; every
    caption is padded to the same fixed `max_len` (never to the batch's longest), so a caption's
    embedding depends only on the caption and never on its batchmates (the pads act as registers)."""

    def __init__(self, vocab_size: int, max_len: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text_width {width} is not divisible by text_heads {heads}")
        c = SigLIPConfig(width=width, layers=layers, heads=heads, mlp_ratio=4.0, model_name="januskit_text")
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        self.blocks = nn.ModuleList([Block(c) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) ids padded to max_len, (B,) true lengths -> (B, width) pooled features."""
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        valid = (torch.arange(tokens.shape[1]) < lengths[:, None]).to(x.dtype)  # (B, L)
        return (x * valid[..., None]).sum(1) / lengths[:, None].to(x.dtype)


class AttnPool(nn.Module):
    """`heads` learned queries, each a softmax over patches of <LN(x), q> / sqrt(width); the pooled
    vectors are concatenated (heads * width)."""

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.query = nn.Parameter(torch.zeros(heads, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.norm(x) @ self.query.t() / math.sqrt(x.shape[-1]), dim=1)  # (B, N, h)
        return torch.einsum("bnh,bnc->bhc", w, x).flatten(1)


class SigLIPPair(nn.Module):
    """The vision tower plus everything that only exists for contrastive pretraining.

    Centering (cfg.center): world images are mostly white, so at initialisation every image's pooled
    features point the same way (image-image cosine ~0.98 in the miniature preset) and captions, which
    share most of their words, do too (~0.9). Under the SigLIP loss with b = -10 the model then sits
    on a plateau (all pairs alike, loss ~ log B) until discriminative directions grow out of that
    common component: 100-400 steps of a 600-step budget. A BatchNorm without affine parameters on each
    pooled vector, before its projection, removes the shared direction from the first step (cosines
    ~0); it is part of the discarded head, so the tower's features are unaffected. In eval() it uses
    running statistics, which `refresh_center` recomputes exactly over fixed training pairs.
    """

    def __init__(self, tower: VisionTower, cfg: SigLIPTrainConfig, vocab_size: int, pad_id: int, max_len: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if cfg.pool not in POOLS:
            raise ValueError(f"pool {cfg.pool!r} is unknown; valid: {', '.join(POOLS)}")
        width = tower.vision_tower.pos_embed.shape[-1]
        self.tower = tower
        self.pad_id, self.max_len, self.vocab_size = int(pad_id), int(max_len), int(vocab_size)
        self.pool_kind = cfg.pool
        self.pool = AttnPool(width) if cfg.pool == "attn" else None
        n_in = {"mean": width, "attn": width * 4, "flatten": width * tower.vision_tower.pos_embed.shape[1]}[cfg.pool]
        self.img_proj = nn.Linear(n_in, cfg.embed_dim)
        self.img_center = nn.BatchNorm1d(n_in, affine=False) if cfg.center else nn.Identity()
        self.txt_center = nn.BatchNorm1d(cfg.text_width, affine=False) if cfg.center else nn.Identity()
        self.text = TextTower(vocab_size, max_len, cfg.text_width, cfg.text_layers, cfg.text_heads)
        self.txt_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.log_t = nn.Parameter(torch.tensor(float(cfg.init_log_t)))
        self.bias = nn.Parameter(torch.tensor(float(cfg.init_bias)))
        self.dense_classes = tuple(cfg.dense_classes)
        self.patch_head = nn.Linear(width, sum(self.dense_classes)) if self.dense_classes else None
        n_patches = tower.vision_tower.pos_embed.shape[1]
        self.pooled_head = (nn.Linear(width, n_patches * sum(self.dense_classes))
                            if self.dense_classes and cfg.pooled_dense_weight > 0 else None)
        self._init_heads(generator or torch.Generator().manual_seed(cfg.seed))

    @torch.no_grad()
    def _init_heads(self, g: torch.Generator) -> None:
        """Everything but the tower, from `g` only (nn defaults would draw from the global RNG)."""
        for name, p in self.named_parameters():
            if name.startswith("tower.") or name in ("log_t", "bias"):
                continue
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # LayerNorm scales
                p.fill_(1.0)
            else:  # Linear weights, the embedding table, text positions, pooling queries
                p.copy_(_trunc_normal(p.shape, 0.02, g))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.tower(pixels))

    def embed_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, width) tower features (what the Janus aligner reads) -> (B, embed_dim) unit embeddings."""
        if self.pool_kind == "mean":
            pooled = feats.mean(1)
        elif self.pool_kind == "attn":
            pooled = self.pool(feats)
        else:
            pooled = feats.flatten(1)
        return F.normalize(self.img_proj(self.img_center(pooled)), dim=-1)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.txt_proj(self.txt_center(self.text(tokens, lengths))), dim=-1)

    def pad(self, captions: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-id lists -> ((B, max_len) ids padded with pad_id, (B,) lengths)."""
        tokens = torch.full((len(captions), self.max_len), self.pad_id, dtype=torch.long)
        for i, c in enumerate(captions):
            tokens[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        return tokens, torch.tensor([len(c) for c in captions])


def _trunc_normal(shape: torch.Size, std: float, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g).clamp_(-2.0, 2.0).mul_(std)


@torch.no_grad()
def init_vision_tower(tower: VisionTower, seed: int) -> VisionTower:
    """Standard ViT initialisation from one seeded generator: Linear weights and positions truncated
    normal std 0.02, the patch conv LeCun normal (std 1/sqrt(fan_in)), biases 0, LayerNorms 1. The
    tower's constructor leaves pos_embed at zero and draws the rest from the global RNG."""
    g = torch.Generator().manual_seed(seed)
    for name, p in tower.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.ndim == 1:
            p.fill_(1.0)
        elif name.endswith("patch_embed.proj.weight"):
            p.copy_(_trunc_normal(p.shape, 1.0 / math.sqrt(p[0].numel()), g))
        else:
            p.copy_(_trunc_normal(p.shape, 0.02, g))
    return tower


# ---------------------------------------------------------------------------------------------
# Input checks

def tower_image_size(tower: VisionTower) -> int:
    """Input side the tower was built for (from its patch size and number of positions)."""
    vt = tower.vision_tower
    return math.isqrt(vt.pos_embed.shape[1]) * vt.patch_embed.proj.kernel_size[0]


def _check_pixels(tower: VisionTower, pixels: torch.Tensor, what: str) -> None:
    s = tower_image_size(tower)
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor (N, 3, {s}, {s}), got {type(pixels).__name__}")
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"{what}: expected shape (N, 3, {s}, {s}), got {tuple(pixels.shape)}")
    if tuple(pixels.shape[2:]) != (s, s):
        raise ValueError(f"{what}: images are {pixels.shape[2]}x{pixels.shape[3]} but the tower's image_size "
                         f"is {s} (expected (N, 3, {s}, {s}))")
    if not pixels.is_floating_point():
        raise ValueError(f"{what}: dtype {pixels.dtype}; expected float pixels normalised to [-1, 1] "
                         "(ImageTransform: x / 255, then (x - 0.5) / 0.5)")
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo < -1.01 or hi > 1.01:
        raise ValueError(f"{what}: values span [{lo:.3g}, {hi:.3g}]; expected pixels normalised to [-1, 1] "
                         "(ImageTransform: x / 255, then (x - 0.5) / 0.5)")


def _check_captions(captions: Sequence[Sequence[int]], n: int, pad_id: int, vocab_size: int | None,
                    max_len: int | None, what: str, images: str) -> None:
    if len(captions) != n:
        raise ValueError(f"{what}: {len(captions)} captions for {n} images in {images} (need one caption per image)")
    for i, c in enumerate(captions):
        if len(c) == 0:
            raise ValueError(f"{what}[{i}] is empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in c):
            raise ValueError(f"{what}[{i}] is not a list of int token ids: {list(c)[:8]!r}")
        if pad_id in c:
            raise ValueError(f"{what}[{i}] contains the pad id {pad_id}; captions must be unpadded")
        if min(c) < 0 or (vocab_size is not None and max(c) >= vocab_size):
            raise ValueError(f"{what}[{i}] has token id {max(c) if min(c) >= 0 else min(c)} outside "
                             f"[0, {vocab_size}) (vocab_size)")
        if max_len is not None and len(c) > max_len:
            raise ValueError(f"{what}[{i}] has {len(c)} tokens, more than text_max_len {max_len}")


def _check_patch_labels(tower: VisionTower, labels: torch.Tensor | None, n: int, classes: tuple[int, ...]) -> None:
    if not classes:
        if labels is not None:
            raise ValueError("patch_labels given but SigLIPTrainConfig.dense_classes is empty (the dense objective "
                             "is off)")
        return
    if any(int(c) < 2 for c in classes):
        raise ValueError(f"SigLIPTrainConfig.dense_classes {tuple(classes)}: every factor needs at least 2 classes")
    want = (n, tower.vision_tower.pos_embed.shape[1], len(classes))
    if labels is None:
        raise ValueError(f"SigLIPTrainConfig.dense_classes = {tuple(classes)} needs patch_labels {want} "
                         "(images, patches, factors)")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or tuple(labels.shape) != want:
        got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"patch_labels: expected a long tensor {want} (images, patches, factors), got {got}")
    for k, c in enumerate(classes):
        lo, hi = int(labels[..., k].min()), int(labels[..., k].max())
        if lo < 0 or hi >= c:
            raise ValueError(f"patch_labels: factor {k} spans [{lo}, {hi}], outside [0, {c}) (dense_classes[{k}])")


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def _embed(pair: SigLIPPair, pixels: torch.Tensor, captions: Sequence[Sequence[int]], chunk: int = 256
           ) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.cat([pair.encode_image(pixels[i: i + chunk]) for i in range(0, len(pixels), chunk)])
    txt = torch.cat([pair.encode_text(*pair.pad(captions[i: i + chunk])) for i in range(0, len(captions), chunk)])
    return img, txt


@torch.no_grad()
def refresh_center(pair: SigLIPPair, pixels: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                   chunk: int = 128) -> None:
    """Recompute the centering BatchNorms' running statistics as exact averages over the given
    (training) pairs; the moving averages lag behind features that change quickly early in training."""
    bns = [m for m in (pair.img_center, pair.txt_center) if isinstance(m, nn.BatchNorm1d)]
    if not bns:
        return
    was_training = pair.training
    pair.train()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the chunks below
    for s in range(0, len(pixels), chunk):
        pair.encode_image(pixels[s: s + chunk])
        pair.encode_text(tokens[s: s + chunk], lengths[s: s + chunk])
    for m in bns:
        m.momentum = 0.1
    pair.train(was_training)


@torch.no_grad()
def retrieval_accuracy(pair: SigLIPPair, pixels: torch.Tensor, captions: Sequence[Sequence[int]],
                       group: int | None = None) -> float:
    """Image -> text top-1 accuracy on (held-out) pairs. Candidates are all the given captions, or with
    `group` only those in the same consecutive block of `group` pairs (comparable to the in-batch
    figure at batch size `group`). A hit is any caption equal to the image's own (duplicates count)."""
    _check_pixels(pair.tower, pixels, "pixels")
    _check_captions(captions, len(pixels), pair.pad_id, pair.vocab_size, pair.max_len, "captions", "pixels")
    was_training = pair.training
    pair.eval()
    img, txt = _embed(pair, pixels, captions)
    pair.train(was_training)
    labels = caption_labels(captions)
    n = len(captions)
    group = group or n
    hits = 0
    for s in range(0, n, group):
        sim = img[s: s + group] @ txt[s: s + group].t()
        hits += int(labels[s: s + group, s: s + group].gather(1, sim.argmax(1, keepdim=True)).sum())
    return hits / n


# ---------------------------------------------------------------------------------------------
# Training

def _group_members(groups: Sequence[int] | None, n: int, batch_size: int) -> list[torch.Tensor] | None:
    if groups is None:
        return None
    if len(groups) != n:
        raise ValueError(f"groups: {len(groups)} group ids for {n} images in pixels (need one per image)")
    by: dict[int, list[int]] = {}
    for i, k in enumerate(groups):
        by.setdefault(int(k), []).append(i)
    big = max(by.values(), key=len)
    if len(big) > batch_size:
        raise ValueError(f"groups: group {groups[big[0]]} has {len(big)} pairs, more than batch_size {batch_size}")
    return [torch.tensor(v) for v in by.values()]


def _epoch_order(members: list[torch.Tensor] | None, n: int, g: torch.Generator) -> torch.Tensor:
    """A permutation of the n pairs: plain, or whole groups in random order (each shuffled inside), so
    that a group lands in one batch (unless it straddles a batch boundary)."""
    if members is None:
        return torch.randperm(n, generator=g)
    return torch.cat([members[k][torch.randperm(len(members[k]), generator=g)]
                      for k in torch.randperm(len(members), generator=g).tolist()])


def train_siglip(tower: VisionTower, pixels: torch.Tensor, captions: list[list[int]], pad_id: int,
                 cfg: SigLIPTrainConfig, progress: bool = True, *, groups: Sequence[int] | None = None,
                 eval_pixels: torch.Tensor | None = None, eval_captions: list[list[int]] | None = None,
                 eval_group: int | None = None, pair: SigLIPPair | None = None,
                 patch_labels: torch.Tensor | None = None) -> list[dict]:
    """Train `tower` in place with the SigLIP loss on (pixels, captions) pairs; returns the metrics of
    every logged step (every `log_every` steps and the last): step, loss (mean since the previous log),
    t = exp(t'), b, acc (in-batch image->text top-1 of the logged step's batch), lr, and, when eval
    pairs are given, eval_acc (held-out top-1 against all eval captions, or within blocks of
    `eval_group`). The tower ends in eval() mode.

    pixels: (N, 3, S, S) float, normalised like ImageTransform (mean = std = 0.5 -> [-1, 1]), S the
    tower's image_size. captions: N token-id lists (unpadded; no pad_id inside). Batches are drawn
    without replacement (a fresh permutation each epoch) from a generator seeded with cfg.seed, and the
    heads are initialised from cfg.seed too, so equal inputs and seeds give identical weights.
    `groups`: optional group id per pair; a group's pairs are drawn into the same batch (hard
    negatives: e.g. a scene and its variants with objects moved, a shape or a colour changed; with
    random batches of world scenes the colours alone tell nearly every pair apart, and the model
    learns little else).
    `pair`: pass a SigLIPPair built around `tower` to keep the text tower and heads (for
    retrieval_accuracy afterwards); by default one is built here and discarded.
    `patch_labels`: (N, patches, factors) class ids, factor k in [0, cfg.dense_classes[k]), for the dense
    objective (cfg.dense_classes needs them); the log then also carries dense_loss (summed over factors) and
    dense_acc (patches with every factor right).
    """
    n = len(pixels) if isinstance(pixels, torch.Tensor) else -1
    _check_pixels(tower, pixels, "pixels")
    if cfg.batch_size < 2:
        raise ValueError(f"batch_size {cfg.batch_size}: a contrastive batch needs at least 2 pairs")
    if cfg.batch_size > n:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {n} training pairs")
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    check_grad_clip("SigLIPTrainConfig", cfg.grad_clip)
    if (eval_pixels is None) != (eval_captions is None):
        raise ValueError("eval_pixels and eval_captions must be given together")
    all_caps = list(captions) + list(eval_captions or [])
    _check_captions(captions, n, pad_id, cfg.vocab_size, cfg.text_max_len, "captions", "pixels")
    if eval_pixels is not None:
        _check_pixels(tower, eval_pixels, "eval_pixels")
        _check_captions(eval_captions, len(eval_pixels), pad_id, cfg.vocab_size, cfg.text_max_len,
                        "eval_captions", "eval_pixels")
    _check_patch_labels(tower, patch_labels, n, cfg.dense_classes)
    if cfg.pooled_dense_weight < 0 or not math.isfinite(cfg.pooled_dense_weight):
        raise ValueError(f"SigLIPTrainConfig.pooled_dense_weight must be a finite number >= 0, got "
                         f"{cfg.pooled_dense_weight}")
    if cfg.pooled_dense_weight > 0 and not cfg.dense_classes:
        raise ValueError("SigLIPTrainConfig.pooled_dense_weight > 0 needs the dense objective (dense_classes and "
                         "patch_labels)")
    if pair is None:
        vocab = cfg.vocab_size or max(max(max(c) for c in all_caps), pad_id) + 1
        max_len = cfg.text_max_len or max(len(c) for c in all_caps)
        pair = SigLIPPair(tower, cfg, vocab, pad_id, max_len, torch.Generator().manual_seed(cfg.seed))
    elif pair.tower is not tower:
        raise ValueError("pair: built around a different VisionTower than `tower`")
    else:
        _check_captions(all_caps, len(all_caps), pair.pad_id, pair.vocab_size, pair.max_len, "captions",
                        "pixels + eval_pixels")

    tokens, lengths = pair.pad(captions)
    ids: dict[tuple[int, ...], int] = {}
    cid = torch.tensor([ids.setdefault(tuple(c), len(ids)) for c in captions])  # equal captions, equal id

    no_decay = lambda name: name.endswith("pos_embed") or name == "text.pos"  # noqa: E731 (positions, like norms)
    opt = torch.optim.AdamW(decay_groups(pair, cfg.weight_decay, no_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    members = _group_members(groups, n, cfg.batch_size)
    ref = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 2))[: 4 * cfg.batch_size]
    ref_pixels, ref_tokens, ref_lengths = pixels[ref], tokens[ref], lengths[ref]  # for refresh_center
    order, pos = _epoch_order(members, n, g), 0
    history: list[dict] = []
    loss_sum, loss_n, dense_sum, pooled_sum = 0.0, 0, 0.0, 0.0
    pair.train()
    bar = tqdm(range(1, cfg.steps + 1), desc="siglip", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if pos + cfg.batch_size > n:  # drop the epoch's remainder so every batch has batch_size pairs
            order, pos = _epoch_order(members, n, g), 0
        idx = order[pos: pos + cfg.batch_size]
        pos += cfg.batch_size
        lr = lr_at(step, peak=cfg.lr, warmup=cfg.warmup, horizon=cfg.steps)  # cosine to 0 at the last step
        for group in opt.param_groups:
            group["lr"] = lr

        feats = pair.tower(pixels[idx])
        img = pair.embed_features(feats)
        txt = pair.encode_text(tokens[idx], lengths[idx])
        labels = cid[idx][:, None] == cid[idx][None, :]  # duplicate captions are positives
        loss = sigmoid_loss(img, txt, pair.log_t, pair.bias, labels)
        if pair.patch_head is not None:
            logits = pair.patch_head(feats).split(pair.dense_classes, dim=-1)  # per factor (B, N, classes)
            lab = patch_labels[idx]
            dense = sum(F.cross_entropy(z.flatten(0, 1), lab[..., k].flatten()) for k, z in enumerate(logits))
            dense_sum += dense.item()
            loss = loss + cfg.dense_weight * dense
        if pair.pooled_head is not None:
            pooled = pair.pooled_head(feats.mean(1)).view(*feats.shape[:2], -1).split(pair.dense_classes, dim=-1)
            pooled_loss = sum(F.cross_entropy(z.flatten(0, 1), lab[..., k].flatten()) for k, z in enumerate(pooled))
            pooled_sum += pooled_loss.item()
            loss = loss + cfg.pooled_dense_weight * pooled_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(pair.parameters(), cfg.grad_clip)
        opt.step()

        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            with torch.no_grad():
                hit = labels.gather(1, (img @ txt.t()).argmax(1, keepdim=True))
            m = {"step": step, "loss": loss_sum / loss_n, "t": pair.log_t.exp().item(), "b": pair.bias.item(),
                 "acc": float(hit.float().mean()), "lr": lr}
            if pair.patch_head is not None:
                m["dense_loss"] = dense_sum / loss_n
                # a patch counts when every factor is right
                hits = torch.stack([z.argmax(-1) == lab[..., k] for k, z in enumerate(logits)]).all(0)
                m["dense_acc"] = float(hits.float().mean())
            if pair.pooled_head is not None:  # loss; patches whose every factor the mean feature gives right
                m["pooled_loss"] = pooled_sum / loss_n
                hits = torch.stack([z.argmax(-1) == lab[..., k] for k, z in enumerate(pooled)]).all(0)
                m["pooled_acc"] = float(hits.float().mean())
            loss_sum, loss_n, dense_sum, pooled_sum = 0.0, 0, 0.0, 0.0
            if eval_pixels is not None:
                refresh_center(pair, ref_pixels, ref_tokens, ref_lengths, cfg.batch_size)
                m["eval_acc"] = retrieval_accuracy(pair, eval_pixels, eval_captions, eval_group)
            history.append(m)
            bar.set_postfix({k: round(v, 3) for k, v in m.items() if k not in ("step", "lr")})
    bar.close()
    refresh_center(pair, ref_pixels, ref_tokens, ref_lengths, cfg.batch_size)
    pair.eval()
    return history
