"""Paper benchmarks from their own files (januskit.eval: harness, pope, mme, gqa): fixtures written here in
each release's format with images drawn by the world, scores worked out by hand, the official scripts'
quirks, resume after a kill, two ranks, and the CLI on the bundled model."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from januskit.cli import main
from januskit.eval import dpg, geneval, gqa, mmbench, mme, pope
from januskit.eval.harness import (SHORT_ANSWER, BenchmarkDataError, Item, RunOptions, answer_items, known_release,
                                   read_jsonl, write_summary)
from januskit.world.render import render
from januskit.world.scene import random_scene


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    render(random_scene(np.random.default_rng(seed))).save(path)
    return path


# -- POPE ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, verdict", [
    ("Yes", "yes"), ("Yes.", "yes"), ("No", "no"), ("No, there is no dog.", "no"), ("no.", "no"),
    ("There is not a dog in the image.", "no"),
    ("Yes. There is no cat, though.", "yes"),  # only the first sentence counts
    ("Nope", "yes"), ("NO", "yes"), ("not.", "no"), ("No.", "no"),  # whole words, case-sensitive: the official quirk
    ("", "yes"),
])
def test_pope_reads_answers_as_the_official_script(answer, verdict):
    assert pope.to_yes_no(answer) == verdict


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    preds = ["yes", "yes", "no", "no", "yes", "no", "no", "yes"]  # tp 3, fn 1, fp 1, tn 3
    m = pope.metrics(labels, preds)
    assert m["accuracy"] == 6 / 8 and m["precision"] == 3 / 4 and m["recall"] == 3 / 4
    assert m["f1"] == pytest.approx(0.75) and m["yes_ratio"] == 4 / 8 and m["questions"] == 8


def _pope_fixture(tmp_path: Path) -> tuple[Path, Path]:
    data, images = tmp_path / "pope", tmp_path / "val2014"
    data.mkdir()
    for i in range(3):
        _image(images / f"COCO_val2014_{i:012d}.jpg", i)
    labels = {"random": ["yes", "no", "yes", "no"], "popular": ["yes", "yes"], "adversarial": ["no", "no"]}
    for split, labs in labels.items():
        rows = [{"question_id": k + 1, "image": f"COCO_val2014_{k % 3:012d}.jpg", "text": f"Is there a thing {k} in the image?",
                 "label": lab} for k, lab in enumerate(labs)]
        (data / pope.FILES[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, images


def test_pope_items_and_scores_per_file_and_mean(tmp_path):
    data, images = _pope_fixture(tmp_path)
    items = pope.load_items(data, images)
    assert [it.id for it in items][:4] == ["random/1", "random/2", "random/3", "random/4"] and len(items) == 8
    assert items[0].prompt == f"Is there a thing 0 in the image?\n{SHORT_ANSWER}"
    assert pope.load_items(data, images, instruction=None)[0].prompt == "Is there a thing 0 in the image?"
    # random: yes,no,yes,no answered yes,yes,No,no -> tp1 fp1 fn1 tn1; popular: all right; adversarial: one fp
    answers = dict(zip([it.id for it in items], ["Yes", "Yes", "No.", "no", "Yes", "Yes", "Yes", "No"]))
    rep = pope.score(items, answers)
    r, p, a = rep["splits"]["random"], rep["splits"]["popular"], rep["splits"]["adversarial"]
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert (p["accuracy"], p["f1"], p["yes_ratio"]) == (1.0, 1.0, 1.0)
    assert (a["accuracy"], a["precision"], a["f1"], a["yes_ratio"]) == (0.5, 0.0, 0.0, 0.5)
    assert rep["mean"]["accuracy"] == pytest.approx(2 / 3) and rep["headline"] == pytest.approx(100 * 1.5 / 3)


def test_pope_missing_files_and_bad_records_are_named(tmp_path):
    with pytest.raises(BenchmarkDataError, match="coco_pope_random.json.*RUCAIBox/POPE"):
        pope.load_items(tmp_path, tmp_path)
    (tmp_path / "coco_pope_random.json").write_text('{"question_id": 1, "image": "x.jpg", "text": "?"}\n')
    with pytest.raises(BenchmarkDataError, match=r"coco_pope_random.json:1: not a POPE record"):
        pope.load_items(tmp_path, tmp_path)
    (tmp_path / "coco_pope_random.json").write_text('{"question_id": 1, "image": "x.jpg", "text": "?", "label": "yes"}\n')
    with pytest.raises(BenchmarkDataError, match=r"image .*x.jpg is missing .*val2014"):
        pope.load_items(tmp_path, tmp_path)


# -- MME ----------------------------------------------------------------------------------------------

def _mme_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "MME_Benchmark_release_version"
    # side-by-side layout (existence), images/ + questions_answers_YN/ layout (artwork), a cognition subtask
    for k in range(2):
        _image(root / "existence" / f"{k:012d}.png", k)
        (root / "existence" / f"{k:012d}.txt").write_text(
            f"Is there a circle in this image? Please answer yes or no.\tYes\nIs there a cow {k}? Please answer yes or no.\tNo\n")
    _image(root / "artwork" / "images" / "10.jpg", 5)
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10.txt").write_text("Is this by Monet?\tYes\nIs this by Goya?\tNo\n")
    _image(root / "code_reasoning" / "0020.png", 6)
    (root / "code_reasoning" / "0020.txt").write_text("Will it print 3?\tYes\nWill it print 4?\tNo\n")
    (root / "not_a_subtask").mkdir()
    return root


def test_mme_layouts_parsing_and_scores_by_hand(tmp_path):
    root = _mme_fixture(tmp_path)
    items = mme.load_items(root)
    assert [it.id for it in items] == ["existence/000000000000.png/1", "existence/000000000000.png/2",
                                       "existence/000000000001.png/1", "existence/000000000001.png/2",
                                       "artwork/10.jpg/1", "artwork/10.jpg/2", "code_reasoning/0020.png/1",
                                       "code_reasoning/0020.png/2"]
    assert items[0].prompt == "Is there a circle in this image? Please answer yes or no."  # MME: no extra line
    assert mme.parse_answer("Yes") == "yes" and mme.parse_answer("yes, it is") == "yes"
    assert mme.parse_answer("No way") == "no" and mme.parse_answer("Sure, yes") == "other"
    assert mme.parse_answer("nope") == "no"  # first 4 characters contain "no": the official rule
    # existence: image 0 both right, image 1 one wrong -> acc 75, acc+ 50; artwork: "other" -> 50, 0;
    # code_reasoning: both right -> 100, 100
    answers = dict(zip([it.id for it in items], ["Yes", "No", "Yes", "Yes", "Sure", "No", "yes", "no"]))
    rep = mme.score(items, answers)
    assert rep["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4, "images": 2}
    assert rep["subtasks"]["artwork"]["score"] == 50.0 and rep["subtasks"]["code_reasoning"]["score"] == 200.0
    assert rep["perception"] == 175.0 and rep["cognition"] == 200.0 and rep["headline"] == 175.0
    assert rep["complete"] == {"perception": False, "cognition": False}


def test_mme_errors_name_the_file(tmp_path):
    with pytest.raises(BenchmarkDataError, match="no subtask folder.*MME_Benchmark_release_version"):
        mme.load_items(tmp_path)
    (tmp_path / "count").mkdir()
    (tmp_path / "count" / "a.txt").write_text("How many?\tYes\n")
    with pytest.raises(BenchmarkDataError, match=r"count/a.txt has no image a.jpg/.png beside it"):
        mme.load_items(tmp_path)
    _image(tmp_path / "count" / "a.png", 0)
    (tmp_path / "count" / "a.txt").write_text("How many?\tMaybe\n")
    with pytest.raises(BenchmarkDataError, match=r"a.txt:1: not 'question<TAB>Yes\|No'"):
        mme.load_items(tmp_path)


# -- GQA ----------------------------------------------------------------------------------------------

def test_gqa_normalisation_scores_and_official_predictions_file(tmp_path):
    images = tmp_path / "images"
    for k in ("n1", "n2"):
        _image(images / f"{k}.jpg", 3)
    q = {"201": {"imageId": "n1", "question": "What colour is the circle?", "answer": "red", "types": {}},
         "202": {"imageId": "n2", "question": "Is it left?", "answer": "yes"},
         "203": {"imageId": "n1", "question": "Which shape?", "answer": "square"}}
    (tmp_path / gqa.QUESTIONS).write_text(json.dumps(q))
    items = gqa.load_items(tmp_path, images)
    assert [it.id for it in items] == ["201", "202", "203"] and items[1].prompt == f"Is it left?\n{SHORT_ANSWER}"
    rep = gqa.score(items, {"201": " Red.", "202": "Yes", "203": "a square"}, tmp_path)
    assert rep["accuracy"] == pytest.approx(2 / 3) and rep["headline"] == pytest.approx(200 / 3)
    preds = json.loads((tmp_path / "testdev_balanced_predictions.json").read_text())
    assert preds == [{"questionId": "201", "prediction": "red"}, {"questionId": "202", "prediction": "yes"},
                     {"questionId": "203", "prediction": "a square"}]
    with pytest.raises(BenchmarkDataError, match="questions1.2.zip"):
        gqa.load_items(tmp_path / "nowhere", images)


# -- the harness --------------------------------------------------------------------------------------

def _items(n: int) -> list[Item]:
    return [Item(f"q{i}", Path("unused.png"), f"question {i}") for i in range(n)]


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    calls: list[list[str]] = []

    def flaky(chunk):
        calls.append([it.id for it in chunk])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the third batch is in flight
        return [f"answer to {it.id}" for it in chunk]

    opts = RunOptions(out=tmp_path, batch=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        answer_items(flaky, _items(7), opts, "t")
    assert [r["id"] for r in read_jsonl(tmp_path / "answers.rank0.jsonl")] == ["q0", "q1", "q2", "q3"]
    with open(tmp_path / "answers.rank0.jsonl", "a") as fh:
        fh.write('{"id": "q4", "ans')  # a line cut by the kill: dropped, q4 is answered again
    calls.clear()
    got = answer_items(lambda c: [f"answer to {it.id}" for it in c], _items(7), opts, "t")
    assert got == {f"q{i}": f"answer to q{i}" for i in range(7)}
    assert len(read_jsonl(tmp_path / "answers.rank0.jsonl")) == 7


def test_limit_takes_the_first_items(tmp_path):
    got = answer_items(lambda c: [it.prompt for it in c], _items(10), RunOptions(out=tmp_path, limit=3, progress=False), "t")
    assert got == {"q0": "question 0", "q1": "question 1", "q2": "question 2"}


_RANK_SCRIPT = """
import json, sys
from pathlib import Path
from januskit.eval.harness import Item, RunOptions, answer_items
items = [Item(f"q{i}", Path("x.png"), f"question {i}") for i in range(7)]
got = answer_items(lambda c: [it.prompt.upper() for it in c], items, RunOptions(out=Path(sys.argv[1]), batch=2,
                   progress=False), "t")
