"""MME (Fu et al. 2023): 14 subtasks of yes/no questions, two per image (one true "Yes", one "No").

The release (MME_Benchmark_release_version) has one folder per subtask: either `images/` with
`questions_answers_YN/<image stem>.txt` beside it, or each image with its `<stem>.txt` side by side.
A .txt holds `question<TAB>Yes|No` lines. Scored as the official eval_tool/calculation.py does:
- the answer is lower-cased; "yes" / "no" as they are, otherwise "yes" if its first 4 characters contain
  "yes", else "no" if they contain "no", else "other" (always wrong);
- per subtask, acc = correct questions / questions and acc+ = images with both questions right / images,
  both x100; the subtask's score is acc + acc+ (max 200);
- perception = the sum over its 10 subtasks (max 2000; the papers' "MME-P"), cognition over 4 (max 800)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .harness import BenchmarkDataError, Item

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXT = (".jpg", ".jpeg", ".png")


def _pairs(sub: Path) -> list[tuple[Path, Path]]:
    """(image, questions .txt) of a subtask folder, in name order, in either release layout."""
    if (sub / "images").is_dir() and (sub / "questions_answers_YN").is_dir():
        out = []
        for txt in sorted((sub / "questions_answers_YN").glob("*.txt")):
            img = next((p for e in IMAGE_EXT if (p := sub / "images" / (txt.stem + e)).is_file()), None)
            if img is None:
                raise BenchmarkDataError(f"MME: {txt} has no image {txt.stem}.jpg/.png in {sub / 'images'}")
            out.append((img, txt))
        return out
    out = []
    for txt in sorted(sub.glob("*.txt")):
        img = next((sub / (txt.stem + e) for e in IMAGE_EXT if (sub / (txt.stem + e)).is_file()), None)
        if img is None:
            raise BenchmarkDataError(f"MME: {txt} has no image {txt.stem}.jpg/.png beside it")
        out.append((img, txt))
    return out


def load_items(data: Path, instruction: str | None = None) -> list[Item]:
    """Every subtask folder of `data` that MME names (others are ignored). MME's questions already end
    with "Please answer yes or no."; `instruction`, if given, is appended on a new line."""
    subs = [data / s for s in (*PERCEPTION, *COGNITION) if (data / s).is_dir()]
    if not subs:
        raise BenchmarkDataError(f"MME: no subtask folder ({', '.join(PERCEPTION[:3])}, ...) in {data}; pass the "
                                 "MME_Benchmark_release_version folder of the official release")
    items = []
    for sub in subs:
        for img, txt in _pairs(sub):
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2 or parts[1].strip() not in ("Yes", "No"):
                    raise BenchmarkDataError(f"{txt}:{n}: not 'question<TAB>Yes|No'")
                q, gt = parts[0].strip(), parts[1].strip()
                prompt = q if not instruction else f"{q}\n{instruction}"
                items.append(Item(f"{sub.name}/{img.name}/{n}", img, prompt,
                                  {"subtask": sub.name, "image": img.name, "gt": gt.lower()}))
    return items


def parse_answer(answer: str) -> str:
    a = answer.lower()
    if a in ("yes", "no"):
        return a
    head = a[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score(items: list[Item], answers: dict[str, str]) -> dict[str, Any]:
    by_sub: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for it in items:
        by_sub[it.meta["subtask"]][it.meta["image"]].append(parse_answer(answers[it.id]) == it.meta["gt"])
    subtasks = {}
    for sub, images in by_sub.items():
        flat = [c for cs in images.values() for c in cs]
        acc = 100 * sum(flat) / len(flat)
        acc_plus = 100 * sum(all(cs) for cs in images.values()) / len(images)
        subtasks[sub] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(flat),
                         "images": len(images)}
    perception = sum(v["score"] for k, v in subtasks.items() if k in PERCEPTION)
    cognition = sum(v["score"] for k, v in subtasks.items() if k in COGNITION)
    complete = {"perception": all(s in subtasks for s in PERCEPTION), "cognition": all(s in subtasks for s in COGNITION)}
    return {"subtasks": subtasks, "perception": perception, "cognition": cognition, "headline": perception,
            "complete": complete}
