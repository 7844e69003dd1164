"""How local a model's VQ tokenizer is, measured on the miniature world's edits (docs/editing.md).

For each edit task, N train-kind edits (one object recoloured, moved, added, ...) are rendered before and
after and both are encoded. A token whose own pixel block did not change could stay the same; a perfectly
local tokenizer keeps all of those. Printed per task:
  kept   - fraction of all tokens equal in the two encodings
  ideal  - fraction of tokens whose pixel block is unchanged (what a block-local tokenizer keeps)
  local  - of the tokens with an unchanged block, the fraction kept (1.0 = local)

    python examples/vq_locality.py                    # the bundled default model
    python examples/vq_locality.py -m runs/world/components --edits 400
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from januskit.checkpoint.official import load_janus
from januskit.cli import DEFAULT_MODEL
from januskit.processing.image import to_gen_pixels
from januskit.world.edits import TASKS, draw_edit, held_out_edits
from januskit.world.render import render


@torch.no_grad()
def locality(vq, task: str, n: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    held, size = held_out_edits(), vq.config.image_size
    edits = [draw_edit(rng, task, held) for _ in range(n)]
    images = [[render(e.source) for e in edits], [render(e.target) for e in edits]]
    pixels = [torch.stack([to_gen_pixels(im, size) for im in ims]) for ims in images]
    ids = [vq.encode(x) for x in pixels]
    src, tgt = (((x + 1) * 127.5).round().to(torch.int64).permute(0, 2, 3, 1).numpy() for x in pixels)
    g = int(round(ids[0].shape[1] ** 0.5))
    f = size // g
    diff = np.abs(src - tgt).sum(-1)  # (n, S, S)
    same_block = torch.from_numpy(diff.reshape(n, g, f, g, f).sum((2, 4)).reshape(n, g * g) == 0)
    kept = ids[0] == ids[1]
    return {"kept": kept.float().mean().item(), "ideal": same_block.float().mean().item(),
            "local": (kept & same_block).sum().item() / max(1, same_block.sum().item())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=str(DEFAULT_MODEL))
    p.add_argument("--edits", type=int, default=200, help="edits per task")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    vq = load_janus(Path(a.model), torch.float32).gen_vision_model.eval()
    print("| task | kept | ideal | local |\n|---|---|---|---|")
    rows = {t: locality(vq, t, a.edits, a.seed) for t in TASKS}
    for t, r in rows.items():
        print(f"| {t} | {r['kept']:.3f} | {r['ideal']:.3f} | {r['local']:.3f} |")
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("kept", "ideal", "local")}
    print(f"| mean | {mean['kept']:.3f} | {mean['ideal']:.3f} | {mean['local']:.3f} |")


if __name__ == "__main__":
    main()
