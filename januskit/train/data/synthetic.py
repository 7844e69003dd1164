"""Random packed TrainBatches for smoke runs and distributed tests: no files and no tokenizer.

Samples of the three kinds (understanding: image slots then question and answer, loss on the answer;
text: loss on every next token; generation: prompt then VQ tokens, loss on the VQ tokens) are drawn by
the stage ratio and packed greedily into rows. Micro-batch i is a pure function of (seed, i), and rank
r of w takes micro-batches r, r+w, r+2w, ..., so the global batch of a step does not depend on how
many processes share it. Not a data pipeline: januskit.train.data.records is.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .batch import IGNORE, TrainBatch
from ..config import DataContext


class SyntheticData:
    def __init__(self, *, micro_batch_size: int, seq_len: int, ratio: tuple[float, ...], seed: int,
                 vocab_size: int, codebook_size: int, n_und_tokens: int, n_gen_tokens: int, image_size: int,
                 rank: int = 0, world: int = 1, text_len: tuple[int, int] = (4, 24)) -> None:
        if any(ratio[3:]):
            raise ValueError(f"ratio {ratio} gives edit samples weight, but synthetic data has none")
        ratio = tuple(ratio[:3])
        if sum(ratio) <= 0:
            raise ValueError(f"ratio {ratio} has no positive weight")
        self.rows, self.seq_len, self.seed = micro_batch_size, seq_len, seed
        self.p = np.asarray(ratio, dtype=np.float64) / float(sum(ratio))
        self.vocab, self.codebook = vocab_size, codebook_size
        self.n_und, self.n_gen, self.image_size = n_und_tokens, n_gen_tokens, image_size
        self.text_len, self.world = text_len, world
        self.index = rank  # global index of this rank's next micro-batch
        longest = 3 + n_und_tokens + 2 * text_len[1] + 1
        if seq_len < max(longest, 2 + text_len[1] + n_gen_tokens):
            raise ValueError(f"seq_len {seq_len} cannot hold one sample (needs {longest})")

    def __iter__(self) -> Iterator[TrainBatch]:
        while True:
            b = self.make(self.index)
            self.index += self.world  # advanced before yielding: state_dict() is the position after b
            yield b

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])

    @staticmethod
    def reshard(states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """This rank's position among `world` ranks, from the positions of a run with len(states) ranks: the
        micro-batches before the old ranks' lowest next index are all taken, so rank r goes on at that index + r
        (the same micro-batches a run with `world` ranks throughout would take, when the global batch is the
        same number of micro-batches)."""
        return {"index": min(int(s["index"]) for s in states) + rank}

    def _sample(self, rng: np.random.Generator) -> tuple[int, list[int], list[bool], list[int], list[int], list[int]]:
        """(kind, input ids, gen-slot flags, gen ids, text labels, image labels) of one sample; und
        slots are the runs of id -1 (placeholders)."""
        kind = int(rng.choice(3, p=self.p))
        lo, hi = self.text_len
        words = lambda: [int(x) for x in rng.integers(3, self.vocab, rng.integers(lo, hi + 1))]  # noqa: E731
        if kind == 0:  # <bos> <boi> [image] <eoi> question answer <eos>: loss on answer + eos
            q, a = words(), words() + [2]
            ids = [1, 1] + [-1] * self.n_und + [2] + q + a
            tl = [IGNORE] * len(ids)
            start = len(ids) - len(a)
            tl[start - 1:len(ids) - 1] = a
            return kind, ids, [False] * len(ids), [0] * len(ids), tl, [IGNORE] * len(ids)
        if kind == 1:  # plain text: every next token
            ids = [1] + words() + words()
            return kind, ids, [False] * len(ids), [0] * len(ids), ids[1:] + [IGNORE], [IGNORE] * len(ids)
        prompt = [1] + words() + [2]  # ... <boi>, then the image tokens; loss on every image token
        vq = [int(x) for x in rng.integers(0, self.codebook, self.n_gen)]
        ids = prompt + [0] * self.n_gen
        il = [IGNORE] * (len(prompt) - 1) + vq + [IGNORE]
        return (kind, ids, [False] * len(prompt) + [True] * self.n_gen, [0] * len(prompt) + vq,
                [IGNORE] * len(ids), il)

    def make(self, i: int) -> TrainBatch:
        rng = np.random.default_rng([self.seed, i])
        B, T = self.rows, self.seq_len
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        doc = torch.full((B, T), -1, dtype=torch.long)
        kinds = torch.full((B, T), -1, dtype=torch.long)
        gen_mask = torch.zeros(B, T, dtype=torch.bool)
        gen_ids = torch.zeros(B, T, dtype=torch.long)
        tl = torch.full((B, T), IGNORE, dtype=torch.long)
        il = torch.full((B, T), IGNORE, dtype=torch.long)
        n_images = 0
        for r in range(B):
            t, d = 0, 0
            while True:
                kind, s_ids, s_gen, s_gid, s_tl, s_il = self._sample(rng)
                n = len(s_ids)
                if t + n > T:
                    break  # the row is full: the rest is padding
                sl = slice(t, t + n)
                ids[r, sl] = torch.tensor(s_ids)
                pos[r, sl] = torch.arange(n)
                doc[r, sl] = d
                kinds[r, sl] = kind
                gen_mask[r, sl] = torch.tensor(s_gen)
                gen_ids[r, sl] = torch.tensor(s_gid)
                tl[r, sl] = torch.tensor(s_tl)
                il[r, sl] = torch.tensor(s_il)
                n_images += kind == 0
                t, d = t + n, d + 1
        und_mask = ids == -1
        ids = ids.clamp(min=0)
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        pixels = torch.randn(n_images, 3, self.image_size, self.image_size, generator=g) if n_images else None
        return TrainBatch(input_ids=ids, positions=pos, doc_ids=doc, und_mask=und_mask, pixel_values=pixels,
                          gen_mask=gen_mask, gen_ids=gen_ids, text_labels=tl, image_labels=il, kinds=kinds)


def build(ctx: DataContext, **options: Any) -> SyntheticData:
    """Data builder for `[data] builder = "januskit.train.data.synthetic:build"`; options: text_len = [lo, hi]."""
    c = ctx.model_config
    if "text_len" in options:
        options["text_len"] = tuple(options["text_len"])
    return SyntheticData(micro_batch_size=ctx.micro_batch_size, seq_len=ctx.seq_len, ratio=ctx.ratio, seed=ctx.seed,
                         vocab_size=c.llm.vocab_size, codebook_size=c.vq.codebook_size, n_und_tokens=c.vision.n_tokens,
                         n_gen_tokens=c.vq.n_tokens, image_size=c.vision.image_size, rank=ctx.rank, world=ctx.world,
                         **options)
