"""The ceiling of editing by a plan in words (docs/editing.md): each test edit's target scene drawn from its own
exact description (`world.prompts.describe`, the answer the model gives to "What is in this image?"), as if a
plan step had written it perfectly, and judged like an edit (the target scene exact).

A model that plans an edit in words and then draws the plan can score no better than this, whatever its plan.

    python examples/edit_plan_ceiling.py                      # the bundled default model, 2 images per edit
    python examples/edit_plan_ceiling.py -m RUN -n 4
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

import januskit
from januskit.cli import DEFAULT_MODEL
from januskit.eval.world import test_split
from januskit.sampling.logits import row_generator
from januskit.world.edits import TASKS, Edit, score_edit
from januskit.world.judge import detect
from januskit.world.prompts import describe


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=str(DEFAULT_MODEL))
    p.add_argument("-n", type=int, default=2, help="images per edit")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    pipe = januskit.load(a.model)
    split = test_split(None)
    edits = [Edit.from_json(json.loads(x)) for x in (split / "edits.jsonl").read_text().splitlines() if x.strip()]
    ids = [pipe.processor.generation_prompt(describe(e.target)) for e in edits]
    rows = [(i, k) for i in range(len(edits)) for k in range(a.n)]  # image k of edit i: generator (seed, i * n + k)
    by_task: dict[str, list[bool]] = defaultdict(list)
    by_count: dict[int, list[bool]] = defaultdict(list)
    for start in range(0, len(rows), a.batch):
        chunk = rows[start:start + a.batch]
        out = pipe.generate_batch([ids[i] for i, _ in chunk], generators=[row_generator(a.seed, i * a.n + k) for i, k in chunk],
                                  cfg_weight=pipe.default_cfg_weight)
        for (i, _), img in zip(chunk, out.uint8()):
            ok = score_edit(detect(img), edits[i].target)
            by_task[edits[i].task].append(ok)
            by_count[len(edits[i].target)].append(ok)
    tasks = {t: float(np.mean(by_task[t])) for t in TASKS}
    print("| " + " | ".join(TASKS) + " | overall |\n|" + "---|" * (len(TASKS) + 1))
    print("| " + " | ".join(f"{v:.2f}" for v in tasks.values()) + f" | {np.mean(list(tasks.values())):.3f} |")
    print("by objects in the target: " + ", ".join(f"{n}: {np.mean(v):.2f} ({len(v)})" for n, v in sorted(by_count.items())))


if __name__ == "__main__":
    main()
