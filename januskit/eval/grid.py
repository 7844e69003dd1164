"""A picture of a world evaluation: generated images in a grid, one row per prompt, the first prompts
of each GenEval category, the judge's verdict under every image."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .geneval import sample_path

GREEN, RED = (20, 140, 40), (200, 30, 30)


def verdict_grid(records: list[dict[str, Any]], image_dir: str | Path, images_per_prompt: int, path: str | Path, *,
                 prompts_per_category: int = 2, scale: int = 2, label_width: int = 330) -> Path:
    """`records`: the generation report's per-image records, in order (image k is prompt k //
    images_per_prompt, saved by `evaluate(..., save_dir=image_dir)` in GenEval's layout)."""
    image_dir = Path(image_dir)
    rows: list[int] = []  # prompt indices
    seen: dict[str, int] = defaultdict(int)
    for p in range(len(records) // images_per_prompt):
        cat = records[p * images_per_prompt]["category"]
        if seen[cat] < prompts_per_category:
            seen[cat] += 1
            rows.append(p)
    if not rows:
        raise ValueError("verdict_grid: no generation records")
    first = Image.open(sample_path(image_dir, rows[0], 0))
    cell = first.width * scale
    row_h, pad = cell + 18, 6
    grid = Image.new("RGB", (label_width + images_per_prompt * (cell + pad) + pad, len(rows) * (row_h + pad) + pad),
                     "white")
    d = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, p in enumerate(rows):
        y = pad + r * (row_h + pad)
        rec = records[p * images_per_prompt]
        right = sum(records[p * images_per_prompt + j]["correct"] for j in range(images_per_prompt))
        d.text((pad, y + 4), rec["category"] + (" (held-out combination)" if rec.get("held_out") else ""),
               fill=(110, 110, 110), font=font)
        d.text((pad, y + 20), f'"{rec["prompt"]}"', fill="black", font=font)
        d.text((pad, y + 36), f"{right} of {images_per_prompt} correct", fill=GREEN if right else RED, font=font)
        for j in range(images_per_prompt):
            x = label_width + pad + j * (cell + pad)
            img = Image.open(sample_path(image_dir, p, j)).convert("RGB").resize((cell, cell), Image.NEAREST)
            grid.paste(img, (x, y))
            d.rectangle([x - 1, y - 1, x + cell, y + cell], outline=(200, 200, 200))
            ok = records[p * images_per_prompt + j]["correct"]
            d.text((x + cell // 2 - 18, y + cell + 3), "correct" if ok else "wrong", fill=GREEN if ok else RED,
                   font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
