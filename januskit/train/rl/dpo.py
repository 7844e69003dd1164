"""DPO (Rafailov et al. 2023) for Janus image generation: the offline alternative to GRPO, from preference
pairs instead of a reward.

Data: a JSONL manifest in the training data format (docs/data-format.md), one pair a line, paths relative
to the manifest's folder (or `pairs_root`) under the same rules as every other kind:

    {"kind": "preference", "prompt": "a red circle left of a blue square", "chosen": "a.png", "rejected": "b.png"}

(or "chosen_vq_ids" / "rejected_vq_ids": the VQ ids themselves). The images are tokenised by the model's
frozen VQ. With log p(x | prompt) the sum of the image tokens' conditional log-probabilities (no CFG: the
policy is the conditional model; guidance stays an inference-time choice), the loss of a pair is

    -log sigmoid(beta * [(log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))])

with the frozen initial model as the reference. Pair j of step s is pair s * P + j of a seeded order that is
drawn anew every pass, so a resumed run reads exactly what an uninterrupted one would.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from ...models.janus import JanusModel
from ...processing.image import to_gen_pixels
from .. import parallel
from ..checkpoints import save_checkpoint
from ..config import RunConfig
from ..data.records import DataError, jsonl_rows, read_image_file, resolve_image_path
from .grpo import image_token_logprobs

_STREAM = 130363


@dataclass(frozen=True)
class Pair:
    prompt: str
    where: str  # file:line
    chosen: str | list[int]  # an image path (relative to the root) or VQ ids
    rejected: str | list[int]


def read_pairs(path: str | Path, root: str | Path | None = None, n_tokens: int | None = None,
               codebook: int | None = None) -> tuple[list[Pair], Path]:
    """Validate every line now (fields, types, id ranges, paths inside the root); images load when used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"[rl] pairs: {path}: no such file")
    root = Path(root) if root is not None else path.parent
    pairs = []
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict) or row.get("kind") != "preference":
            raise DataError(where, "expected an object with \"kind\": \"preference\"", "kind")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(where, "'prompt' must be a non-empty string", "field")
        sides = []
        for side in ("chosen", "rejected"):
            ref, ids = row.get(side), row.get(f"{side}_vq_ids")
            if (ref is None) == (ids is None):
                raise DataError(where, f"give exactly one of '{side}' (an image path) or '{side}_vq_ids'", "field")
            if ids is not None:
                if not isinstance(ids, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
                    raise DataError(where, f"'{side}_vq_ids' must be a list of integers", "vq_ids")
                if n_tokens is not None and len(ids) != n_tokens:
                    raise DataError(where, f"'{side}_vq_ids' has {len(ids)} ids; this model's images have {n_tokens}",
                                    "vq_ids")
                if codebook is not None and ids and not 0 <= min(ids) <= max(ids) < codebook:
                    raise DataError(where, f"'{side}_vq_ids' must lie in [0, {codebook})", "vq_ids")
                sides.append(ids)
            else:
                if not isinstance(ref, str):
                    raise DataError(where, f"'{side}' must be a string (a path relative to the dataset root)", "field")
                resolve_image_path(root, ref, where)  # refuses absolute paths, '..' and symlinks out now
                sides.append(ref)
        pairs.append(Pair(prompt, where, sides[0], sides[1]))
    if not pairs:
        raise ValueError(f"[rl] pairs: {path} holds no pairs")
    return pairs, root


def dpo_loss(lp_c: torch.Tensor, lp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit reward margins beta * (chosen advantage - rejected advantage)."""
    margin = beta * ((lp_c - ref_c) - (lp_r - ref_r))
    return -F.logsigmoid(margin), margin.detach()


class DPOObjective(nn.Module):
    repa_head = None

    def __init__(self, model: JanusModel, *, pad_id: int, beta: float) -> None:
        super().__init__()
        self.model, self.pad_id, self.beta = model, pad_id, beta

    def logprobs(self, prompt_ids: Sequence[Sequence[int]], tokens: torch.Tensor, model: JanusModel | None = None
                 ) -> torch.Tensor:
        """(n,) summed conditional log-probabilities of each image's tokens."""
        lp, _ = image_token_logprobs(model if model is not None else self.model, prompt_ids, tokens,
                                     pad_id=self.pad_id, cfg_weight=1.0, temperature=1.0, mode="cond")
        return lp.sum(-1)

    def forward(self, prompt_ids: Sequence[Sequence[int]], chosen: torch.Tensor, rejected: torch.Tensor,
                ref_c: torch.Tensor, ref_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(prompt_ids)
        lp = self.logprobs(list(prompt_ids) * 2, torch.cat([chosen, rejected]))
        return dpo_loss(lp[:n], lp[n:], ref_c, ref_r, self.beta)


def _tokens(model: JanusModel, pairs: list[Pair], root: Path, side: str) -> torch.Tensor:
    vq = model.gen_vision_model
    size = model.config.vq.image_size
    out = []
    for p in pairs:
        v = getattr(p, side)
        if isinstance(v, list):
            out.append(torch.tensor(v, dtype=torch.long))
        else:
            img: Image.Image = read_image_file(root, v, p.where)
            with torch.no_grad():
                x = to_gen_pixels(img, size)[None].to(next(vq.parameters()).dtype)
                out.append(vq.encode(x)[0])
    return torch.stack(out)


def run_dpo(cfg: RunConfig, info, resume: bool) -> Path:
    from .loop import StepPosition, autocast_context, finish, open_metrics, optimizer_step, prepare, start

    rl, stage = cfg.rl, cfg.resolved_stage()
    if rl.pairs is None:
        raise ValueError("[rl] algorithm \"dpo\" needs pairs = \"path/to/pairs.jsonl\" (kind \"preference\" lines)")
    out, ckpt, model, extras, proc = start(cfg, info, resume, "janus")
    pairs, root = read_pairs(rl.pairs, rl.pairs_root, model.config.vq.n_tokens, model.config.vq.codebook_size)
    objective = DPOObjective(model, pad_id=proc.pad_id, beta=rl.dpo_beta)
    position = StepPosition(cfg.to_dict()["rl"] | {"seed": cfg.train.seed, "pairs_count": len(pairs)})
    t = prepare(cfg, objective, ckpt, position)
    step, amp = t.step, autocast_context(cfg, info.device)
    metrics_path = open_metrics(cfg, out, ckpt is not None, step)
    bar = tqdm(total=stage.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (parallel.is_main() and cfg.train.progress))
    t0, P, n = time.perf_counter(), stage.batch_size, len(pairs)
    while step < stage.steps:
        idx = [step * P + j for j in range(info.rank, P, info.world)]
        order = {e: np.random.default_rng([cfg.train.seed, _STREAM, e]).permutation(n) for e in {i // n for i in idx}}
        batch = [pairs[int(order[i // n][i % n])] for i in idx]
        ids = [proc.generation_prompt(p.prompt) for p in batch]
        chosen, rejected = _tokens(model, batch, root, "chosen"), _tokens(model, batch, root, "rejected")
        micro = max(1, cfg.train.micro_batch_size)
        chunks = [slice(a, min(a + micro, len(batch))) for a in range(0, len(batch), micro)]
        with torch.no_grad(), amp(), t.reference_mode(model):
            ref = [(objective.logprobs(ids[c], chosen[c], t.reference).float(),
                    objective.logprobs(ids[c], rejected[c], t.reference).float()) for c in chunks]
        model.train()
        lr = t.optimizer.param_groups[0]["lr"]
        sums = torch.zeros(3, dtype=torch.float64)  # loss, margin, accuracy
        for j, c in enumerate(chunks):
            with parallel.no_sync(t.wrapped, enabled=j < len(chunks) - 1), amp():
                loss, margin = t.wrapped(ids[c], chosen[c], rejected[c], *ref[j])
                (loss.float().sum() * (info.world / P)).backward()
            sums += torch.stack([loss.detach().double().sum(), margin.double().sum(), (margin > 0).double().sum()])
        grad_norm = optimizer_step(cfg, t)
        step += 1
        if step % cfg.train.log_every == 0 or step == stage.steps:
            s = parallel.all_reduce_sum(sums)
            m: dict[str, Any] = {"step": step, "loss": float(s[0] / P), "margin": float(s[1] / P),
                                 "accuracy": float(s[2] / P), "lr": lr,
                                 "grad_norm": float(parallel.local(grad_norm)), "pairs": P,
                                 "time_s": round(time.perf_counter() - t0, 3)}
            if parallel.is_main():
                with metrics_path.open("a") as f:
                    f.write(json.dumps(m) + "\n")
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.2f}")
        if step % cfg.train.save_every == 0 or step == stage.steps:
            save_checkpoint(out / "checkpoints", step, objective, t.optimizer, t.scheduler, position, cfg)
        bar.update(1)
    bar.close()
    return finish(cfg, model, extras, out, metrics_path,
                  [("loss.png", ["loss"], f"dpo ({cfg.model.source})"), ("margin.png", ["margin", "accuracy"],
                                                                          "dpo implicit reward margin, accuracy")])
