"""Why the world model answers "What colour is the square?" with another object's colour: the look-up study of
docs/miniature-world.md ("Where the look-up fails").

    python examples/lookup_study.py attention januskit/assets/default-model colour   # or position
    python examples/lookup_study.py probe januskit/assets/default-model
    python examples/lookup_study.py train --src SRC --out RUN --order question-first --qtypes colour,count \\
        --turns 3 --steps 1500 --world W   # --src: or a build's work/text; --ratio 1:1:0: text mixed in
    python examples/lookup_study.py score RUN --order question-first,image-first

`attention`: for 100 test questions of a type, the share of the answer position's attention, per layer and head,
that lands on one cell of the object(s) the question names against one cell of another object (each of the 2x2
grid's cells is 16 of the 64 image tokens). `probe`: what the image tokens, and their mean, hold. `train`: understanding only from SRC (e.g. a fresh LLM from
`examples/understanding_proxy.py fresh`), the first question of each conversation placed before the image
(`question-first`, `Recipe.question_first`) or after it (`image-first`, the official chat format's layout). `score`: 100 test
questions a type asked either way, greedy, exact match.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE = "<image_placeholder>"


def cell_tokens(cell: int, side: int = 8) -> list[int]:
    """Raster indices of the tokens of one cell of the 2x2 grid on a side x side token grid."""
    half = side // 2
    r0, c0 = (cell // 2) * half, (cell % 2) * half
    return [side * (r0 + i) + c0 + j for i in range(half) for j in range(half)]


def attention(model: str, qtype: str) -> None:
    import januskit
    import januskit.models.llama as llama
    from januskit.eval.world import test_split
    from januskit.processing.image import load_image
    from januskit.sampling.text import next_token_probs

    pipe = januskit.load(model)
    rows_of_last: list[torch.Tensor] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):  # keep the last query's softmax weights (B=1), then attend as usual
        rows_of_last.append((q[0, :, -1:].float() @ k[0].float().transpose(-1, -2) / math.sqrt(q.shape[-1]))
                            .softmax(-1)[:, 0])
        return sdpa(q, k, v, **kw)

    llama.F = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    llama.F.scaled_dot_product_attention = spy
    split = test_split(None)
    rows = [json.loads(x) for x in (split / "questions.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["qtype"] == qtype][:100]
    on_target, on_other, n = defaultdict(float), defaultdict(float), 0
    for r in rows:
        objs = r["scene"]  # [shape, colour, cell, ...]
        named = {o[2] for o in objs if (f"the {o[0]}?" in r["question"] if qtype == "colour"
                                        else f"{o[1]} {o[0]}" in r["question"])}
        others = {o[2] for o in objs} - named
        if not named or not others:
            continue
        rows_of_last.clear()
        proc = pipe.processor
        batch = proc.batch([proc.encode_chat(proc.user_turn(r["question"], [load_image(split / r["image"])]), "")])
        with torch.no_grad():
            next_token_probs(pipe.model, batch)
        img = torch.nonzero(batch.image_mask[0]).squeeze(-1)
        for layer, w in enumerate(rows_of_last):
            w = w[:, img]
            on_target[layer] += w[:, [t for c in named for t in cell_tokens(c)]].sum(-1) / len(named)
            on_other[layer] += w[:, [t for c in others for t in cell_tokens(c)]].sum(-1) / len(others)
        n += 1
    print(f"{model}: {qtype}, {n} questions; attention of the answer position, per head: "
          "one named object's cell / one other object's cell")
    for layer in on_target:
        t, o = on_target[layer] / n, on_other[layer] / n
        print(f"  layer {layer}: " + "  ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(t.tolist(), o.tolist())))


def probe(model: str) -> None:
    """Linear probes (80/20 split of 3,000 random scenes): every token's shape, colour and cell from the LLM's input
    (the aligner's output), and each cell's shape and colour from the mean of an image's tokens."""
    import numpy as np

    import januskit
    from januskit.world.render import render
    from januskit.world.scene import patch_labels, random_scene

    pipe = januskit.load(model)
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(3000)]
    px = torch.stack([pipe.processor.transform(render(s)) for s in scenes]).to(pipe.dtype)
    with torch.no_grad():
        emb = torch.cat([pipe.model.image_embeds(px[i: i + 500]).float() for i in range(0, len(px), 500)])
    side = int(emb.shape[1] ** 0.5)
    lab = torch.from_numpy(np.stack([patch_labels(s, side) for s in scenes]))  # (N, tokens, (shape, colour, cell))

    def accuracy(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
        n = int(len(x) * 0.8)
        mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-5
        x = (x - mu) / sd
        w = torch.zeros(x.shape[-1], k, requires_grad=True)
        b = torch.zeros(k, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            (F.cross_entropy(x[:n] @ w + b, y[:n]) + 1e-4 * w.pow(2).sum()).backward()
            opt.step()
        return float(((x[n:] @ w + b).argmax(-1) == y[n:]).float().mean())

    tokens, per_token = emb[:600].flatten(0, 1), lab[:600].flatten(0, 1)
    for j, (name, k) in enumerate((("shape", 5), ("colour", 7), ("cell", 4))):
        print(f"{model}: every token's {name}: {accuracy(tokens, per_token[:, j], k):.3f}")
    corner = [cell_tokens(c, side)[0] for c in range(4)]
    for j, (name, k) in enumerate((("shape", 5), ("colour", 7))):
        accs = [accuracy(emb.mean(1), lab[:, t, j], k) for t in corner]
        print(f"{model}: each cell's {name} from the mean token: " + " ".join(f"{a:.3f}" for a in accs))


def train_arm(a: argparse.Namespace) -> None:
    import januskit.world.dataset as wd
    from januskit.recipes.default_model import Recipe, StagePlan, stage_config
    from januskit.train.trainer import train

    if a.qtypes:
        ask, mine = wd.ask_some, tuple(a.qtypes.split(","))
        wd.ask_some = lambda scene, rng, k, qtypes=mine: ask(scene, rng, k, qtypes)
    parts = a.ratio.split(":")
    if len(parts) != 3 or not all(x.isdigit() for x in parts) or not any(map(int, parts)):
        raise SystemExit(f"--ratio {a.ratio!r}: expected und:text:gen counts, e.g. 1:0:0 or 2:3:5")
    ratio = tuple(int(x) for x in parts)
    plan = StagePlan("und", "janus-pro/2", steps=a.steps, batch_size=32, lr=a.lr, warmup=50, ratio=ratio,
                     schedule="cosine")
    r = dataclasses.replace(Recipe(), autocast="bfloat16", turns=a.turns, question_first=a.order == "question-first")
    train(stage_config(plan, Path(a.src), Path(a.out), Path(a.world), r))


def score(a: argparse.Namespace) -> None:
    import januskit
    from januskit.eval.world import normalise, test_split
    from januskit.processing.image import load_image

    pipe, split = januskit.load(a.model), test_split(None)
    rows, seen = [], defaultdict(int)
    for line in (split / "questions.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["qtype"] != "describe" and seen[r["qtype"]] < 100:
            seen[r["qtype"]] += 1
            rows.append(r)
    images = [[load_image(split / r["image"])] for r in rows]
    for order in a.order.split(","):
        prompts = [r["question"] + f"\n{IMAGE}" if order == "question-first" else r["question"] for r in rows]
        right = defaultdict(list)
        for r, ans in zip(rows, pipe.chat_batch(prompts, images, max_new_tokens=8)):
            right[r["qtype"]].append(normalise(ans) == normalise(r["answer"]))
        per = {t: round(sum(v) / len(v), 2) for t, v in right.items()}
        print(f"{a.model} {order}: QA {sum(map(sum, right.values())) / len(rows):.3f} {per}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    at = sub.add_parser("attention")
    at.add_argument("model")
    at.add_argument("qtype", choices=("colour", "position"))
    sub.add_parser("probe").add_argument("model")
    tr = sub.add_parser("train")
    tr.add_argument("--src", required=True)
    tr.add_argument("--out", required=True)
    tr.add_argument("--world", required=True, help="a written world (`januskit world write W`)")
    tr.add_argument("--order", choices=("question-first", "image-first"), default="question-first")
    tr.add_argument("--qtypes", help="question types to draw, comma-separated (default: the recipe's)")
    tr.add_argument("--turns", type=int, default=3)
    tr.add_argument("--steps", type=int, default=1500)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--ratio", default="1:0:0", help="und:text:gen samples a step (the recipe's Stage II: 2:3:5)")
    sc = sub.add_parser("score")
    sc.add_argument("model")
    sc.add_argument("--order", default="question-first,image-first")
    a = p.parse_args()
    {"attention": lambda: attention(a.model, a.qtype), "probe": lambda: probe(a.model), "train": lambda: train_arm(a),
     "score": lambda: score(a)}[a.what]()


if __name__ == "__main__":
    main()
