"""Flow-GRPO (Liu et al., arXiv 2505.05470) for JanusFlow: GRPO on the steps of a stochastic sampler.

JanusFlow integrates dz/ds = u(z, s) from noise (s = 0) to an image latent (s = 1) on the path
z_s = s x + (1 - s) eps, with u = x - eps the (CFG-guided) velocity. An ODE has no per-step randomness for
a policy gradient, so while collecting, each Euler step is replaced by an Euler-Maruyama step of the SDE
with the same marginals p_s:

    dz = [u + (g_s^2 / 2) grad log p_s(z)] ds + g_s dW,      grad log p_s(z) = -(z - s u) / (1 - s)

(on this path E[eps | z] = z - s u, and the score of the Gaussian path is -E[eps | z] / (1 - s)). With
g_s^2 = a^2 (1 - s) / s (Flow-GRPO's sigma_t = a sqrt(t / (1 - t)) in our time, t = 1 - s; s is floored at
the first step's 1/K so that the first step's noise stays finite), a step of size ds = 1/K is Gaussian:

    z_{k+1} ~ N(mean_k, std_k^2),  mean_k = z_k + [u - a^2 / (2 s) (z_k - s u)] ds,  std_k = a sqrt((1 - s) ds / s)

Its log-density (averaged over the latent's elements, as Flow-GRPO does, so that a ratio over thousands
of dimensions stays usable) is the per-step log-probability, one "action" per step: the clipped ratio,
group advantages and KL of GRPO apply unchanged. With equal std the KL to the reference is exact:
||mean - mean_ref||^2 / (2 std^2), averaged the same way. Collection uses fewer steps (`sde_steps`,
Flow-GRPO: 10 while training against 40 at inference); the trained model is then sampled with its usual
ODE. The log-probability is that of the CFG-guided step (the sampler's distribution).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ...models.janusflow import JanusFlowModel
from ...sampling.flow import check_flow_args, flow_rows, generate_latents, row_velocities
from .grpo import GRPOLoss


def sde_std(k: int, steps: int, noise_level: float) -> float:
    """The noise std of step k (of `steps`): g_s sqrt(ds) with s floored at ds."""
    s, ds = k / steps, 1.0 / steps
    return noise_level * math.sqrt((1 - s) * ds / max(s, ds))


def sde_step(z: torch.Tensor, u: torch.Tensor, k: int, steps: int, noise_level: float) -> tuple[torch.Tensor, float]:
    """Mean and std of step k (of `steps`) of the marginal-preserving SDE from z with velocity u."""
    s, ds = k / steps, 1.0 / steps
    mean = z + (u - noise_level**2 / (2 * max(s, ds)) * (z - s * u)) * ds
    return mean, sde_std(k, steps, noise_level)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over all but the first dimension -> (n,)."""
    lp = -((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(-1)


@torch.inference_mode()
def rollout_trajectory(model: JanusFlowModel, prompt_ids: Sequence[Sequence[int]], z0: torch.Tensor, *, steps: int,
                       cfg_weight: float, noise_level: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(n, steps + 1, C, H, W) float32 latents z_0 .. z_K of the SDE sampler, image i's noise from
    generators[i] (the same KV-cached integration as inference, with the SDE's step)."""
    traj = [z0.float().clone()]

    def update(z: torch.Tensor, u: torch.Tensor, k: int, K: int) -> torch.Tensor:
        mean, std = sde_step(z, u, k, K, noise_level)
        eps = torch.stack([torch.randn(z.shape[1:], generator=g) for g in generators])
        traj.append(mean + std * eps)
        return traj[-1]
    generate_latents(model, prompt_ids, z0, steps=steps, cfg_weight=cfg_weight, update=update)
    return torch.stack(traj, 1).clone()


def trajectory_logprobs(model: JanusFlowModel, prompt_ids: Sequence[Sequence[int]], traj: torch.Tensor, *,
                        cfg_weight: float, noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step log-probabilities (n, K) of each trajectory's transitions under `model`, and the step means
    (n, K, C, H, W) (for the KL). Each step runs the whole sequence (prompt and grid) with gradients."""
    n, K = traj.shape[0], traj.shape[1] - 1
    w = check_flow_args(K, cfg_weight, n)
    ids, valid, positions = flow_rows(prompt_ids)
    prompt_h = model.llm.embed_tokens(ids)
    lps, means = [], []
    for k in range(K):
        z = traj[:, k]
        t = torch.full((2 * n,), k / K)
        v = row_velocities(model, prompt_h, positions, valid, torch.cat([z, z]), t)
        mean, std = sde_step(z, w * v[:n] - (w - 1) * v[n:], k, K, noise_level)
        lps.append(gaussian_logprob(traj[:, k + 1], mean, std))
        means.append(mean)
    return torch.stack(lps, 1), torch.stack(means, 1)


class FlowGRPOObjective(nn.Module):
    """The JanusFlow policy and the GRPO loss over its SDE steps (one action per step); see GRPOObjective."""

    repa_head = None

    def __init__(self, model: JanusFlowModel, loss: GRPOLoss, *, cfg_weight: float, noise_level: float,
                 steps: int) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.cfg_weight, self.noise_level, self.steps = cfg_weight, noise_level, steps

    def logprobs(self, prompt_ids: Sequence[Sequence[int]], traj: torch.Tensor, model: JanusFlowModel | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return trajectory_logprobs(model if model is not None else self.model, prompt_ids, traj,
                                   cfg_weight=self.cfg_weight, noise_level=self.noise_level)

    def forward(self, prompt_ids: Sequence[Sequence[int]], traj: torch.Tensor, adv: torch.Tensor,
                old_lp: torch.Tensor | None, ref: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        lp, mean = self.logprobs(prompt_ids, traj)
        K = traj.shape[1] - 1
        std2 = torch.tensor([sde_std(k, K, self.noise_level) ** 2 for k in range(K)])
        kl = ((mean - ref[1]) ** 2).flatten(2).mean(-1) / (2 * std2)  # (n, K), exact for equal-std Gaussians
        per_image, stats = self.loss(lp, lp.detach() if old_lp is None else old_lp, ref[0], adv, kl=kl)
        stats["entropy"] = torch.zeros_like(per_image.detach())  # fixed by the noise schedule, not learnt
        return per_image, lp.detach(), stats