print(json.dumps(got))
"""


def test_two_ranks_share_the_items_and_rank_zero_merges(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(tmp_path)], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert json.loads(outs[0][0].strip().splitlines()[-1]) == {f"q{i}": f"QUESTION {i}" for i in range(7)}
    assert outs[1][0].strip().splitlines()[-1] == "null"  # rank 1 answers its share, rank 0 scores
    assert [r["id"] for r in read_jsonl(tmp_path / "answers.rank1.jsonl")] == ["q1", "q3", "q5"]


def test_summary_has_the_paper_figure_for_a_known_release(tmp_path):
    assert known_release("/models/Janus-Pro-7B") == "Janus-Pro-7B" and known_release("ckpt/janus_pro_1b") == "Janus-Pro-1B"
    assert known_release("/models/my-finetune") is None
    md = write_summary(tmp_path, "pope", {"x": 1}, 85.0, [("random acc", 0.9)], "Janus-Pro-1B")
    assert "| **headline** | **85.00** | 86.20 |" in md and "paper (Janus-Pro-1B)" in md
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["paper"] == 86.2 and s["headline"] == 85.0 and s["benchmark"] == "pope"


# -- the CLI on the bundled model ---------------------------------------------------------------------

def test_cli_pope_on_the_bundled_model_answers_scores_and_resumes(tmp_path, capsys):
    data, images = _pope_fixture(tmp_path)
    out = tmp_path / "run"
    args = ["eval", "pope", "--data", str(data), "--images", str(images), "--out", str(out), "--limit", "4",
            "--batch", "3", "--json"]
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["benchmark"] == "pope" and s["splits"]["random"]["questions"] == 4 and s["release"] is None
    assert s["settings"]["instruction"] == SHORT_ANSWER and s["settings"]["system_prompt"] == "none"
    answers = read_jsonl(out / "answers.rank0.jsonl")
    assert [a["id"] for a in answers] == ["random/1", "random/2", "random/3", "random/4"]
    assert main(args) == 0  # everything answered: nothing is asked again
    assert len(read_jsonl(out / "answers.rank0.jsonl")) == 4
    with pytest.raises(SystemExit, match="--images is required"):
        main(["eval", "pope", "--data", str(data), "--out", str(out)])
    assert main(["eval", "mme", "--data", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "no subtask folder" in capsys.readouterr().err


# -- MMBench ------------------------------------------------------------------------------------------

def _mmbench_tsv(path: Path) -> Path:
    import base64
    import io

    buf = io.BytesIO()
    render(random_scene(np.random.default_rng(7))).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]
    rows = [["11", "What shape is red?", "A picture of shapes.", "circle", "square", "triangle", "diamond", "B",
             "attribute", "perception", "dev", img],
            ["12", "Is it left?", "nan", "yes", "no", "", "", "A", "spatial", "reasoning", "dev", img]]
    path.write_text("\t".join(cols) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), ("(C) triangle", "C"), ("D: diamond", "D"), ("The answer is A", "A"),
    ("square", "B"), ("It is a triangle.", "C"), ("A or B", None), ("none of them", None), ("E", None),
])
def test_mmbench_option_extraction(answer, letter):
    assert mmbench.extract_letter(answer, ["circle", "square", "triangle", "diamond"]) == letter


def test_mmbench_rotations_prompts_and_circular_score_by_hand(tmp_path):
    items = mmbench.load_items(_mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv"))
    assert [it.id for it in items] == ["11/0", "11/1", "11/2", "11/3", "12/0", "12/1"]
    assert items[0].prompt == ("A picture of shapes.\nWhat shape is red?\nA. circle\nB. square\nC. triangle\n"
                               "D. diamond\nAnswer with the option's letter from the given choices directly.")
    assert items[4].prompt.startswith("Is it left?\nA. yes\nB. no\nAnswer")  # no hint ("nan"), two options
    # rotation r shows texts[r:] + texts[:r]: "square" is at B, A, D, C; "yes" at A, B
    assert [it.meta["answer"] for it in items] == ["B", "A", "D", "C", "A", "B"]
    assert items[1].prompt.split("\n")[2:6] == ["A. square", "B. triangle", "C. diamond", "D. circle"]
    assert isinstance(items[0].image, bytes) and items[0].image[:4] == b"\x89PNG"
    # question 11 right in every rotation; 12 right in rotation 0 only -> circular 50, single pass 100
    answers = {"11/0": "B", "11/1": "A", "11/2": "square", "11/3": "C.", "12/0": "A", "12/1": "A"}
    rep = mmbench.score(items, answers)
    assert (rep["circular"], rep["single_pass"], rep["questions"], rep["asked"]) == (50.0, 100.0, 2, 6)
    assert rep["categories"] == {"attribute": 100.0, "spatial": 0.0} and rep["headline"] == 50.0
    assert [it.id for it in mmbench.load_items(tmp_path, circular=False)] == ["11/0", "12/0"]


def test_mmbench_bad_rows_are_named(tmp_path):
    p = tmp_path / "m.tsv"
    p.write_text("index\tquestion\tA\tB\tanswer\tcategory\timage\n1\tq\tx\ty\tC\tc\taGVsbG8=\n")
    with pytest.raises(BenchmarkDataError, match=r"m.tsv:2: index 1: needs 2-4 options and an answer among them"):
        mmbench.load_items(p)
    p.write_text("index\tquestion\tA\tB\tanswer\n1\tq\tx\ty\tA\n")
    with pytest.raises(BenchmarkDataError, match=r"columns \['category', 'image'\] missing"):
        mmbench.load_items(p)
    with pytest.raises(BenchmarkDataError, match="MMBench_DEV_EN.tsv"):
        mmbench.load_items(tmp_path / "empty-dir-that-is-missing.tsv")


def test_cli_mmbench_on_the_bundled_model(tmp_path, capsys):
    tsv = _mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv")
    assert main(["eval", "mmbench", "--data", str(tsv), "--out", str(tmp_path / "run"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["benchmark"] == "mmbench" and s["questions"] == 2 and s["asked"] == 6
    assert len(read_jsonl(tmp_path / "run" / "answers.rank0.jsonl")) == 6


# -- GenEval ------------------------------------------------------------------------------------------

def _box(label, x1, y1, x2, y2, score=1.0, colour=None):
    return geneval.Box(label, (x1, y1, x2, y2), score, None, colour)


def test_geneval_relative_position_by_box_centres():
    a, b = _box("a", 0, 40, 20, 60), _box("b", 60, 40, 80, 60)  # centres (10, 50) and (70, 50)
    assert geneval.relative_position(a, b) == {"left of"} and geneval.relative_position(b, a) == {"right of"}
    # offset (0, -60) shrunk by 0.1 x (20 + 20) = 4 on each axis -> (0, -56) / 60: above only
    assert geneval.relative_position(_box("a", 0, 0, 20, 20), _box("b", 0, 60, 20, 80)) == {"above"}
    # diagonal (40, 40): shrunk (36, 36) / 56.6 = 0.64 each -> right of and below
    assert geneval.relative_position(_box("a", 40, 40, 60, 60), _box("b", 0, 0, 20, 20)) == {"right of", "below"}
    # centres 3 px apart, boxes 20 wide: the shrink (4) swallows the offset -> no relation
    assert geneval.relative_position(_box("a", 3, 0, 23, 20), _box("b", 0, 0, 20, 20)) == set()


class _Fake:
    def __init__(self, boxes):
        self.boxes = boxes

    def __call__(self, image):
        return self.boxes


def test_geneval_rules_thresholds_counts_colours_positions_excludes():
    img = Image.new("RGB", (100, 100))
    two = {"tag": "two_object", "prompt": "a cat and a dog", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert geneval.judge(img, two, _Fake([_box("cat", 0, 0, 9, 9, 0.5), _box("dog", 50, 50, 60, 60, 0.31)])) == (True, "")
    ok, why = geneval.judge(img, two, _Fake([_box("cat", 0, 0, 9, 9, 0.5), _box("dog", 50, 50, 60, 60, 0.3)]))
    assert not ok and why == "expected dog>=1, found 0"  # 0.3 is not above the threshold
    count = {"tag": "counting", "prompt": "two cats", "include": [{"class": "cat", "count": 2}],
             "exclude": [{"class": "cat", "count": 3}]}
    cats = [_box("cat", 10 * i, 0, 10 * i + 9, 9, s) for i, s in enumerate((0.95, 0.92, 0.85))]
    assert geneval.judge(img, count, _Fake(cats))[0]  # the 0.85 cat is under the counting threshold 0.9
    ok, why = geneval.judge(img, count, _Fake(cats + [_box("cat", 90, 0, 99, 9, 0.99)]))
    assert not ok and why == "expected cat<3, found 3"
    colour = {"tag": "colors", "prompt": "a red cat", "include": [{"class": "cat", "count": 1, "color": "red"}]}
    asked = []

    def classify(image, box, options):
        asked.append(list(options))
        return "blue" if box.box[0] == 0 else "red"
    assert geneval.judge(img, colour, _Fake([_box("cat", 0, 0, 9, 9, 0.9), _box("cat", 20, 0, 29, 9, 0.5)]), classify) == (
        False, "expected red cat>=1, found 0 red")  # only the best cat is looked at
    assert asked == [["red"]]
    assert geneval.judge(img, colour, _Fake([_box("cat", 0, 0, 9, 9, 0.9, colour="red")]))[0]  # the detector's own colour
    with pytest.raises(ValueError, match="colour classifier"):
        geneval.judge(img, colour, _Fake([_box("cat", 0, 0, 9, 9, 0.9)]))
    pos = {"tag": "position", "prompt": "a cat right of a dog",
           "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}]}
    assert geneval.judge(img, pos, _Fake([_box("dog", 0, 40, 20, 60), _box("cat", 60, 40, 80, 60)]))[0]
    ok, why = geneval.judge(img, pos, _Fake([_box("dog", 60, 40, 80, 60), _box("cat", 0, 40, 20, 60)]))
    assert not ok and why == "expected cat right of target"
    ok, why = geneval.judge(img, pos, _Fake([_box("cat", 60, 40, 80, 60)]))
    assert why == "expected dog>=1, found 0\nno target for cat to be right of"
    many = [_box("cat", i, 0, i + 1, 1, 0.5) for i in range(20)]  # at most 16 detections of a class count
    assert not geneval.judge(img, {"tag": "counting", "prompt": "", "include": [{"class": "cat", "count": 17}]},
                             _Fake([geneval.Box(b.label, b.box, 0.95) for b in many]))[0]


def test_geneval_metadata_errors_are_named(tmp_path):
    with pytest.raises(BenchmarkDataError, match="prompts/evaluation_metadata.jsonl"):
        geneval.read_metadata(tmp_path)
    p = tmp_path / "evaluation_metadata.jsonl"
    p.write_text('{"tag": "x", "prompt": "p", "include": [{"class": "cat"}]}\n')
    with pytest.raises(BenchmarkDataError, match=r"evaluation_metadata.jsonl:1: not a GenEval record"):
        geneval.read_metadata(p)
    p.write_text('{"tag": "x", "prompt": "p", "include": [{"class": "cat", "count": 1, "position": ["near", 0]}]}\n')
    with pytest.raises(BenchmarkDataError, match="must be \\[relation, an earlier include\\]"):
        geneval.read_metadata(p)


def test_the_world_judge_as_a_geneval_plug_in_agrees_on_clean_scenes():
    """Clean renders of scenes drawn for the world's test prompts: GenEval's rules through WorldDetector
    accept them as the world's own judge does (the rules differ in detail: GenEval judges only the top-`count`
    objects of a class, and relations by boxes with a 10% margin)."""
    from januskit.eval.world import _first_k, test_split
    from januskit.world.dataset import read_prompts
    from januskit.world.judge import detect, score
    from januskit.world.prompts import scene_for

    prompts = _first_k(read_prompts(test_split(None) / "prompts.jsonl"), lambda r: r[0].category, 8)
    rng = np.random.default_rng(0)
    det, agree, ours = geneval.WorldDetector(), 0, []
    for p, _ in prompts:
        img = render(scene_for(p, rng))
        ok, why = geneval.judge(img, geneval.world_metadata(p), det)
        ours.append(ok)
        agree += ok == score(p, detect(img))
    assert len(prompts) == 48 and sum(ours) >= 46 and agree >= 46, (sum(ours), agree)


def test_geneval_generates_the_official_layout_resumes_and_scores(tmp_path):
    import warnings

    import januskit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = januskit.load("tiny-janus-pro", dtype="float32")
    metas = [{"tag": "single_object", "prompt": "a photo of a circle", "include": [{"class": "circle", "count": 1}]},
             {"tag": "counting", "prompt": "a photo of two squares", "include": [{"class": "square", "count": 2}],
              "exclude": [{"class": "square", "count": 3}]}]
    folders = geneval.generate(pipe, metas, tmp_path, n=2, seed=5, progress=False)
    assert [f.name for f in folders] == ["00000", "00001"]
    assert json.loads((tmp_path / "00001" / "metadata.jsonl").read_text()) == metas[1]
    first = (tmp_path / "00000" / "samples" / "0001.png").read_bytes()
    (tmp_path / "00001" / "samples" / "0001.png").unlink()  # a kill before the last sample of prompt 1
    geneval.generate(pipe, metas, tmp_path, n=2, seed=5, progress=False)
    assert (tmp_path / "00000" / "samples" / "0001.png").read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "00001" / "samples").iterdir()) == ["0000.png", "0001.png"]
    det = _Fake([_box("circle", 0, 0, 9, 9, 0.95)])  # a circle everywhere, never a square
    rep = geneval.score_folder(tmp_path, det)
    assert rep["tags"] == {"counting": 0.0, "single_object": 1.0} and rep["overall"] == 0.5 and rep["images"] == 4
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert rows[0]["filename"] == "00000/samples/0000.png" and rows[2]["reason"] == "expected square>=2, found 0"


def test_cli_geneval_with_the_world_detector_on_the_bundled_model(tmp_path, capsys):
    from januskit.eval.world import _first_k, test_split
    from januskit.world.dataset import read_prompts

    prompts = _first_k(read_prompts(test_split(None) / "prompts.jsonl"), lambda r: r[0].category, 1)
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(geneval.world_metadata(p)) + "\n" for p, _ in prompts))
    out = tmp_path / "gen"
    assert main(["eval", "geneval", "--data", str(meta), "--out", str(out), "-n", "2", "--detector", "world", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["benchmark"] == "geneval" and s["images"] == 12 and set(s["tags"]) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert s["overall"] == pytest.approx(sum(s["tags"].values()) / 6)
    assert sorted(p.name for p in (out / "00005" / "samples").iterdir()) == ["0000.png", "0001.png"]
    with pytest.raises(SystemExit, match="package.module:factory"):
        main(["eval", "geneval", "--data", str(meta), "--out", str(out), "--score-only", "--detector", "nope"])


# -- DPG-Bench ----------------------------------------------------------------------------------------

def _dpg_fixture(root: Path) -> Path:
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "item_a.txt").write_text("A red circle to the left of a blue square.\n")
    (root / "prompts" / "item_b.txt").write_text("A green triangle.\n")
    rows = [("item_a", 1, "0", "entity", "Is there a circle?"), ("item_a", 2, "1", "attribute", "Is the circle red?"),
            ("item_a", 3, "0", "entity", "Is there a square?"), ("item_a", 4, "1,3", "relation",
                                                                  "Is the circle left of the square?"),
            ("item_b", 1, "0", "entity", "Is there a triangle?")]
    with open(root / "dpg_bench.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                    "category_detailed", "tuple", "question_natural_language"])
        for item, pid, dep, cat, q in rows:
            w.writerow([item, "", "", pid, dep, cat, cat, "", q])
    return root


def test_dpg_dependency_rule_and_scores_by_hand(tmp_path):
    prompts = dpg.read_dpg(_dpg_fixture(tmp_path / "dpg"))
    assert [p.item_id for p in prompts] == ["item_a", "item_b"] and prompts[0].questions[3].parents == (1, 3)
    assert prompts[0].text == "A red circle to the left of a blue square."
    imgs = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue", "white")]
    g = dpg.grid(imgs)
    assert g.size == (16, 16) and [t.getpixel((0, 0)) for t in dpg.tiles(g)] == [(255, 0, 0), (0, 128, 0), (0, 0, 255),
                                                                                (255, 255, 255)]
    out = tmp_path / "out"
    out.mkdir()
    g.save(out / "item_a.png")
    g.save(out / "item_b.png")

    def judge(tile, question):  # red tile: no circle but "yes" to everything else; other tiles: all yes but squares
        red = tile.getpixel((0, 0)) == (255, 0, 0)
        return not (red and "circle" in question.split("?")[0].split()[-1]) and not (not red and "square" in question)
    # red tile: q1 no, q2 yes but parent 1 failed -> 0, q3 yes, q4 yes but parent 1 failed -> 0: 1/4
    # other tiles: q1 yes, q2 yes, q3 no, q4 parent 3 failed -> 0: 2/4; item_a = (0.25 + 3 x 0.5) / 4
    assert dpg.score_tile(dpg.tiles(g)[0], prompts[0].questions, judge) == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}
    rep = dpg.score(prompts, out, judge)
    assert rep["items"] == {"item_a": pytest.approx(0.4375), "item_b": 1.0}
    assert rep["overall"] == pytest.approx(100 * (0.4375 + 1.0) / 2)
    # entity: q1 (3/4), q3 (1/4), item_b q1 (1) -> 2/3; attribute q2 3/4; relation q4 0
    assert rep["categories"] == {"attribute": 75.0, "entity": pytest.approx(200 / 3), "relation": 0.0}
    with pytest.raises(BenchmarkDataError, match="dpg_bench.csv"):
        dpg.read_dpg(tmp_path / "nowhere")


def test_cli_dpg_with_the_chat_judge_on_the_bundled_model(tmp_path, capsys):
    data = _dpg_fixture(tmp_path / "dpg")
    out = tmp_path / "grids"
    assert main(["eval", "dpg", "--data", str(data), "--out", str(out), "--judge", "chat", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["benchmark"] == "dpg" and set(s["items"]) == {"item_a", "item_b"} and 0 <= s["overall"] <= 100
    assert Image.open(out / "item_a.png").size == (128, 128)  # 2 x 2 tiles of the default model's 64 px


def test_the_world_test_split_exports_to_geneval_and_pope_files_that_the_harness_runs(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["eval", "world", "--export-benchmarks", str(out)]) == 0
    cmds = capsys.readouterr().out.strip().splitlines()
    metas = geneval.read_metadata(out / "evaluation_metadata.jsonl")
    assert len(metas) == 300 and {m["tag"] for m in metas} == {"single_object", "two_object", "counting", "colors",
                                                             "position", "color_attr"}
    images = Path(cmds[1].split("--images ")[1])
    assert images == out / "world" / "test"  # inside the export folder, so it outlives this process
    items = pope.load_items(out / "coco_pope_random.json", images)
    assert len(items) == 100 and {it.meta["label"] for it in items} == {"yes", "no"}
    assert main(["eval", "pope", "--data", str(out / "coco_pope_random.json"), "--images", str(images), "--out",
                 str(tmp_path / "run"), "--limit", "8", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["splits"]["coco_pope_random"]["questions"] == 8


def test_the_default_worlds_split_is_written_once_a_process_and_removed_when_it_exits():
    code = ("from januskit.eval.world import test_split; a = test_split(None); b = test_split(None); "
            "c = test_split(None, 'val'); print(a, c, a == b, (a / 'prompts.jsonl').is_file(), (c / 'questions.jsonl').is_file())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    test, val, same, *files = r.stdout.split()
    assert same == "True" and files == ["True", "True"] and Path(test).name == "test" and Path(val).name == "val"
    assert not Path(test).parent.exists() and not Path(val).parent.exists()  # nothing left in /tmp


def test_geneval_on_two_ranks_splits_the_prompts_and_rank_zero_scores_them_all(tmp_path):
    metas = [{"tag": "single_object", "prompt": f"a photo of a circle {i}", "include": [{"class": "circle", "count": 1}]}
             for i in range(3)]
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(m) + "\n" for m in metas))
    out = tmp_path / "gen"
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29519", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "januskit.cli", "eval", "geneval", "--model", "tiny-janus-pro", "--data", str(meta),
           "--out", str(out), "-n", "2", "--detector", "world", "--json"]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    s = json.loads(outs[0][0].strip().splitlines()[-1])
    assert s["images"] == 6 and outs[1][0].strip() == ""  # rank 1 generated prompt 1; rank 0 scored all three
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00000", "00001", "00002"]


def test_eval_world_reports_geneval_rules_beside_the_world_judge():
    import januskit
    from januskit.cli import DEFAULT_MODEL
    from januskit.eval.world import EvalSettings, evaluate, format_report
    from januskit.world.judge import OUTCOMES

    rep = evaluate(januskit.load(DEFAULT_MODEL), None, EvalSettings(prompts_per_category=2, questions_per_type=0,
                                                                     images_per_prompt=2))
    g = rep.generation
    assert set(g["geneval_rules"]["categories"]) == set(g["categories"]) and len(g["categories"]) == 6
    assert all(isinstance(r["correct_geneval_rules"], bool) for r in g["records"]) and len(g["records"]) == 24
    mean = sum(g["geneval_rules"]["categories"].values()) / 6
    assert g["geneval_rules"]["overall"] == pytest.approx(mean)
    assert f"by GenEval's own rules (januskit eval geneval --detector world): {mean:.3f}" in format_report(rep)
    # the failure breakdown of position and colour attribution: every such image has one outcome, and the share
    # of "correct" is the category's accuracy
    for cat in ("position", "color_attr"):
        recs = [r for r in g["records"] if r["category"] == cat]
        assert len(recs) == 4 and all(r["outcome"] in OUTCOMES[cat] for r in recs)
        by = g["outcomes"][cat]
        n = {k: sum(r["held_out"] == (k == "held_out") for r in recs) for k in by}
        assert sum(by[k]["correct"] * n[k] for k in by) / 4 == pytest.approx(g["categories"][cat])
        assert all(sum(share.values()) == pytest.approx(1.0) for share in by.values())
        assert f"{cat} outcomes, " in format_report(rep)
    assert all("outcome" not in r for r in g["records"] if r["category"] not in OUTCOMES)


def test_geneval_images_do_not_depend_on_the_batch(tmp_path):
    import januskit

    pipe = januskit.load("tiny-janus-pro", dtype="float32")
    metas = [{"tag": "single_object", "prompt": f"a photo of a circle {i}", "include": [{"class": "circle", "count": 1}]}
             for i in range(3)]
    geneval.generate(pipe, metas, tmp_path / "a", n=2, seed=3, batch=64, progress=False)  # one batch of 6
    geneval.generate(pipe, metas, tmp_path / "b", n=2, seed=3, batch=1, progress=False)  # a prompt at a time
    for i in range(3):
        for k in range(2):
            assert geneval.sample_path(tmp_path / "a", i, k).read_bytes() == geneval.sample_path(tmp_path / "b", i, k).read_bytes()
    assert geneval.sample_path(tmp_path / "a", 0, 0).read_bytes() != geneval.sample_path(tmp_path / "a", 0, 1).read_bytes()


def _world_args(out: Path) -> list[str]:
    return ["eval", "world", "--prompts-per-category", "1", "--images-per-prompt", "2", "--questions-per-type", "2",
            "--out", str(out), "--json"]


def test_eval_world_runs_through_the_harness_resumes_and_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_world_args(out)) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    g, u = first["generation"], first["understanding"]
    assert g["images"] == 12 and [r["image"] for r in g["records"][:2]] == ["00000/samples/0000.png",
                                                                            "00000/samples/0001.png"]
    assert geneval.read_metadata(out / "00005" / "metadata.jsonl")[0]["tag"] == "color_attr"
    answers = read_jsonl(out / "answers.rank0.jsonl")
    assert len(answers) == u["questions"] == 12 and [a["answer"] for a in answers] == [r["model"] for r in u["records"]]
    # a kill that lost one image and the last answers: the rerun makes them again, the same
    geneval.sample_path(out, 3, 1).unlink()
    (out / "answers.rank0.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers[:5]))
    assert main(_world_args(out)) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["generation"]["records"] == g["records"] and again["understanding"]["records"] == u["records"]
    assert main(_world_args(out)[:-1] + ["--seed", "1"]) == 2
    assert "holds a run with settings.seed = 0, this one has 1" in capsys.readouterr().err


def test_eval_world_on_two_ranks_matches_one_process(tmp_path, capsys):
    assert main(_world_args(tmp_path / "one")) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29521", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "januskit.cli"] + _world_args(tmp_path / "two")
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    two = json.loads(outs[0][0].strip().splitlines()[-1])
    assert outs[1][0].strip() == ""  # rank 1 generated and answered its half; rank 0 judged and reported all
    ids = [r["id"] for r in read_jsonl(tmp_path / "one" / "answers.rank0.jsonl")]
    assert [r["id"] for r in read_jsonl(tmp_path / "two" / "answers.rank1.jsonl")] == ids[1::2] and len(ids) == 12
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_dir()) == [f"{i:05d}" for i in range(6)]
    assert two["generation"]["records"] == one["generation"]["records"]
    assert [r["model"] for r in two["understanding"]["records"]] == [r["model"] for r in one["understanding"]["records"]]
    assert two["generation"]["overall"] == one["generation"]["overall"]


def test_dpg_on_two_ranks_splits_the_grids_and_rank_zero_scores_them_all(tmp_path):
    data = _dpg_fixture(tmp_path / "dpg")
    out = tmp_path / "grids"
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29523", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "januskit.cli", "eval", "dpg", "--data", str(data), "--out", str(out), "--judge",
           "chat", "--json"]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    s = json.loads(outs[0][0].strip().splitlines()[-1])
    assert set(s["items"]) == {"item_a", "item_b"} and outs[1][0].strip() == ""
    one = tmp_path / "one"  # item_b (prompt 1) was drawn by rank 1: the same grid one process draws
    assert main(["eval", "dpg", "--data", str(data), "--out", str(one), "--limit", "2", "--json"]) == 0
    assert (one / "item_b.png").read_bytes() == (out / "item_b.png").read_bytes()
