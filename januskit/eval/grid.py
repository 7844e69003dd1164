"""A picture of a world evaluation: images in a grid, one row per prompt (the first prompts of each GenEval
category) or per edit (the first edits of each task, the source first), the judge's verdict under every
generated image."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .geneval import sample_path

GREEN, RED, GREY = (20, 140, 40), (200, 30, 30), (110, 110, 110)

Row = tuple[list[tuple[str, tuple[int, int, int]]], list[tuple[Path, bool | None]]]  # label lines; (image, verdict)


def _first_of_each(keys: list[str], per_key: int) -> list[int]:
    seen: dict[str, int] = defaultdict(int)
    out = []
    for i, k in enumerate(keys):
        if seen[k] < per_key:
            seen[k] += 1
            out.append(i)
    return out


def _draw(rows: list[Row], path: str | Path, scale: int, label_width: int) -> Path:
    """Rows of label lines and images, each image with its verdict ("correct" / "wrong"; None: "source")."""
    first = Image.open(rows[0][1][0][0])
    cell = first.width * scale
    row_h, pad = cell + 18, 6
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_width + cols * (cell + pad) + pad, len(rows) * (row_h + pad) + pad), "white")
    d = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, (labels, images) in enumerate(rows):
        y = pad + r * (row_h + pad)
        for j, (text, colour) in enumerate(labels):
            d.text((pad, y + 4 + 16 * j), text, fill=colour, font=font)
        for j, (img_path, ok) in enumerate(images):
            x = label_width + pad + j * (cell + pad)
            img = Image.open(img_path).convert("RGB").resize((cell, cell), Image.NEAREST)
            grid.paste(img, (x, y))
            d.rectangle([x - 1, y - 1, x + cell, y + cell], outline=(200, 200, 200))
            word, colour = ("source", GREY) if ok is None else ("correct", GREEN) if ok else ("wrong", RED)
            d.text((x + cell // 2 - 18, y + cell + 3), word, fill=colour, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _labels(kind: str, rec: dict[str, Any], text: str, images: list[dict[str, Any]]) -> list:
    """A row's three label lines: its category or task (marked when held out), the prompt, the verdict count."""
    right = sum(r["correct"] for r in images)
    return [(kind + (" (held-out combination)" if rec.get("held_out") else ""), GREY), (f'"{text}"', (0, 0, 0)),
            (f"{right} of {len(images)} correct", GREEN if right else RED)]


def verdict_grid(records: list[dict[str, Any]], image_dir: str | Path, images_per_prompt: int, path: str | Path, *,
                 prompts_per_category: int = 2, scale: int = 2, label_width: int = 330) -> Path:
    """`records`: the generation report's per-image records, in order (image k is prompt k //
    images_per_prompt, saved by `evaluate(..., save_dir=image_dir)` in GenEval's layout)."""
    n, image_dir = images_per_prompt, Path(image_dir)
    prompts = _first_of_each([records[p * n]["category"] for p in range(len(records) // n)], prompts_per_category)
    if not prompts:
        raise ValueError("verdict_grid: no generation records")
    rows: list[Row] = []
    for p in prompts:
        rec = records[p * n]
        rows.append((_labels(rec["category"], rec, rec["prompt"], records[p * n:p * n + n]),
                     [(sample_path(image_dir, p, j), records[p * n + j]["correct"]) for j in range(n)]))
    return _draw(rows, path, scale, label_width)


def edit_grid(records: list[dict[str, Any]], image_dir: str | Path, split_dir: str | Path, images_per_edit: int,
              path: str | Path, *, edits_per_task: int = 2, scale: int = 2, label_width: int = 330) -> Path:
    """`records`: the edit report's per-image records, in order (image k of edit i saved by
    `evaluate(..., save_dir=DIR)` as DIR/edits/edit<i>_<k>.png, `image_dir` = DIR/edits); the source
    (from `split_dir`), then the results with their verdicts."""
    n, image_dir, split_dir = images_per_edit, Path(image_dir), Path(split_dir)
    edits = _first_of_each([records[i * n]["task"] for i in range(len(records) // n)], edits_per_task)
    if not edits:
        raise ValueError("edit_grid: no edit records")
    rows: list[Row] = []
    for i in edits:
        rec = records[i * n]
        labels = _labels(rec["task"], rec, rec["instruction"], records[i * n:i * n + n])
        images = [(split_dir / rec["source"], None)] + [(image_dir / records[i * n + k]["image"], records[i * n + k]["correct"])
                                                       for k in range(n)]
        rows.append((labels, images))
    return _draw(rows, path, scale, label_width)
