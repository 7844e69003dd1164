"""The evaluation picture: which prompts it shows, where each image goes, and the verdict under it."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from januskit.eval.geneval import sample_path
from januskit.eval.grid import verdict_grid


def test_grid_rows_images_and_verdicts(tmp_path):
    ipp, cats = 2, ["single_object"] * 3 + ["position"] * 2  # 3 prompts of one category, 2 of another
    records, colours = [], {}
    for p, cat in enumerate(cats):
        for j in range(ipp):
            colours[p, j] = (p * 40, j * 100, 7)
            sample_path(tmp_path, p, j).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), colours[p, j]).save(sample_path(tmp_path, p, j))
            records.append({"prompt": f"prompt {p}", "category": cat, "held_out": False, "correct": (p + j) % 2 == 0})
    out = verdict_grid(records, tmp_path, ipp, tmp_path / "g.png", prompts_per_category=2, scale=8, label_width=100)
    g = np.asarray(Image.open(out).convert("RGB"))
    cell, pad, row_h = 64, 6, 64 + 18
    shown = [0, 1, 3, 4]  # the third single_object prompt is left out
    assert g.shape == (len(shown) * (row_h + pad) + pad, 100 + ipp * (cell + pad) + pad, 3)
    for r, p in enumerate(shown):
        y = pad + r * (row_h + pad)
        for j in range(ipp):
            x = 100 + pad + j * (cell + pad)
            assert tuple(g[y + cell // 2, x + cell // 2]) == colours[p, j]  # the image, upscaled in place
            verdict = g[y + cell + 2:y + row_h, x:x + cell].reshape(-1, 3).astype(int)
            green = ((verdict[:, 1] - verdict[:, 0]) > 60).sum()  # anti-aliased text: count by hue
            red = ((verdict[:, 0] - verdict[:, 1]) > 60).sum()
            assert (green > 20 and red == 0) if records[p * ipp + j]["correct"] else (red > 20 and green == 0)


def test_grid_without_records_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no generation records"):
        verdict_grid([], tmp_path, 4, tmp_path / "g.png")


def test_edit_grid_puts_the_source_first_then_the_results_and_their_verdicts(tmp_path):
    from januskit.eval.grid import edit_grid

    n, tasks = 2, ["recolour", "recolour", "recolour", "move"]
    records, colours = [], {}
    for i, task in enumerate(tasks):
        Image.new("RGB", (8, 8), (250, 250, i * 50)).save(tmp_path / f"src{i}.png")
        for k in range(n):
            colours[i, k] = (i * 40, k * 100, 9)
            Image.new("RGB", (8, 8), colours[i, k]).save(tmp_path / f"edit{i:04d}_{k}.png")
            records.append({"task": task, "instruction": f"edit {i}", "held_out": False, "correct": k == 1,
                            "source": f"src{i}.png", "image": f"edit{i:04d}_{k}.png"})
    out = edit_grid(records, tmp_path, tmp_path, n, tmp_path / "e.png", edits_per_task=2, scale=8, label_width=100)
    g = np.asarray(Image.open(out).convert("RGB"))
    cell, pad, row_h = 64, 6, 64 + 18
    shown = [0, 1, 3]
    assert g.shape == (len(shown) * (row_h + pad) + pad, 100 + (n + 1) * (cell + pad) + pad, 3)
    for r, i in enumerate(shown):
        y = pad + r * (row_h + pad)
        assert tuple(g[y + cell // 2, 100 + pad + cell // 2]) == (250, 250, i * 50)  # the source, first
        for k in range(n):
            x = 100 + pad + (k + 1) * (cell + pad)
            assert tuple(g[y + cell // 2, x + cell // 2]) == colours[i, k]
            verdict = g[y + cell + 2:y + row_h, x:x + cell].reshape(-1, 3).astype(int)
            green = ((verdict[:, 1] - verdict[:, 0]) > 60).sum()
            red = ((verdict[:, 0] - verdict[:, 1]) > 60).sum()
            assert (green > 20 and red == 0) if k == 1 else (red > 20 and green == 0)
    with pytest.raises(ValueError, match="no edit records"):
        edit_grid([], tmp_path, tmp_path, 2, tmp_path / "e.png")
