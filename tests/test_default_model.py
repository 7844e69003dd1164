"""The bundled default model (januskit/assets/default-model, made by `januskit world build`): it is
what `chat` / `generate` use without --model, and a fixed subset of the world's test split must give
exactly the figures it gave when it was shipped, so any change to the model or to decoding fails CI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import januskit
from januskit.cli import DEFAULT_MODEL, main
from januskit.eval.world import EvalSettings, evaluate
from januskit.world.judge import detect, score
from januskit.world.prompts import Prompt
from januskit.world.render import render
from januskit.world.scene import Obj

# The CI subset: the first 8 prompts of each GenEval category x 2 images (96 images), the first 20
# questions of each type (120). Figures measured on the shipped model with exactly these settings
# (`januskit eval world --prompts-per-category 8 --images-per-prompt 2 --questions-per-type 20`):
SUBSET = EvalSettings(images_per_prompt=2, prompts_per_category=8, questions_per_type=20)
# 83 of the 96 images judged correct (the mean of the six category scores, 16 images each, is 83/96 = 0.865),
# 84 of the 100 QA answers (0.840), 19 of the 20 POPE answers (0.950); goals 0.90 / 0.95 (not met).
# The model's own CFG weight (2, generation_config.json) is the default these use.
# Exact: the build is deterministic (this model's rebuild from scratch was byte-identical) and sampling is
# reproducible on this machine kind; a CPU that rounds differently must re-measure these rather than loosen them.
SHIPPED = {"geneval_overall": 83 / 96, "qa_accuracy": 84 / 100, "pope_accuracy": 19 / 20}
SHIPPED_CATEGORIES = {"single_object": 16 / 16, "two_object": 14 / 16, "counting": 13 / 16, "colors": 16 / 16,
                      "position": 13 / 16, "color_attr": 11 / 16}


@pytest.fixture(scope="module")
def report():
    return evaluate(januskit.load(DEFAULT_MODEL), None, SUBSET)


def test_default_model_is_bundled_small_and_in_the_official_layout():
    files = {f.name for f in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "eval.json"} <= files
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size < 40 * 2**20
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert cfg["model_type"] == "multi_modality"


def test_default_model_keeps_its_shipped_figures(report):
    got = {"geneval_overall": report.generation["overall"], "qa_accuracy": report.understanding["accuracy"],
           "pope_accuracy": report.understanding["pope"]["accuracy"]}
    assert got == SHIPPED
    assert report.generation["categories"] == SHIPPED_CATEGORIES


def test_cli_uses_the_default_model(tmp_path, capsys):
    assert main(["generate", "a red circle", "-n", "1", "--seed", "0", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == str(DEFAULT_MODEL) and out["tokens_per_image"] == 64
    assert main(["chat", "--image", out["files"][0], "How many shapes are there?", "--json"]) == 0
    ans = json.loads(capsys.readouterr().out)
    assert ans["answer"] in {"zero", "one", "two", "three", "four"}  # not " two": the space after ":" is dropped


def test_chat_answers_start_at_their_text():
    """The prompt ends with "Assistant:" and the model's first answer token carries the space after it;
    what a user gets (chat, chat_stream's first piece, chat_batch) starts at the answer's text."""
    pipe = januskit.load(DEFAULT_MODEL)
    image = render((Obj("circle", "red", 0), Obj("square", "blue", 3)))
    q = "How many shapes are there?"
    raw = pipe.processor.tokenizer.decode(pipe.chat_ids(q, images=[image], max_new_tokens=8))
    assert raw == " two"  # the token the model emits, space included
    assert pipe.chat(q, images=[image], max_new_tokens=8) == "two"
    pieces = list(pipe.chat_stream(q, images=[image], max_new_tokens=8))
    assert pieces[0] and not pieces[0][0].isspace() and "".join(pieces) == "two"
    answers = pipe.chat_batch([q, "What shape is the red object?", "What colour is the circle?"], [[image]] * 3,
                              max_new_tokens=8)
    assert answers == ["two", "circle", "red"]


README_PROMPT = Prompt("color_position", "a red circle to the left of a blue square", (("red", "circle"), ("blue", "square")),
                       relation="left of")
# Images of the README's main command the judge passes on the shipped model: 3 of 4 (image 1 draws a red diamond
# for the circle). Step 7's bar is 2, Step 8's 4: not reached yet.
README_CORRECT = 3


def test_readme_main_command_draws_what_it_asks(tmp_path, capsys):
    """The README's main command, exactly (prompt, -n 4, --seed 0): how many of its 4 images show a red
    circle to the left of a blue square, exactly as measured (Step 7's bar: at least 2; 4 is Step 8's)."""
    assert main(["generate", README_PROMPT.text, "-n", "4", "--seed", "0", "--out", str(tmp_path), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    verdicts = [score(README_PROMPT, detect(np.asarray(Image.open(f).convert("RGB")))) for f in files]
    assert len(verdicts) == 4 and sum(verdicts) == README_CORRECT


def test_eval_world_can_skip_either_half(capsys):
    """`--prompts-per-category 0` scores understanding only, `--questions-per-type 0` generation only."""
    assert main(["eval", "world", "--prompts-per-category", "0", "--questions-per-type", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["generation"] == {} and rep["understanding"]["questions"] == 12
    assert main(["eval", "world", "--prompts-per-category", "1", "--images-per-prompt", "1",
                 "--questions-per-type", "0"]) == 0
    out = capsys.readouterr().out
    assert "GenEval-style generation (6 prompts x 1 images" in out and "Understanding" not in out
