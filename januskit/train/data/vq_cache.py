"""Precompute generation images' (and edit targets') VQ ids once (the VQ encoder is frozen in every stage).

Writes a copy of a dataset's JSONL manifest(s) with `vq_ids` filled in for every generation sample
that has an image (edit sample: a target) and no ids yet; every other line is copied unchanged, in order.
Image paths stay relative to the dataset root, so read the new manifest with
`ManifestSource(out, root=dataset_root)`
(or write it into the root and pass the file, not the folder, which would also read the original).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ...processing.image import to_gen_pixels
from .records import _jsonl_files, jsonl_rows, read_image_file
from .encode import check_vq_ids, vq_tokenizer

_GENERATED = {"generation": "image", "edit": "target"}  # kind -> the field of the image its vq_ids stand for


def cache_vq_ids(dataset_root: str | Path, model: torch.nn.Module, out_manifest: str | Path, *,
                 manifests: Sequence[str | Path] | None = None, batch_size: int = 16) -> dict[str, int]:
    """Returns counts: lines written, images encoded, generation / edit lines that already had ids."""
    root, out = Path(dataset_root), Path(out_manifest)
    files = [f for f in _jsonl_files(manifests or root) if f.resolve() != out.resolve()]
    vq = model.config.vq
    tokenize = vq_tokenizer(model)
    stats = {"lines": 0, "encoded": 0, "cached": 0}
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as fh:
        held: list[dict] = []  # lines waiting for the batch that completes them (order is kept)
        todo: list[tuple[dict, torch.Tensor, str]] = []

        def flush() -> None:
            if todo:
                ids = tokenize(torch.stack([p for _, p, _ in todo])).cpu()
                for (obj, _, where), row in zip(todo, ids):
                    obj["vq_ids"] = check_vq_ids(row.long(), vq.n_tokens, vq.codebook_size, where).tolist()
                stats["encoded"] += len(todo)
                todo.clear()
            for obj in held:
                fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            stats["lines"] += len(held)
            held.clear()

        for f in files:
            for where, obj in jsonl_rows(f):
                held.append(obj)
                kind = obj.get("kind") if isinstance(obj, dict) else None
                field = _GENERATED.get(kind) if isinstance(kind, str) else None  # a bad kind is the reader's to report
                if field is not None:
                    if obj.get("vq_ids") is not None:
                        stats["cached"] += 1
                    elif isinstance(obj.get(field), str):
                        img = read_image_file(root, obj[field], where)
                        todo.append((obj, to_gen_pixels(img, vq.image_size), where))
                        if len(todo) >= batch_size:
                            flush()
        flush()
    os.replace(tmp, out)  # never leave a half-written manifest under the final name
    return stats
