"""The scaling study's figure: three panels, a line per size, drawn where the points are."""
from __future__ import annotations

import numpy as np
from PIL import Image

from januskit.recipes.scaling import plot_scaling
from januskit.train.plot import PALETTE


def test_scaling_plot_has_a_line_per_size_in_each_panel(tmp_path):
    rows = [{"size": s, "params": p, "samples": n, "loss_gen": l, "geneval": g, "qa": q}
            for s, p, pts in (("S", 0.9e6, [(16000, 3.0, 0.1, 0.3), (64000, 1.7, 0.25, 0.5)]),
                              ("M", 3.4e6, [(16000, 2.6, 0.13, 0.34), (64000, 1.4, 0.33, 0.5)]))
            for n, l, g, q in pts]
    img = np.asarray(Image.open(plot_scaling(rows, tmp_path / "s.png")).convert("RGB"))
    assert img.shape == (320, 3 * 420, 3)
    # Sizes sorted by label: "M (3.4M)" gets the first colour, "S (0.9M)" the second; both in every panel.
    for panel in range(3):
        part = img[:, panel * 420:(panel + 1) * 420].reshape(-1, 3)
        for colour in PALETTE[:2]:
            assert (part == colour).all(1).sum() > 50, (panel, colour)
        assert not (part == PALETTE[2]).all(1).any()  # no third series
