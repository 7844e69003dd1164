"""End to end in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) opens the
web UI of a live server, generates images (gallery pixels equal to the pipeline's), asks about an
uploaded image (the answer equal to the pipeline's) and edits an uploaded image, by instruction and by
strength (pixels equal to the pipeline's). Screenshots go to test-artifacts/ (or
$JANUSKIT_TEST_ARTIFACTS). Outside CI a machine without chromium skips this; in CI (CI=true) that fails."""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import januskit
from januskit.serving.server import ServerThread
from januskit.world.render import render
from januskit.world.scene import Obj
from conftest import need, skip_or_fail

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("JANUSKIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))

if CHROMIUM is None:
    skip_or_fail("the browser test needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
playwright = need("playwright.sync_api")


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return januskit.load(Path(januskit.__file__).parent / "assets" / "default-model")


@pytest.fixture(scope="module")
def page(pipe):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ServerThread(pipe, model_id="mini", ui=True) as server, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1200, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(server.url + "/ui/")
        pg.get_by_role("tab", name="Chat").wait_for()
        yield pg
        browser.close()


def test_generate_in_the_browser(page, pipe):
    prompt = "a red circle to the left of a blue square"
    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-prompt textarea").fill(prompt)
    page.locator("#gen-button").click()
    thumbs = page.locator("#gallery img")
    thumbs.nth(3).wait_for()  # four images (the UI's default n) with seed 0 and the model's own CFG weight
    page.screenshot(path=str(ARTIFACTS / "ui-generate.png"), full_page=True)
    assert pipe.default_cfg_weight == 2.0  # the default model's generation_config.json, the slider's start
    ref = pipe.generate_images(prompt, n=4, cfg_weight=pipe.default_cfg_weight, seed=0).images
    assert thumbs.count() == 4
    for i in range(4):
        src = thumbs.nth(i).get_attribute("src")
        body = page.request.get(src).body()
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")), np.asarray(ref[i]))


def test_chat_about_an_uploaded_image(page, pipe, tmp_path):
    img = render((Obj("triangle", "green", 1), Obj("circle", "yellow", 2)))
    path = tmp_path / "scene.png"
    img.save(path)
    question = "What is in this image?"
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-input input[type=file]").set_input_files(str(path))
    page.locator("#chat-input textarea").fill(question)
    page.locator("#chat-input textarea").press("Enter")
    want = pipe.chat(question, images=[Image.open(path)], max_new_tokens=128).strip()
    assert want
    bot = page.locator("#chatbot .bot").last
    page.wait_for_function("([sel, text]) => { const els = document.querySelectorAll(sel);"
                           " return els.length && els[els.length - 1].innerText.trim() === text; }",
                           arg=["#chatbot .bot", want])
    page.screenshot(path=str(ARTIFACTS / "ui-chat.png"), full_page=True)
    assert bot.inner_text().strip() == want
    assert page.locator("#chatbot img").count() >= 1  # the uploaded image is shown in the conversation


def gallery_pixels(page, selector: str) -> list[np.ndarray]:
    thumbs = page.locator(f"{selector} img")
    return [np.asarray(Image.open(io.BytesIO(page.request.get(thumbs.nth(i).get_attribute("src")).body()))
                       .convert("RGB")) for i in range(thumbs.count())]


def test_edit_an_uploaded_image(page, pipe, tmp_path):
    img = render((Obj("circle", "red", 0), Obj("square", "blue", 3)))
    path = tmp_path / "source.png"
    img.save(path)
    instruction = "make the circle green"
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-button").click()  # nothing uploaded yet: refused like the API, in a toast
    page.locator(".toast-body", has_text="image: no source image").wait_for()
    page.locator("#edit-sources input[type=file]").set_input_files(str(path))
    page.locator("#edit-sources img").first.wait_for()
    page.locator("#edit-instruction textarea").fill(instruction)
    page.locator("#edit-button").click()
    page.locator("#edit-gallery img").nth(1).wait_for()  # two images (the tab's default n), seed 0, default weights
    page.screenshot(path=str(ARTIFACTS / "ui-edit.png"), full_page=True)
    got = gallery_pixels(page, "#edit-gallery")
    ref = pipe.edit_image(instruction, [path], n=2, seed=0).images
    assert len(got) == 2
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, np.asarray(r))

    # training-free image-to-image: the same upload and text, strength 0.5 (the slider's start)
    before = page.locator("#edit-gallery img").first.get_attribute("src")
    page.locator("#edit-use-strength input[type=checkbox]").check()
    page.locator("#edit-button").click()
    page.wait_for_function("([sel, old]) => { const im = document.querySelector(sel);"
                           " return im && im.getAttribute('src') !== old; }", arg=["#edit-gallery img", before])
    page.locator("#edit-gallery img").nth(1).wait_for()
    got = gallery_pixels(page, "#edit-gallery")
    ref = pipe.image_to_image(instruction, path, strength=0.5, n=2, seed=0).images
    assert len(got) == 2
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, np.asarray(r))
