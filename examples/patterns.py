"""The worked example of docs/finetune.md: a small image data set that is not the shapes world.

64 px stripes and checkers in four colours, with a question per image (understanding), a caption per image
(generation) and optionally text and edit records, in januskit's JSONL format (docs/data-format.md):

    python examples/patterns.py data/patterns --understanding 200 --generation 200
    januskit finetune --data data/patterns --out runs/patterns
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
PATTERNS = ("horizontal stripes", "vertical stripes", "checkers", "diagonal stripes")


def draw(pattern: str, colour: str, size: int = 64, period: int = 16) -> Image.Image:
    """A 64 px pattern in one colour on white: procedural, and nothing like the world's shapes."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    c, h = COLOURS[colour], period // 2
    for y in range(0, size, period):
        for x in range(0, size, period):
            if pattern == "horizontal stripes":
                d.rectangle([x, y, x + period - 1, y + h - 1], fill=c)
            elif pattern == "vertical stripes":
                d.rectangle([x, y, x + h - 1, y + period - 1], fill=c)
            elif pattern == "checkers":
                d.rectangle([x, y, x + h - 1, y + h - 1], fill=c)
                d.rectangle([x + h, y + h, x + period - 1, y + period - 1], fill=c)
            else:
                d.polygon([(x, y + period), (x + h, y + period), (x + period, y + h), (x + period, y)], fill=c)
    return im


def write_patterns(root: Path, n_und: int, n_gen: int, seed: int = 0, n_text: int = 0, n_edit: int = 0) -> Path:
    """understanding.jsonl ("What pattern is this?" -> "red checkers"), generation.jsonl (the caption -> the
    image), optionally text.jsonl and edit.jsonl ("Make it blue." -> the same pattern in blue), with images/."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)

    def image(i: int, prefix: str) -> tuple[str, str]:
        p, c = rng.choice(PATTERNS), rng.choice(list(COLOURS))
        name = f"images/{prefix}{i:04d}.png"
        draw(p, c).save(root / name)
        return name, f"{c} {p}"

    with open(root / "understanding.jsonl", "w") as f:
        for i in range(n_und):
            name, answer = image(i, "u")
            f.write(json.dumps({"kind": "understanding", "images": [name], "messages": [
                {"role": "user", "content": "What pattern is this?"}, {"role": "assistant", "content": answer}]}) + "\n")
    with open(root / "generation.jsonl", "w") as f:
        for i in range(n_gen):
            name, caption = image(i, "g")
            f.write(json.dumps({"kind": "generation", "caption": caption, "image": name}) + "\n")
    if n_edit:
        with open(root / "edit.jsonl", "w") as f:
            for i in range(n_edit):
                p, a, b = rng.choice(PATTERNS), *rng.sample(list(COLOURS), 2)
                draw(p, a).save(root / f"images/e{i:04d}-a.png")
                draw(p, b).save(root / f"images/e{i:04d}-b.png")
                f.write(json.dumps({"kind": "edit", "instruction": f"Make it {b}.", "images": [f"images/e{i:04d}-a.png"],
                                    "target": f"images/e{i:04d}-b.png"}) + "\n")
    if n_text:
        with open(root / "text.jsonl", "w") as f:
            for i in range(n_text):
                f.write(json.dumps({"kind": "text", "text": f"Stripes and checkers, pattern number {i}."}) + "\n")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--understanding", type=int, default=200)
    ap.add_argument("--generation", type=int, default=200)
    ap.add_argument("--text", type=int, default=0)
    ap.add_argument("--edit", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write_patterns(a.out, a.understanding, a.generation, a.seed, n_text=a.text, n_edit=a.edit)
    print(f"wrote {a.out}: {a.understanding} understanding, {a.generation} generation, {a.text} text, "
          f"{a.edit} edit records")


if __name__ == "__main__":
    main()
