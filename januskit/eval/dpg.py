"""DPG-Bench (Hu et al. 2024, the ELLA paper): 1,065 long dense prompts, each with a set of yes/no questions
(propositions) that may depend on others.

Files: `prompts/<item_id>.txt` (the prompt) and `dpg_bench.csv` with one row per question: `item_id`,
`proposition_id`, `dependency` (comma-separated proposition ids; "0" = none), `category_broad`
(entity, attribute, relation, global, other), `question_natural_language`, among others.

Generation: per prompt a 2x2 grid of 4 images saved as `<out>/<item_id>.png`, as the official
compute_dpg_bench.py expects (it splits each grid into its 4 tiles). Scoring, as that script does, with a
VQA judge you plug in (the official one is mPLUG-large; januskit's own chat stands in here): each tile is
asked every question; a "yes" scores 1; a question whose parent (any dependency) scored 0 scores 0; a
tile's score is the mean over its questions, an item's the mean over its 4 tiles, the benchmark's the mean
over items x100. Per broad category: the mean over that category's questions (dependency applied), x100."""
from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .harness import BenchmarkDataError, generate_sets

VQAJudge = Callable[[Image.Image, str], bool]  # (image, question) -> answered yes


@dataclass
class Question:
    id: int
    parents: tuple[int, ...]
    category: str
    text: str


@dataclass
class Prompt:
    item_id: str
    text: str
    questions: list[Question]


def read_dpg(data: Path) -> list[Prompt]:
    table, prompts = data / "dpg_bench.csv", data / "prompts"
    for need, what in ((table, "dpg_bench.csv"), (prompts, "the prompts/ folder")):
        if not need.exists():
            raise BenchmarkDataError(f"DPG-Bench: {need} is missing; the official release (ELLA repository, "
                                     f"dpg_bench/) has {what}: pass that folder as --data")
    by_item: dict[str, list[Question]] = defaultdict(list)
    with open(table, encoding="utf-8", newline="") as fh:
        for n, r in enumerate(csv.DictReader(fh), 2):
            try:
                deps = tuple(int(d) for d in str(r["dependency"]).split(",") if d.strip() and int(d) != 0)
                q = Question(int(r["proposition_id"]), deps, r["category_broad"].strip(), r["question_natural_language"].strip())
            except (KeyError, ValueError, AttributeError) as e:
                raise BenchmarkDataError(f"{table}:{n}: not a DPG-Bench row ({e}); expected item_id, proposition_id, "
                                         "dependency, category_broad, question_natural_language") from None
            by_item[r["item_id"]].append(q)
    out = []
    for item, qs in by_item.items():
        txt = prompts / f"{item}.txt"
        if not txt.is_file():
            raise BenchmarkDataError(f"DPG-Bench: {txt} is missing (item {item} of dpg_bench.csv)")
        out.append(Prompt(item, txt.read_text(encoding="utf-8").strip(), qs))
    return out


def grid(images: list[Image.Image]) -> Image.Image:
    """4 images -> one 2x2 grid (row-major), the official script's input."""
    w, h = images[0].size
    g = Image.new("RGB", (2 * w, 2 * h))
    for k, im in enumerate(images[:4]):
        g.paste(im, ((k % 2) * w, (k // 2) * h))
    return g


def tiles(g: Image.Image) -> list[Image.Image]:
    w, h = g.size[0] // 2, g.size[1] // 2
    return [g.crop(((k % 2) * w, (k // 2) * h, (k % 2 + 1) * w, (k // 2 + 1) * h)) for k in range(4)]


def generate(pipe, prompts: list[Prompt], out: Path, *, seed: int = 0, limit: int | None = None, batch: int = 64,
             progress: bool = True, **options: Any) -> None:
    """This rank's share of the prompts as grids, in batches of about `batch` images; a grid already written
    is skipped. Image k of prompt i is sampled with generator (seed, 4i + k) (harness.generate_sets)."""
    prompts = prompts[:limit] if limit else prompts
    out.mkdir(parents=True, exist_ok=True)

    def save(i: int, images: list[Image.Image]) -> None:
        tmp = out / f".{prompts[i].item_id}.png"
        grid(images).save(tmp)
        tmp.replace(out / f"{prompts[i].item_id}.png")

    generate_sets(pipe, [p.text for p in prompts], 4, lambda i: (out / f"{prompts[i].item_id}.png").is_file(), save,
                  seed=seed, batch=batch, name="dpg", progress=progress, **options)


def score_tile(tile: Image.Image, questions: list[Question], judge: VQAJudge) -> dict[int, float]:
    """Question id -> 0/1 for one tile, a question zeroed when any of its parents scored 0."""
    raw = {q.id: float(judge(tile, q.text)) for q in questions}
    return {q.id: 0.0 if any(raw.get(p, 1.0) == 0.0 for p in q.parents) else raw[q.id] for q in questions}


def score(prompts: list[Prompt], out: Path, judge: VQAJudge) -> dict[str, Any]:
    items, cats = {}, defaultdict(list)
    for p in prompts:
        path = out / f"{p.item_id}.png"
        if not path.is_file():
            raise BenchmarkDataError(f"DPG-Bench: {path} is missing: generate first")
        per_tile = [score_tile(t, p.questions, judge) for t in tiles(Image.open(path).convert("RGB"))]
        items[p.item_id] = sum(sum(s.values()) / len(s) for s in per_tile) / len(per_tile)
        for q in p.questions:
            cats[q.category].append(sum(s[q.id] for s in per_tile) / len(per_tile))
    overall = 100 * sum(items.values()) / len(items) if items else 0.0
    return {"overall": overall, "categories": {c: 100 * sum(v) / len(v) for c, v in sorted(cats.items())},
            "items": items, "headline": overall}


class ChatJudge:
    """januskit's own chat as the VQA judge: the question plus "Answer yes or no.", greedy; yes when the
    answer's first word is yes."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def __call__(self, image: Image.Image, question: str) -> bool:
        a = self.pipe.chat(f"{question}\nAnswer yes or no.", images=[image], max_new_tokens=4, system_prompt="")
        return a.strip().lower().startswith("yes")
