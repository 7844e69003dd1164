"""The training figures: drawn with matplotlib when it is installed (the `plot` extra), at the asked size and
with each series in its colour; without it nothing is drawn, one log line says so, and training goes on."""
from __future__ import annotations

import importlib.util
import logging
import sys

import numpy as np
import pytest
from PIL import Image

from januskit.recipes.scaling import plot_scaling
from januskit.train import plot
from januskit.train.plot import COLORS, PALETTE, plot_losses, plot_panels

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="the plot extra (matplotlib) is not installed")

ROWS = [{"size": s, "params": p, "samples": n, "loss_gen": l, "geneval": g, "qa": q}
        for s, p, pts in (("S", 0.9e6, [(16000, 3.0, 0.1, 0.3), (64000, 1.7, 0.25, 0.5)]),
                          ("M", 3.4e6, [(16000, 2.6, 0.13, 0.34), (64000, 1.4, 0.33, 0.5)]))
        for n, l, g, q in pts]
METRICS = [{"step": s, "loss": 3.0 / s ** 0.3, "loss_gen": 4.0 / s ** 0.3, "loss_und": None, "lr": 1e-3}
           for s in range(1, 41)]


def _near(img: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> int:
    """Pixels within `tol` of `colour` on every channel (antialiasing blends a line's edges)."""
    return int((np.abs(img.reshape(-1, 3).astype(int) - np.array(colour)) <= tol).all(1).sum())


@needs_matplotlib
def test_scaling_plot_has_a_line_per_size_in_each_panel(tmp_path):
    img = np.asarray(Image.open(plot_scaling(ROWS, tmp_path / "s.png")).convert("RGB"))
    assert img.shape == (320, 3 * 420, 3)
    # Sizes sorted by label: "M (3.4M)" gets the first colour, "S (0.9M)" the second; both in every panel.
    for panel in range(3):
        part = img[:, panel * 420:(panel + 1) * 420]
        for colour in PALETTE[:2]:
            assert _near(part, colour) > 50, (panel, colour)
        assert _near(part, PALETTE[2]) == 0  # no third series


@needs_matplotlib
def test_loss_plot_is_a_png_of_the_asked_size_with_each_curve(tmp_path):
    out = plot_losses(METRICS, tmp_path / "sub" / "loss.png", size=(640, 400), title="stage x")
    assert out == tmp_path / "sub" / "loss.png"
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (400, 640, 3)
    assert (img < 250).any(1).any() and img.std() > 5  # not blank
    assert _near(img, COLORS["loss_gen"]) > 100 and _near(img, COLORS["loss"], tol=8) > 100
    assert _near(img, COLORS["loss_und"]) == 0  # a key with only nulls draws nothing
    assert plot_losses([{"step": 1, "loss": None}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


@needs_matplotlib
def test_panels_with_long_series_are_curves(tmp_path):
    curve = [(s, 1.0 / s) for s in range(1, 101)]
    out = plot_panels([("a", {"x": curve}), ("b", {"y": curve[:3]})], tmp_path / "p.png", xlabel="step")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (320, 840, 3)
    assert _near(img[:, :420], PALETTE[0]) > 50 and _near(img[:, 420:], PALETTE[1]) > 20


def test_without_matplotlib_nothing_is_drawn_and_one_line_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setattr(plot, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="januskit.train.plot"):
        assert plot_losses(METRICS, tmp_path / "loss.png") is None
        assert plot_panels([("a", {"x": [(1, 1.0), (2, 0.5)]})], tmp_path / "p.png") is None
        assert plot_scaling(ROWS, tmp_path / "s.png") is None
    assert not list(tmp_path.iterdir())
    lines = [r.getMessage() for r in caplog.records if r.name == "januskit.train.plot"]
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0] and "januskit[plot]" in lines[0]
