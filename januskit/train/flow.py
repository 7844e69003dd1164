"""JanusFlow's generation objectives: rectified flow in the VAE latent space, plus REPA.

For a generation (or edit) sample with clean latent x, noise z0 ~ N(0, I) and t ~ logit-normal (SD3's choice,
which the JanusFlow paper follows; it does not give the mean and std, we default to 0 and 1):
    z_t = t * x + (1 - t) * z0            (t = 0 noise, t = 1 data)
    L_RF   = || v_theta(z_t, t | prompt) - (x - z0) ||^2, averaged over the latent
    L_REPA = 1 - cos( h_phi(LLM residual stream after layer k at the grid positions),
                      stop_grad(understanding encoder features of the clean image) ), averaged over positions
(the paper writes -E[cos]; 1 - cos has the same gradient and reads as a loss). h_phi is a 3-layer MLP
to the encoder width, trained with the model but owned by the loss and never exported; k = 6 in the paper.
Each grid position counts as one loss token (so a generation sample weighs like n_gen tokens of text
CE), and L_REPA is added with `repa_weight` (the paper's plain sum: 1).

The noise and t of a sample come from a generator seeded by its `flow_seed`, itself a hash of the run
seed, epoch and sample key: the same sample gets the same draw on every rank, worker and resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JanusConfig, JanusFlowConfig


@dataclass(frozen=True, kw_only=True)
class FlowSettings:
    """[flow] of a run config (JanusFlow models only)."""

    t_mean: float = 0.0  # logit-normal t: sigmoid(N(t_mean, t_std))
    t_std: float = 1.0
    repa_weight: float = 1.0  # 0 turns REPA off (no h_phi is built)
    repa_layer: int = 6  # align the residual stream after this LLM layer (1-based)
    repa_hidden: int | None = None  # h_phi width; None = the LLM width

    def __post_init__(self) -> None:
        if not self.t_std > 0:
            raise ValueError(f"t_std must be > 0, got {self.t_std}")
        if self.repa_weight < 0:
            raise ValueError(f"repa_weight must be >= 0, got {self.repa_weight}")
        if self.repa_layer < 1:
            raise ValueError(f"repa_layer is 1-based (the paper's 6th layer is 6), got {self.repa_layer}")


class RepaHead(nn.Module):
    """h_phi: Linear, SiLU, Linear, SiLU, Linear from the LLM width to the understanding-encoder width."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                    nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_repa_head(c: JanusConfig | JanusFlowConfig, s: FlowSettings, seed: int = 0) -> RepaHead | None:
    """A fresh h_phi for a JanusFlow config when REPA is on (else None), initialised from `seed` alone
    so every rank builds the same one. The loss (losses.LossForward) owns it, not the model: it trains
    and is checkpointed with the run, and is never exported."""
    if c.arch != "janusflow":
        raise ValueError(f"[flow] settings are for JanusFlow models; this one is {c.arch}")
    if not s.repa_weight > 0:
        return None
    if s.repa_layer > c.llm.n_layers:
        raise ValueError(f"[flow] repa_layer = {s.repa_layer}, but the LLM has {c.llm.n_layers} layers")
    if c.n_gen_tokens != c.vision.n_tokens:
        raise ValueError(f"REPA aligns grid positions one to one: the generation grid has {c.n_gen_tokens} "
                         f"positions and the understanding encoder {c.vision.n_tokens}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RepaHead(c.llm.dim, s.repa_hidden or c.llm.dim, c.vision.width)


def noise_and_t(seeds: torch.Tensor, shape: tuple[int, ...], s: FlowSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) seeds -> noise (M, *shape) and t (M,), each sample from its own generator."""
    noise, t = [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(int(seed))
        t.append(torch.sigmoid(s.t_mean + s.t_std * torch.randn((), generator=g)))
        noise.append(torch.randn(shape, generator=g))
    return torch.stack(noise), torch.stack(t)


def flow_inputs(model: nn.Module, latents: torch.Tensor, seeds: torch.Tensor,
                s: FlowSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean latents -> (LLM inputs [t_emb, grid] (M, 1 + n, dim), skip, t_emb, target velocity x - z0)."""
    noise, t = noise_and_t(seeds, tuple(latents.shape[1:]), s)
    noise, t = noise.to(latents.device), t.to(latents.device)
    x = latents.float()
    z_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise
    inputs, skip, t_emb = model.gen_inputs(z_t, t)
    return inputs, skip, t_emb, x - noise


def flow_loss_sums(model: nn.Module, hidden: torch.Tensor, captured: torch.Tensor | None, grid_mask: torch.Tensor,
                   skip: torch.Tensor, t_emb: torch.Tensor, target: torch.Tensor, repa_pixels: torch.Tensor | None,
                   head: nn.Module | None, repa_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L_RF and L_REPA (h_phi = `head`, weighted by `repa_weight`; zero without a head) of each of the
    batch's M flow samples, (M,) each, summed over its grid positions (each counts as one loss token)."""
    c = model.config
    M, n = target.shape[0], c.n_gen_tokens
    v = model.velocity(hidden[grid_mask].view(M, n, -1), skip, t_emb).float()
    rf = (v - target).pow(2).mean(dim=(1, 2, 3)) * n
    repa = hidden.new_zeros(M, dtype=torch.float32)
    if head is not None:
        if repa_pixels is None or captured is None:
            raise ValueError("REPA is on but the batch carries no repa_pixels (build the data with the REPA model)")
        with torch.no_grad():  # stop-gradient target: the encoder may train (stage 3), but not from REPA
            target_feats = model.vision_und_enc_model(repa_pixels.to(hidden.dtype))
        pred = head(captured[grid_mask].view(M, n, -1))
        cos = F.cosine_similarity(pred.float(), target_feats.float(), dim=-1)  # (M, n)
        repa = repa_weight * (1 - cos).sum(dim=1)
    return rf, repa
