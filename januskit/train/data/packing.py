"""A step's encoded samples -> one TrainBatch of packed rows (sequence packing, Janus §2.2).

First-fit decreasing: samples, longest first, go into the first row with room; a row is `context_len`
slots. Positions restart at 0 for every sample and doc_ids number the samples within a row, so the
packed attention mask (models.llama.packed_mask) makes each sample see only itself: a packed row
computes exactly what its samples compute alone. Labels are shifted within each sample, so no
sample ever predicts the next sample's first token.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .batch import IGNORE, TrainBatch
from .records import KIND_CODE, DataError
from .encode import EncodedSample


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of total length <= capacity (first-fit decreasing, stable)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([]), room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def pack(samples: Sequence[EncodedSample], context_len: int, *, pad_id: int = 0, too_long: str = "error",
         n_und_tokens: int | None = None) -> TrainBatch:
    """Packed TrainBatch of shape (rows, context_len). A sample longer than context_len raises DataError
    naming it, or with too_long="truncate" is cut (needs n_und_tokens, the slots per understanding image)."""
    if not samples:
        raise ValueError("pack: no samples")
    fitted = []
    for s in samples:
        if len(s) > context_len:
            if too_long != "truncate":
                raise DataError(s.key, f"{s.kind} sample of {len(s)} tokens does not fit the context "
                                       f"({context_len}); truncate it or drop it upstream", "length")
            if n_und_tokens is None:
                raise ValueError("pack(too_long='truncate') needs n_und_tokens")
            s = s.truncated(context_len, n_und_tokens)
        fitted.append(s)
    rows = first_fit([len(s) for s in fitted], context_len)
    return _batch([[fitted[i] for i in row] for row in rows], context_len, pad_id)


def unpacked(samples: Sequence[EncodedSample], *, pad_id: int = 0) -> TrainBatch:
    """One row per sample (right-padded to the longest), in order: the reference packing must equal."""
    return _batch([[s] for s in samples], max(len(s) for s in samples), pad_id)


def _batch(rows: list[list[EncodedSample]], T: int, pad_id: int) -> TrainBatch:
    B = len(rows)
    long = dict(dtype=torch.long)
    input_ids = torch.full((B, T), pad_id, **long)
    positions = torch.zeros((B, T), **long)
    doc_ids = torch.full((B, T), -1, **long)
    kinds = torch.full((B, T), -1, **long)
    und_mask = torch.zeros((B, T), dtype=torch.bool)
    gen_mask = torch.zeros((B, T), dtype=torch.bool)
    gen_ids = torch.zeros((B, T), **long)
    text_labels = torch.full((B, T), IGNORE, **long)
    image_labels = torch.full((B, T), IGNORE, **long)
    weighted = any(s.text_weight is not None for row in rows for s in row)
    text_weights = torch.zeros((B, T)) if weighted else None
    pixels = []
    flow = any(s.flow_mask is not None for row in rows for s in row)
    flow_mask = torch.zeros((B, T), dtype=torch.bool) if flow else None
    latents, seeds, repa = [], [], []
    for b, row in enumerate(rows):
        t = 0
        for d, s in enumerate(row):
            L = len(s)
            sl = slice(t, t + L)
            input_ids[b, sl] = s.ids
            positions[b, sl] = torch.arange(L)
            doc_ids[b, sl] = d if s.hidden is None else torch.where(s.hidden, -1, d)  # hidden: seen by no slot
            kinds[b, sl] = KIND_CODE[s.kind]
            und_mask[b, sl] = s.und_mask
            gen_mask[b, sl] = s.gen_mask
            text_labels[b, sl], image_labels[b, sl] = s.labels()  # raises if VQ ids are still missing
            if weighted:
                text_weights[b, sl] = s.text_weights()
            if s.gen_ids is not None:
                gen_ids[b, sl][s.gen_mask] = s.gen_ids
            if s.pixel_values is not None:
                pixels.append(s.pixel_values)  # row-major slot order, as masked_scatter fills und_mask
            if s.flow_mask is not None:
                if s.flow_latent is None:
                    raise ValueError(f"{s.key}: latent not computed yet; call fill_latents() before packing")
                flow_mask[b, sl] = s.flow_mask
                latents.append(s.flow_latent), seeds.append(s.flow_seed)
                if s.repa_pixels is not None:
                    repa.append(s.repa_pixels)
            t += L
    if repa and len(repa) != len(latents):
        raise ValueError("some flow samples carry REPA pixels and others do not")
    return TrainBatch(input_ids=input_ids, positions=positions, doc_ids=doc_ids, und_mask=und_mask,
                      pixel_values=torch.cat(pixels) if pixels else None, gen_mask=gen_mask, gen_ids=gen_ids,
                      text_labels=text_labels, image_labels=image_labels, kinds=kinds, flow_mask=flow_mask,
                      flow_latents=torch.stack(latents) if latents else None,
                      flow_seeds=torch.tensor(seeds, dtype=torch.long) if seeds else None,
                      repa_pixels=torch.stack(repa) if repa else None, text_weights=text_weights)


def flow_starts(flow_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the first slot of each flow run (its timestep token)."""
    return flow_mask & ~torch.nn.functional.pad(flow_mask, (1, 0))[:, :-1]


