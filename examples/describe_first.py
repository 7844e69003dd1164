"""Does a world model use its own scene description? QA on the test split asked two ways: plainly, and as the
second turn of a conversation whose first turn is "What is in this image?" answered by the model itself
(docs/miniature-world.md, the b2 build).

    python examples/describe_first.py januskit/assets/default-model 40    # 40 questions of each type
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

import januskit
from januskit.eval.world import normalise, test_split
from januskit.processing.chat import Message
from januskit.processing.image import load_image

DESCRIBE = "What is in this image?"


def main(model: str, per_type: int) -> None:
    pipe = januskit.load(model)
    split = test_split(None)
    rows, seen = [], defaultdict(int)
    for line in (split / "questions.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["qtype"] != "describe" and seen[r["qtype"]] < per_type:
            seen[r["qtype"]] += 1
            rows.append(r)
    images = [[load_image(split / r["image"])] for r in rows]
    plain = pipe.chat_batch([r["question"] for r in rows], images, max_new_tokens=8)
    described = pipe.chat_batch([DESCRIBE] * len(rows), images, max_new_tokens=96)
    convs = [[Message("user", f"<image_placeholder>\n{DESCRIBE}", im), Message("assistant", d),
              Message("user", r["question"])] for r, im, d in zip(rows, images, described)]
    after = pipe.chat_batch(convs, max_new_tokens=8)
    score: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # questions, right plainly, right after describing
    for r, a, b in zip(rows, plain, after):
        s = score[r["qtype"]]
        s[0] += 1
        s[1] += normalise(a) == normalise(r["answer"])
        s[2] += normalise(b) == normalise(r["answer"])
    for t, (n, a, b) in score.items():
        print(f"{t:10s} {n:4d} questions  plain {a / n:.3f}  after describing {b / n:.3f}")
    n = sum(s[0] for s in score.values())
    print(f"{'all':10s} {n:4d} questions  plain {sum(s[1] for s in score.values()) / n:.3f}  "
          f"after describing {sum(s[2] for s in score.values()) / n:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
