"""Pre-training a (small) VQ tokenizer from scratch: the LlamaGen / Janus VQ-16 recipe without the
perceptual and adversarial terms, for images of flat colours where pixel losses are enough.

One step, top to bottom (`vq_forward` then `train_vq`):
    z  = quant_conv(encoder(x))                      (B, D, h, w), D = codebook_dim
    ids = quantize.nearest(z)                        the inference code path: L2-normalised z and codebook
    zn = normalize(z), e = quantize.lookup(ids)      e is already a normalised codebook row
    zq = zn + sg(e - zn)                             straight-through: decoder sees e, encoder gets its grad
    x' = decoder(post_quant_conv(zq))
    loss = L1(x', x) + L2(x', x) + w * ||sg(zn) - e||^2 + beta * ||zn - sg(e)||^2

Both VQ terms are taken on the normalised vectors, as LlamaGen does with l2_norm codebooks, and the ids
come from `VectorQuantizer.nearest` itself, so `VQModel.encode` picks exactly the codes training used.

Dead-code restart (optional, on by default): a code that got no assignment for `restart_after` steps is
re-seeded from a latent of the current batch, drawn with probability proportional to its squared
distance to its current code (k-means++ style: flat images are mostly background, and uniform draws
would mostly re-seed codes onto latents the codebook already covers). Its AdamW moments are zeroed.
All randomness (batch order, restarts) comes from generators seeded with `cfg.seed`, so the same model
init + the same images + the same config give bit-identical weights.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ...models.vq import AttnBlock, VQModel
from ..optim import decay_groups
from .common import WarmupCosine

log = logging.getLogger("januskit.train.vq")

RANGE_TOL = 1e-3  # slack on the [-1, 1] input range check (float rounding of x / 127.5 - 1)


@dataclass(frozen=True, kw_only=True)
class VQTrainConfig(WarmupCosine):
    # Defaults: the miniature preset (64x64, 512 codes) in ~5 minutes on one CPU thread (~0.6 s/step).
    steps: int = 500
    batch_size: int = 16  # at a fixed compute budget, more small steps beat fewer large ones here
    lr: float = 1e-3  # peak AdamW lr (after warm-up); 2e-3 trains about the same
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0  # on conv weights only; never on the codebook, norms or biases
    warmup: int = 50  # linear warm-up steps from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio at the last step; 1.0 = constant
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    beta: float = 0.25  # commitment weight
    codebook_weight: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    restart_after: int | None = 50  # re-seed codes unused for this many steps; None = never
    restart_until: float = 0.9  # no restarts after this fraction of the steps (let the decoder settle)
    seed: int = 0
    log_every: int = 50  # metrics are means over each window of this many steps
    # False: every attention block of the encoder and decoder is held at the identity (its output projection
    # zeroed and frozen), so a token sees only its convolutions' receptive field: a more local tokenizer in
    # the same checkpoint layout (the attention weights stay, unused).
    attention: bool = True

    def validate(self) -> None:
        self.check_run()
        if not 0.0 <= self.restart_until <= 1.0:
            raise ValueError(f"VQTrainConfig.restart_until must be in [0, 1], got {self.restart_until}")
        if self.restart_after is not None and self.restart_after < 1:
            raise ValueError(f"VQTrainConfig.restart_after must be >= 1 or None, got {self.restart_after}")


@dataclass
class VQForward:
    recon: torch.Tensor  # (B, 3, H, W) decoder output
    ids: torch.Tensor  # (B, h*w) code ids, row-major (what VQModel.encode returns)
    z: torch.Tensor  # (B, D, h, w) L2-normalised encoder latents (differentiable)
    codebook_loss: torch.Tensor  # () mean ||sg(z) - e||^2: gradient to the codebook only
    commit_loss: torch.Tensor  # () mean ||z - sg(e)||^2 (unweighted): gradient to the encoder only


def vq_forward(model: VQModel, pixels: torch.Tensor) -> VQForward:
    """The training forward pass through the model's own submodules and its quantiser."""
    z = model.encode_latent(pixels)
    B, D, h, w = z.shape
    if h != w:
        raise ValueError(f"VQ training: latent grid {h}x{w} is not square (images must be square)")
    with torch.no_grad():
        ids = model.quantize.nearest(z)
    zn = F.normalize(z, p=2, dim=1)
    e = model.quantize.lookup(ids, h)  # normalised codebook rows, differentiable w.r.t. the embedding
    codebook_loss = F.mse_loss(e, zn.detach())
    commit_loss = F.mse_loss(zn, e.detach())
    zq = zn + (e - zn).detach()
    recon = model.decoder(model.post_quant_conv(zq))
    return VQForward(recon, ids, zn, codebook_loss, commit_loss)


