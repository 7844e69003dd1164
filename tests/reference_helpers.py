"""Independent recomputations that several test files compare library results against."""
from __future__ import annotations

from typing import Any

import numpy as np

from januskit.processing.chat import Message
from januskit.processing.tokenizer import IMAGE_TOKEN
from januskit.world.questions import QTYPES, normalise
from test_pipeline import ref_text_greedy


def greedy_answer(pipe, prompt: str, max_new_tokens: int, images=()) -> str:
    """What pipe.chat(prompt, images) must answer at temperature 0: the greedy ids recomputed over the
    whole sequence every step (no cache, no batch), decoded without the stop token and without the
    leading whitespace the first token carries after "Assistant:"."""
    text = "".join(f"{IMAGE_TOKEN}\n" for _ in images) + prompt
    tok = pipe.processor.tokenizer
    ids = ref_text_greedy(pipe, [Message("user", text, list(images))], max_new_tokens)
    return tok.decode([t for t in ids if t != tok.eos_id]).lstrip()


def check_world_figures(generation: dict[str, Any] | None, understanding: dict[str, Any] | None) -> None:
    """A world-eval report's figures recomputed from its per-item records: GenEval's overall is the mean
    of the per-category accuracies; understanding accuracy is the share of (non-describe) answers equal to
    the truth after normalisation, each record's `correct` included."""
    if generation is not None:
        recs = generation["records"]
        cats = {c: float(np.mean([r["correct"] for r in recs if r["category"] == c]))
                for c in dict.fromkeys(r["category"] for r in recs)}
        assert generation["categories"] == cats
        assert generation["overall"] == float(np.mean(list(cats.values())))
    if understanding is not None:
        recs = understanding["records"]
        assert [r["correct"] for r in recs] == [normalise(r["model"]) == normalise(r["answer"]) for r in recs]
        assert understanding["accuracy"] == float(np.mean([r["correct"] for r in recs if r["qtype"] in QTYPES]))
