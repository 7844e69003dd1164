"""The stack can learn binding: the default model, trained on a handful of world scenes until it has
memorised them, draws what those captions say and answers those questions (januskit.recipes.overfit).
A failure here points at the plumbing (encoding, masks, CFG rows, positions, sampling), not at a budget."""
from __future__ import annotations

from pathlib import Path

import pytest

from januskit.recipes.overfit import OverfitPlan, overfit

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "januskit" / "assets" / "default-model"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    plan = OverfitPlan(scenes=16, steps=100, images_per_prompt=2, cfg_weights=(1.0,))
    return overfit(DEFAULT_MODEL, tmp_path_factory.mktemp("overfit"), plan)


def test_the_subset_is_memorised(report):
    losses = report["final_losses"]
    assert losses["loss_gen"] < 0.05 and losses["loss_und"] < 0.05, losses


def test_greedy_decoding_reproduces_every_training_image(report):
    # Without guidance, argmax decoding of each training caption gives exactly its image's VQ ids.
    assert report["generation"]["memorised"] == 1.0


def test_sampled_images_satisfy_their_training_captions(report):
    # Sampled at temperature 1: the judge accepts (nearly) all; the VQ round trip alone loses ~4%.
    g = report["generation"]["cfg_weight=1"]
    assert g["images"] == 32
    assert g["overall"] >= 0.9, g["categories"]


def test_training_questions_are_answered(report):
    u = report["understanding"]
    assert u["questions"] == 48
    assert u["accuracy"] >= 0.95, u["types"]
