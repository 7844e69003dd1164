"""GQA (Hudson & Manning 2019), the balanced test-dev split the papers report: `testdev_balanced_questions.json`
maps a question id to `{"imageId", "question", "answer", ...}`; images are `<imageId>.jpg` in the release's
`images/` folder.

Scored by exact match after the normalisation LLaVA's convert_gqa_for_eval.py applies before the official
eval.py (answer stripped of trailing "." and lower-cased; we also strip surrounding spaces, which the
model's detokenised text can carry). The predictions are also written as the official
`[{"questionId", "prediction"}]` file (`testdev_balanced_predictions.json`), for GQA's own eval.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .harness import SHORT_ANSWER, BenchmarkDataError, Item

QUESTIONS = "testdev_balanced_questions.json"


def load_items(data: Path, images: Path, instruction: str | None = SHORT_ANSWER) -> list[Item]:
    path = data / QUESTIONS if data.is_dir() else data
    if not path.is_file():
        raise BenchmarkDataError(f"GQA: {path} is missing; the release's questions1.2.zip has {QUESTIONS}")
    try:
        questions = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{path}: not JSON ({e})") from None
    if not isinstance(questions, dict):
        raise BenchmarkDataError(f"{path}: expected an object of question id -> question")
    items = []
    for qid, q in questions.items():
        try:
            image, question, answer = q["imageId"], q["question"], q["answer"]
        except (KeyError, TypeError):
            raise BenchmarkDataError(f"{path}: question {qid} lacks imageId, question or answer") from None
        img = images / f"{image}.jpg"
        if not img.is_file():
            raise BenchmarkDataError(f"GQA: image {img} is missing (the release's images.zip; pass --images)")
        prompt = question if not instruction else f"{question}\n{instruction}"
        items.append(Item(str(qid), img, prompt, {"answer": answer}))
    return items


def normalise(answer: str) -> str:
    return answer.strip().rstrip(".").lower()


def score(items: list[Item], answers: dict[str, str], out: Path | None = None) -> dict[str, Any]:
    preds = [{"questionId": it.id, "prediction": normalise(answers[it.id])} for it in items]
    if out is not None:
        (out / "testdev_balanced_predictions.json").write_text(json.dumps(preds))
    correct = sum(p["prediction"] == it.meta["answer"] for p, it in zip(preds, items))
    acc = correct / len(items) if items else 0.0
    return {"accuracy": acc, "questions": len(items), "headline": 100 * acc}