def split_rows(batch: TrainBatch, rows: int, n_und_tokens: int) -> list[TrainBatch]:
    """Micro-batches of at most `rows` rows (gradient accumulation), each with its own images."""
    per_row = (batch.und_mask.sum(1) // n_und_tokens).tolist()
    fm = batch.flow_mask
    flow_row = flow_starts(fm).sum(1).tolist() if fm is not None else None
    out, img, fl = [], 0, 0
    for r in range(0, batch.input_ids.shape[0], rows):
        n = int(sum(per_row[r:r + rows]))
        pix = batch.pixel_values[img:img + n] if n else None
        img += n
        sl = slice(r, r + rows)
        flow = {}
        if fm is not None:
            k = int(sum(flow_row[r:r + rows]))
            fs = slice(fl, fl + k)
            fl += k
            flow = dict(flow_mask=fm[sl], flow_latents=batch.flow_latents[fs] if k else None,
                        flow_seeds=batch.flow_seeds[fs] if k else None,
                        repa_pixels=batch.repa_pixels[fs] if k and batch.repa_pixels is not None else None)
        out.append(TrainBatch(input_ids=batch.input_ids[sl], positions=batch.positions[sl], doc_ids=batch.doc_ids[sl],
                              und_mask=batch.und_mask[sl], pixel_values=pix, gen_mask=batch.gen_mask[sl],
                              gen_ids=batch.gen_ids[sl], text_labels=batch.text_labels[sl],
                              image_labels=batch.image_labels[sl],
                              kinds=None if batch.kinds is None else batch.kinds[sl],
                              text_weights=None if batch.text_weights is None else batch.text_weights[sl], **flow))
    return out


def without_padding(batch: TrainBatch) -> TrainBatch:
    """A Janus batch as one row of its real slots, the samples numbered over the whole batch: what the model
    runs with train.attention = "segments" (models.llama.PackedSegments), so that nothing is computed on
    padding and nothing of the shape (rows, context) is built. Returns the batch itself when there is no
    padding to drop, or a padding slot before a real one (hidden slots), or nothing but padding."""
    d = batch.doc_ids
    B, T = d.shape
    real = d >= 0
    n = real.sum(1)
    if batch.flow_mask is not None or int(n.sum()) in (0, B * T) or \
            not bool((real == (torch.arange(T, device=d.device)[None] < n[:, None])).all()):
        return batch
    keep = real.flatten().nonzero().squeeze(1)
    docs = d.max(1).values + 1  # samples per row (numbered 0, 1, ... in each row)
    d = d + (torch.cumsum(docs, 0) - docs)[:, None]
    take = lambda x: x.flatten()[keep][None]  # noqa: E731
    return dataclasses.replace(batch, input_ids=take(batch.input_ids), positions=take(batch.positions),
                               doc_ids=take(d), und_mask=take(batch.und_mask), gen_mask=take(batch.gen_mask),
                               gen_ids=take(batch.gen_ids), text_labels=take(batch.text_labels),
                               image_labels=take(batch.image_labels),
                               kinds=None if batch.kinds is None else take(batch.kinds),
                               text_weights=None if batch.text_weights is None else take(batch.text_weights))
