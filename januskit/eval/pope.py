"""POPE (Li et al. 2023): yes/no object-hallucination questions on COCO val2014 images, three files
(random, popular, adversarial) of JSON lines `{"question_id", "image", "text", "label"}`.

Scored as the official evaluate.py (and LLaVA's eval_pope.py) do: only the answer's first sentence
(text before the first "."), commas removed, split on spaces; it counts as "no" if one of those words is
exactly "No", "not" or "no", otherwise as "yes" (so "Nope" or "NO" are yes: a quirk kept for
comparability). "yes" is the positive class."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .harness import SHORT_ANSWER, BenchmarkDataError, Item

SPLITS = ("random", "popular", "adversarial")
FILES = {s: f"coco_pope_{s}.json" for s in SPLITS}


def find_files(data: Path) -> dict[str, Path]:
    """The three POPE files in `data` (a folder), named as the release names them."""
    if data.is_file():
        return {data.stem: data}
    found = {s: data / f for s, f in FILES.items() if (data / f).is_file()}
    if not found:
        raise BenchmarkDataError(f"POPE: none of {', '.join(FILES.values())} in {data}; the release ships them in "
                                 "output/coco/ of github.com/RUCAIBox/POPE; put them in this folder")
    return found


def load_items(data: Path, images: Path, instruction: str | None = SHORT_ANSWER) -> list[Item]:
    items = []
    for split, path in find_files(data).items():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                qid, image, text, label = r["question_id"], r["image"], r["text"], r["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise BenchmarkDataError(f"{path}:{n}: not a POPE record with question_id, image, text, label ({e})") from None
            if label not in ("yes", "no"):
                raise BenchmarkDataError(f"{path}:{n}: label {label!r} is not 'yes' or 'no'")
            img = images / image
            if not img.is_file():
                raise BenchmarkDataError(f"{path}:{n}: image {img} is missing (POPE uses COCO val2014 images: "
                                         "pass --images with the val2014 folder)")
            prompt = text if not instruction else f"{text}\n{instruction}"
            items.append(Item(f"{split}/{qid}", img, prompt, {"split": split, "label": label}))
    return items


def to_yes_no(answer: str) -> str:
    """The official rule: "no" if the first sentence has the word No, not or no; else "yes"."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def metrics(labels: list[str], preds: list[str]) -> dict[str, float]:
    tp = sum(p == "yes" and lab == "yes" for p, lab in zip(preds, labels))
    fp = sum(p == "yes" and lab == "no" for p, lab in zip(preds, labels))
    tn = sum(p == "no" and lab == "no" for p, lab in zip(preds, labels))
    fn = sum(p == "no" and lab == "yes" for p, lab in zip(preds, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "questions": n}


def score(items: list[Item], answers: dict[str, str]) -> dict[str, Any]:
    """Per file and the mean over files (the figure the papers report: mean F1 over the three, x100)."""
    per: dict[str, Any] = {}
    for split in dict.fromkeys(it.meta["split"] for it in items):
        mine = [it for it in items if it.meta["split"] == split]
        per[split] = metrics([it.meta["label"] for it in mine], [to_yes_no(answers[it.id]) for it in mine])
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {k: sum(m[k] for m in per.values()) / len(per) for k in keys}
    return {"splits": per, "mean": mean, "headline": 100 * mean["f1"]}