def check_images(images: torch.Tensor, model: VQModel) -> None:
    """Raise ValueError naming what is wrong with a training image tensor."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"VQ training images: expected a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"VQ training images: expected a float tensor in [-1, 1], got dtype {images.dtype} "
                         "(convert with januskit.processing.image.to_gen_pixels)")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"VQ training images: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    n, _, H, W = images.shape
    size = model.config.image_size
    if n == 0:
        raise ValueError("VQ training images: empty tensor (N = 0)")
    if (H, W) != (size, size):
        raise ValueError(f"VQ training images: expected {size}x{size} pixels (VQConfig.image_size), got {H}x{W}")
    lo, hi = (float(v) for v in torch.aminmax(images))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("VQ training images: contain NaN or inf")
    if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
        hint = " (looks like 0-255 bytes)" if hi > 2 else ""
        raise ValueError(f"VQ training images: values must be in [-1, 1], got range [{lo:.4g}, {hi:.4g}]{hint}; "
                         "convert with januskit.processing.image.to_gen_pixels")
    if lo >= 0:
        raise ValueError(f"VQ training images: values must be in [-1, 1] but none is negative (range [{lo:.4g}, "
                         f"{hi:.4g}]): looks like [0, 1] pixels; convert with x * 2 - 1 or to_gen_pixels")


@torch.no_grad()
def _restart_dead(model: VQModel, opt: torch.optim.Optimizer, out: VQForward, dead: torch.Tensor,
                  gen: torch.Generator) -> int:
    """Re-seed the `dead` codebook rows from latents of this batch (distance-weighted, without
    replacement); zero their AdamW moments. Returns how many rows were re-seeded."""
    D = out.z.shape[1]
    zf = out.z.detach().permute(0, 2, 3, 1).reshape(-1, D).float().cpu()
    e = model.quantize.codebook().detach().float().cpu()
    d2 = (zf - e[out.ids.reshape(-1).cpu()]).pow(2).sum(1)
    k = min(int(dead.numel()), zf.shape[0])
    weights = d2 + 1e-12 if float(d2.sum()) > 0 else torch.ones_like(d2)
    pick = torch.multinomial(weights, k, replacement=False, generator=gen)
    rows = dead[torch.randperm(dead.numel(), generator=gen)[:k]]  # which dead rows, if fewer latents than rows
    weight = model.quantize.embedding.weight
    weight[rows.to(weight.device)] = zf[pick].to(weight.device, weight.dtype)
    state = opt.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][rows.to(weight.device)] = 0
    return k


def hold_attention_at_identity(model: nn.Module) -> int:
    """Zero and freeze the output projection of every VQ attention block (x + proj_out(attn) = x) and freeze
    the rest of the block; returns how many blocks."""
    blocks = [m for m in model.modules() if isinstance(m, AttnBlock)]
    with torch.no_grad():
        for b in blocks:
            b.proj_out.weight.zero_()
            b.proj_out.bias.zero_()
            b.requires_grad_(False)
    return len(blocks)


def train_vq(model: VQModel, images: torch.Tensor, cfg: VQTrainConfig, progress: bool = True,
             on_log: Callable[[VQModel, dict], None] | None = None) -> list[dict]:
    """Train `model` in place on `images` ((N, 3, S, S) float in [-1, 1], S = VQConfig.image_size, on
    any device; batches are moved to the model's device). Returns one metric dict per `log_every`
    window (means over the window) plus the last step: step, lr, loss, recon, l1, l2, codebook
    (= codebook_weight * codebook mse), commit (= beta * commitment mse; both have the same value
    before weighting, only their gradients differ), usage (fraction of the codebook assigned at least
    once in the window), perplexity (exp entropy of the window's code histogram), restarted (rows
    re-seeded in the window), time_s. `on_log(model, metrics)` is called at each of those points
    (e.g. to add `reconstruction_stats` to the dict; it must not change the weights, and its time is
    not counted in time_s). The model ends in eval() mode."""
    cfg.validate()
    check_images(images, model)
    if not cfg.attention:
        hold_attention_at_identity(model)
    n = images.shape[0]
    if cfg.batch_size > n:
        raise ValueError(f"VQ training: batch_size {cfg.batch_size} is larger than the {n} images")
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    K = model.config.codebook_size

    gen = torch.Generator().manual_seed(cfg.seed)  # batch order
    rgen = torch.Generator().manual_seed(cfg.seed + 1)  # restarts
    groups = decay_groups(model, cfg.weight_decay, exempt=lambda name: name.startswith("quantize."))  # not the codebook
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    params = [p for g in opt.param_groups for p in g["params"]]
    last_used = torch.zeros(K, dtype=torch.long)  # step a code was last assigned (0 = at start)
    restart_stop = int(cfg.restart_until * cfg.steps)

    model.train()
    perm, pos = torch.randperm(n, generator=gen), 0
    sums: dict[str, float] = {}
    counts = torch.zeros(K, dtype=torch.long)
    restarted, n_win, t0 = 0, 0, time.perf_counter()
    metrics: list[dict] = []
    bar = tqdm(range(1, cfg.steps + 1), unit="step", desc="vq", dynamic_ncols=True, disable=not progress)
    for step in bar:
        if pos + cfg.batch_size > n:  # new epoch: a fresh permutation, the tail of the old one dropped
            perm, pos = torch.randperm(n, generator=gen), 0
        x = images[perm[pos:pos + cfg.batch_size]].to(device, dtype)
        pos += cfg.batch_size

        lr = cfg.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        out = vq_forward(model, x)
        l1 = F.l1_loss(out.recon, x)
        l2 = F.mse_loss(out.recon, x)
        # L1 + L2: L2 drives the large errors (edges, wrong colours) down fast and stably early on,
        # while its gradient vanishes as errors shrink; L1 keeps a constant pull on small residuals,
        # which is what brings flat colours back to the exact byte values instead of a near miss.
        recon = cfg.l1_weight * l1 + cfg.l2_weight * l2
        codebook = cfg.codebook_weight * out.codebook_loss
        commit = cfg.beta * out.commit_loss
        loss = recon + codebook + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()

        hist = torch.bincount(out.ids.reshape(-1).cpu(), minlength=K)
        counts += hist
        last_used[hist > 0] = step
        if cfg.restart_after is not None and step <= restart_stop:
            dead = torch.nonzero(last_used <= step - cfg.restart_after).flatten()
            if dead.numel():
                k = _restart_dead(model, opt, out, dead, rgen)
                last_used[dead] = step  # restarted rows (and any not re-seeded this step) get a fresh window
                restarted += k

        for key, v in (("loss", loss), ("recon", recon), ("l1", l1), ("l2", l2), ("codebook", codebook),
                       ("commit", commit)):
            sums[key] = sums.get(key, 0.0) + float(v.detach())
        n_win += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            p = counts.double() / counts.sum()
            ent = -(p[p > 0] * p[p > 0].log()).sum()
            m = {"step": step, "lr": lr, **{k: v / n_win for k, v in sums.items()},
                 "usage": float((counts > 0).double().mean()), "perplexity": float(ent.exp()),
                 "restarted": restarted, "time_s": time.perf_counter() - t0}
            if on_log is not None:
                t_cb = time.perf_counter()
                on_log(model, m)
                model.train()
                t0 += time.perf_counter() - t_cb
            metrics.append(m)
            log.info("vq step %d: loss %.4f recon %.4f usage %.3f perplexity %.1f restarted %d", step,
                     m["loss"], m["recon"], m["usage"], m["perplexity"], restarted)
            bar.set_postfix(loss=f"{m['loss']:.4f}", usage=f"{m['usage']:.2f}", ppl=f"{m['perplexity']:.0f}")
            sums, counts, restarted, n_win = {}, torch.zeros(K, dtype=torch.long), 0, 0
    bar.close()
    model.eval()
    return metrics


@torch.no_grad()
def reconstruct(model: VQModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """decode(encode(images)) through the inference path, batched; (N, 3, S, S) float32 on the CPU."""
    p0 = next(model.parameters())
    outs = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(p0.device, p0.dtype)
        outs.append(model.decode(model.encode(x)).float().cpu())
    return torch.cat(outs)


DECODER_SIDE = ("post_quant_conv.", "decoder.")  # what train_vq_decoder trains; the rest keeps every id


def train_vq_decoder(model: VQModel, images: torch.Tensor, cfg: VQTrainConfig, progress: bool = True) -> list[dict]:
    """Train only the decoder side of a trained VQ (post_quant_conv and decoder) on `images` ((N, 3, S, S) in
    [-1, 1]): x' = decoder(post_quant_conv(lookup(encode(x)))), loss l1_weight * L1 + l2_weight * L2.

    The encoder and the codebook are frozen, so every image keeps exactly the ids it had: an LLM trained to
    write those ids stays valid, and only what they are drawn as changes. That lets a build teach the decoder
    images its VQ never saw (the miniature world's empty canvas) after the LLM stages, without retraining
    them. Uses cfg's steps, batch_size, lr schedule, betas, grad_clip, l1/l2 weights, seed and log_every (its
    codebook, commitment and restart settings do not apply). Returns one metric dict per window (step, lr,
    loss, l1, l2, time_s); the model ends in eval() mode with its requires_grad flags as they were."""
    cfg.validate()
    check_images(images, model)
    n = images.shape[0]
    if cfg.batch_size > n:
        raise ValueError(f"VQ decoder training: batch_size {cfg.batch_size} is larger than the {n} images")
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    model.eval()
    with torch.no_grad():
        ids = torch.cat([model.encode(images[i:i + 256].to(device, dtype)) for i in range(0, n, 256)])
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(DECODER_SIDE))
    try:
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, eps=1e-8, weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.seed)
        perm, pos = torch.randperm(n, generator=gen), 0
        model.train()
        metrics: list[dict] = []
        sums: dict[str, float] = {}
        n_win, t0 = 0, time.perf_counter()
        bar = tqdm(range(1, cfg.steps + 1), unit="step", desc="vq decoder", dynamic_ncols=True, disable=not progress)
        for step in bar:
            if pos + cfg.batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            x = images[idx].to(device, dtype)
            lr = cfg.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            y = model.decode(ids[idx])
            l1, l2 = F.l1_loss(y, x), F.mse_loss(y, x)
            loss = cfg.l1_weight * l1 + cfg.l2_weight * l2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            for key, v in (("loss", loss), ("l1", l1), ("l2", l2)):
                sums[key] = sums.get(key, 0.0) + float(v.detach())
            n_win += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics.append({"step": step, "lr": lr, **{k: v / n_win for k, v in sums.items()},
                                "time_s": time.perf_counter() - t0})
                bar.set_postfix(loss=f"{metrics[-1]['loss']:.4f}")
                sums, n_win = {}, 0
        bar.close()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.eval()
    return metrics


@torch.no_grad()
def reconstruction_stats(model: VQModel, images: torch.Tensor, batch_size: int = 64, *,
                         blank_ok: bool = False) -> dict[str, float]:
    """Reconstruction quality of `images` ((N, 3, S, S) in [-1, 1]) through encode -> decode:
    psnr (dB, on [0, 1] with the output clamped, from the mean squared error over the whole set),
    mae_255 (mean abs error per channel value, 0-255 units), max_255 (worst channel value error),
    usage (fraction of the codebook used on these images). The model's train/eval mode is kept.
    `blank_ok`: images may be all white (the range check would take them for [0, 1] pixels)."""
    if blank_ok:
        check_images(torch.cat([images, -torch.ones_like(images[:1])]), model)
    else:
        check_images(images, model)
    was_training = model.training
    model.eval()
    try:
        p0 = next(model.parameters())
        se = ae = mx = 0.0
        used = torch.zeros(model.config.codebook_size, dtype=torch.bool)
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(p0.device, p0.dtype)
            ids = model.encode(x)
            used[ids.reshape(-1).cpu()] = True
            y = model.decode(ids).float().clamp(-1, 1)
            d = (y - x.float()) * 0.5  # [0, 1] units
            se += float(d.pow(2).sum())
            ae += float(d.abs().sum())
            mx = max(mx, float(d.abs().max()))
        count = images.numel()
        mse = se / count
        return {"psnr": 10 * math.log10(1.0 / max(mse, 1e-20)), "mae_255": ae / count * 255,
                "max_255": mx * 255, "usage": float(used.double().mean())}
    finally:
        model.train(was_training)


def reconstruction_psnr(model: VQModel, images: torch.Tensor, batch_size: int = 64) -> float:
    """PSNR in dB of encode -> decode on `images` ((N, 3, S, S) in [-1, 1]), batched, no grad."""
    return reconstruction_stats(model, images, batch_size)["psnr"]


__all__ = ["VQTrainConfig", "VQForward", "vq_forward", "train_vq", "check_images", "reconstruct",
           "reconstruction_stats", "reconstruction_psnr"]
