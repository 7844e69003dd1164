"""MMBench (Liu et al. 2023): multiple-choice questions in one TSV (`MMBench_DEV_EN.tsv`; or parquet) with
columns `index, question, hint, A, B, C, D, answer, category, l2-category, split` and the image as base64.

- Prompt (LLaVA-1.5's model_vqa_mmbench, which the Janus tables follow): the hint (when there is one) and
  the question on separate lines, then one line per option, "A. text", then "Answer with the option's letter
  from the given choices directly."
- Option extraction, rules only: the one option letter standing alone as a word ("B", "B.", "(B) ...",
  "The answer is B"; two different ones, "A or B", are no answer), else the one option whose text the answer
  equals or, failing that, contains.
  Anything else is wrong. The official evaluator then asks ChatGPT to map the free text to an option; we have
  none, and greedy answers to "answer with the letter" nearly always start with one.
- Circular evaluation (the official protocol): a question with k options is asked k times, the options
  rotated by 0..k-1 places (the right answer's letter moves with them); it counts only when every rotation
  is answered right. The plain single-pass accuracy (rotation 0) is reported too.
Per-category and per-l2-category accuracies are circular."""
from __future__ import annotations

import base64
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .harness import BenchmarkDataError, Item

LETTERS = "ABCD"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
REQUIRED = ("index", "question", "answer", "category", "image")


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise BenchmarkDataError(f"MMBench: {path} is missing; the release's file is MMBench_DEV_EN.tsv "
                                 "(download it from the MMBench site)")
    if path.suffix == ".parquet":
        try:
            import pandas as pd

            df = pd.read_parquet(path)
        except ImportError as e:
            raise BenchmarkDataError(f"MMBench: reading {path} needs pandas with pyarrow ({e}); or pass the TSV") from None
        return [{k: ("" if v is None or v != v else str(v)) for k, v in r.items()} for r in df.to_dict("records")]
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [{k: ("" if v in (None, "nan", "NaN") else v) for k, v in r.items()} for r in rows]


def load_items(data: Path, circular: bool = True) -> list[Item]:
    path = data
    if data.is_dir():
        found = sorted(data.glob("*.tsv")) + sorted(data.glob("*.parquet"))
        if not found:
            raise BenchmarkDataError(f"MMBench: no .tsv in {data}; the release's file is MMBench_DEV_EN.tsv")
        path = found[0]
    rows = _rows(path)
    if rows and (missing := [c for c in REQUIRED if c not in rows[0]]):
        raise BenchmarkDataError(f"{path}: columns {missing} missing (an MMBench TSV has {', '.join(REQUIRED)}, hint, A-D)")
    items = []
    for n, r in enumerate(rows, 2):
        options = [(L, r[L]) for L in LETTERS if r.get(L, "")]
        if len(options) < 2 or r["answer"] not in dict(options):
            raise BenchmarkDataError(f"{path}:{n}: index {r['index']}: needs 2-4 options and an answer among them")
        try:
            image = base64.b64decode(r["image"], validate=True)
        except ValueError:
            raise BenchmarkDataError(f"{path}:{n}: index {r['index']}: the image is not base64") from None
        texts = [t for _, t in options]
        right = texts[LETTERS.index(r["answer"])]
        for rot in range(len(texts) if circular else 1):
            shown = texts[rot:] + texts[:rot]
            lines = ([r["hint"]] if r.get("hint") else []) + [r["question"]]
            lines += [f"{LETTERS[i]}. {t}" for i, t in enumerate(shown)] + [INSTRUCTION]
            items.append(Item(f"{r['index']}/{rot}", image, "\n".join(lines),
                              {"index": r["index"], "rotation": rot, "options": shown,
                               "answer": LETTERS[shown.index(right)], "category": r["category"],
                               "l2": r.get("l2-category", "")}))
    return items


def extract_letter(answer: str, options: list[str]) -> str | None:
    letters = LETTERS[:len(options)]
    a = answer.strip()
    alone = set(re.findall(rf"\b([{letters}])\b", a))
    m = re.match(rf"^\(?([{letters}])(?:[).:\s]|$)", a)
    if m and alone <= {m.group(1)}:  # "B. ..." unless another letter stands alone too ("A or B")
        return m.group(1)
    if len(alone) == 1:
        return alone.pop()
    if alone:
        return None
    low = a.lower().rstrip(".")
    hits = [letters[i] for i, t in enumerate(options) if t.lower() == low]
    if not hits:
        hits = [letters[i] for i, t in enumerate(options) if t.lower() in low]
    return hits[0] if len(hits) == 1 else None


def score(items: list[Item], answers: dict[str, str]) -> dict[str, Any]:
    by_q: dict[str, list[bool]] = defaultdict(list)
    meta: dict[str, dict[str, Any]] = {}
    for it in items:
        ok = extract_letter(answers[it.id], it.meta["options"]) == it.meta["answer"]
        by_q[it.meta["index"]].append(ok)
        if it.meta["rotation"] == 0:
            meta[it.meta["index"]] = it.meta | {"single": ok}
    circ = {q: all(v) for q, v in by_q.items()}

    def per(key: str) -> dict[str, float]:
        groups: dict[str, list[bool]] = defaultdict(list)
        for q, ok in circ.items():
            groups[meta[q][key]].append(ok)
        return {g: 100 * sum(v) / len(v) for g, v in sorted(groups.items())}

    n = len(circ)
    circular = 100 * sum(circ.values()) / n if n else 0.0
    return {"circular": circular, "single_pass": 100 * sum(m["single"] for m in meta.values()) / n if n else 0.0,
            "questions": n, "asked": len(items), "categories": per("category"), "l2_categories": per("l2"),
            "headline": circular}
