"""The HTTP API against a live server on 127.0.0.1, driven by the official `openai` client: chat with
an image (equal to the pipeline's answer), streaming, image generation and image edits (pixel-equal to
the pipeline), batching of concurrent requests (each equal to the same request alone), and the refusals:
bad image, bad field, oversize body, queue full, timeout, a client that disconnects."""
from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

import januskit
from januskit.checkpoint.init import init_checkpoint
from januskit.serving.engine import Limits
from januskit.serving.server import ServerThread
from januskit.world.render import render
from januskit.world.scene import Obj

DEFAULT = Path(januskit.__file__).parent / "assets" / "default-model"
LIMITS = Limits(max_queue=4, max_batch_images=8, max_n=4, max_tokens=64, max_body_bytes=2 * 2**20, timeout_s=120)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return januskit.load(DEFAULT)


@pytest.fixture(scope="module")
def server(pipe):
    with ServerThread(pipe, model_id="mini", limits=LIMITS) as s:
        yield s


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_file(img: Image.Image, name: str = "source.png") -> tuple[str, bytes, str]:
    """An upload as the openai client takes it: (filename, bytes, content type)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return name, buf.getvalue(), "image/png"


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def scene_image() -> Image.Image:
    return render((Obj("circle", "red", 0), Obj("square", "blue", 3)))


def ask(url: str, text: str = "What is in this image?") -> list[dict]:
    # question, then image: the parts' order is the prompt's, and the default model learnt the question first
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def wait_for(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


# -- the happy paths ------------------------------------------------------------------------------

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["mini"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["arch"] == "janus" and h["max_queue"] == 4


def test_chat_with_image_equals_pipeline(client, pipe, scene_image):
    r = client.chat.completions.create(model="mini", messages=ask(png_url(scene_image)), seed=0)
    want = pipe.chat("What is in this image?", images=[scene_image], max_new_tokens=64)
    assert r.choices[0].message.content == want
    assert want.strip()  # the model does answer
    assert r.choices[0].finish_reason == "stop"
    ids = pipe.processor.encode_chat(pipe.processor.user_turn("What is in this image?", [scene_image])).ids
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(pipe.chat_ids("What is in this image?", images=[scene_image],
                                                           max_new_tokens=64))


def test_streaming_equals_non_streaming_and_pipeline(client, pipe, scene_image):
    kw = dict(model="mini", messages=ask(png_url(scene_image), "What colour is the circle?"), temperature=0.9,
              seed=11, max_tokens=20)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole == pipe.chat("What colour is the circle?", images=[scene_image], temperature=0.9, seed=11,
                                      max_new_tokens=20)
    assert chunks[0].choices[0].delta.role == "assistant"
    # the answer starts at its text, not at the space its first token carries after "Assistant:"
    first = next(c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content)
    assert whole and not whole[0].isspace() and not first[0].isspace()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_max_tokens_gives_length(client):
    r = client.chat.completions.create(model="mini", messages=[{"role": "user", "content": "describe a scene"}],
                                       max_tokens=2, temperature=1.0, seed=1)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_image_generation_equals_pipeline(client, pipe):
    prompt = "a red circle to the left of a blue square"
    r = client.images.generate(model="mini", prompt=prompt, n=2, response_format="b64_json",
                               extra_body={"seed": 3, "guidance": 4.0})  # cfg_weight's older name
    assert len(r.data) == 2
    ref = pipe.generate_images(prompt, n=2, cfg_weight=4.0, seed=3)
    for d, im in zip(r.data, ref.images):
        got = decode(d.b64_json)
        assert got.shape == (64, 64, 3)
        np.testing.assert_array_equal(got, np.asarray(im))
    assert not np.array_equal(decode(r.data[0].b64_json), decode(r.data[1].b64_json))


@pytest.fixture(scope="module")
def other_image() -> Image.Image:
    return render((Obj("triangle", "green", 1), Obj("circle", "yellow", 2)))


def test_image_edit_equals_pipeline(client, pipe, scene_image):
    instruction = "make the circle green"
    r = client.images.edit(model="mini", image=png_file(scene_image), prompt=instruction, n=2, response_format="b64_json",
                           extra_body={"seed": 3})
    assert len(r.data) == 2 and r.model_extra["seed"] == 3
    ref = pipe.edit_image(instruction, [scene_image], n=2, seed=3)  # cfg_text: the model's own, cfg_image 1.5
    for d, im in zip(r.data, ref.images):
        got = decode(d.b64_json)
        assert got.shape == (64, 64, 3)
        np.testing.assert_array_equal(got, np.asarray(im))
    assert not np.array_equal(decode(r.data[0].b64_json), decode(r.data[1].b64_json))
    again = client.images.edit(model="mini", image=png_file(scene_image), prompt=instruction, n=2, extra_body={"seed": 3})
    assert [d.b64_json for d in again.data] == [d.b64_json for d in r.data]  # same seed: the same PNG bytes
    other = client.images.edit(model="mini", image=png_file(scene_image), prompt=instruction, n=1, extra_body={"seed": 4})
    assert not np.array_equal(decode(other.data[0].b64_json), decode(r.data[0].b64_json))


def test_image_edit_of_several_images_with_weights_equals_pipeline(client, pipe, scene_image, other_image):
    instruction = "put the triangle of the second image in the first"
    # a list of files goes as repeated `image[]` fields; cfg_text is cfg_weight's other name
    r = client.images.edit(model="mini", image=[png_file(scene_image), png_file(other_image, "b.png")],
                           prompt=instruction, n=1, extra_body={"seed": 5, "cfg_text": 3.5, "cfg_image": 2.0,
                                                                "temperature": 0.8})
    ref = pipe.edit_image(instruction, [scene_image, other_image], n=1, seed=5, cfg_text=3.5, cfg_image=2.0,
                          temperature=0.8)
    np.testing.assert_array_equal(decode(r.data[0].b64_json), np.asarray(ref.images[0]))


def test_image_to_image_with_strength_equals_pipeline(client, pipe, scene_image):
    prompt = "a green circle to the left of a blue square"
    r = client.images.edit(model="mini", image=png_file(scene_image), prompt=prompt, n=2,
                           extra_body={"seed": 2, "strength": 0.5, "cfg_weight": 3.0})
    ref = pipe.image_to_image(prompt, scene_image, strength=0.5, n=2, seed=2, cfg_weight=3.0)
    assert len(r.data) == 2
    for d, im in zip(r.data, ref.images):
        np.testing.assert_array_equal(decode(d.b64_json), np.asarray(im))
    # Janus keeps the source's top rows of VQ tokens: strength 0.5 keeps half of them
    assert ref.info["kept_tokens"] == 32
    assert not np.array_equal(decode(r.data[0].b64_json), decode(r.data[1].b64_json))


# -- batching ---------------------------------------------------------------------------------------

def _concurrently(fns):
    out, errs = [None] * len(fns), []

    def run(i, f):
        try:
            out[i] = f()
        except Exception as e:  # noqa: BLE001 - reported below
            errs.append(e)

    ts = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(fns)]
    for t in ts:
        t.start()
    return ts, out, errs


def test_concurrent_image_requests_share_one_batch_and_equal_alone(client, server, pipe):
    reqs = [("a green triangle", 1, 5.0, 2), ("two yellow squares above a red circle", 7, 3.0, 1),
            ("a blue circle", 9, 5.0, 1)]
    with server.engine.paused():
        ts, out, errs = _concurrently([
            lambda p=p, s=s, g=g, n=n: client.images.generate(model="mini", prompt=p, n=n,
                                                              extra_body={"seed": s, "cfg_weight": g})
            for p, s, g, n in reqs])
        wait_for(lambda: server.engine.waiting == 3)
    for t in ts:
        t.join(60)
    assert not errs
    assert server.engine.batches[-1] == ("image", 3, 4)  # three requests, four images, one batch
    for (p, s, g, n), r in zip(reqs, out):
        ref = pipe.generate_images(p, n=n, cfg_weight=g, seed=s)
        for d, im in zip(r.data, ref.images, strict=True):
            np.testing.assert_array_equal(decode(d.b64_json), np.asarray(im))


def test_concurrent_edits_share_one_batch_and_equal_alone(client, server, pipe, scene_image, other_image):
    """Edits of different instructions, sources (one or two), seeds and weights decode together; a
    generation and an image-to-image request waiting beside them do not join (their rows differ)."""
    reqs = [("make the circle green", [scene_image], 1, 5.0, 1.5, 2),
            ("swap the shapes of the two images", [scene_image, other_image], 9, 4.0, 1.0, 1)]
    with server.engine.paused():
        ts, out, errs = _concurrently([
            lambda p=p, im=im, s=s, g=g, gi=gi, n=n: client.images.edit(
                model="mini", prompt=p, image=[png_file(x) for x in im], n=n,
                extra_body={"seed": s, "cfg_weight": g, "cfg_image": gi})
            for p, im, s, g, gi, n in reqs] + [
            lambda: client.images.generate(model="mini", prompt="a blue circle", extra_body={"seed": 1}),
            lambda: client.images.edit(model="mini", prompt="a red square", image=png_file(scene_image),
                                       extra_body={"seed": 1, "strength": 0.75})])
        wait_for(lambda: server.engine.waiting == 4)  # the queue's limit here
    for t in ts:
        t.join(60)
    assert not errs
    # (in the order the requests arrived, which the threads do not fix)
    assert sorted(list(server.engine.batches)[-3:]) == [("edit", 2, 3), ("image", 1, 1), ("image-to-image", 1, 1)]
    for (p, im, s, g, gi, n), r in zip(reqs, out):
        ref = pipe.edit_image(p, im, n=n, seed=s, cfg_text=g, cfg_image=gi)
        for d, want in zip(r.data, ref.images, strict=True):
            np.testing.assert_array_equal(decode(d.b64_json), np.asarray(want))
    np.testing.assert_array_equal(decode(out[3].data[0].b64_json),
                                  np.asarray(pipe.image_to_image("a red square", scene_image, strength=0.75, seed=1)
                                             .images[0]))


def test_concurrent_chats_share_one_batch_and_equal_alone(client, server, pipe, scene_image):
    qs = [("What is in this image?", 0), ("How many shapes are there?", 4), ("What colour is the square?", 8)]
    with server.engine.paused():
        ts, out, errs = _concurrently([
            lambda q=q, s=s: client.chat.completions.create(model="mini", messages=ask(png_url(scene_image), q),
                                                            temperature=0.7, seed=s, max_tokens=24)
            for q, s in qs])
        wait_for(lambda: server.engine.waiting == 3)
    for t in ts:
        t.join(60)
    assert not errs
    assert server.engine.batches[-1] == ("chat", 3, 3)
    for (q, s), r in zip(qs, out):
        assert r.choices[0].message.content == pipe.chat(q, images=[scene_image], temperature=0.7, seed=s,
                                                         max_new_tokens=24)


# -- refusals ---------------------------------------------------------------------------------------

def test_bad_image_is_400_naming_the_field(client, scene_image):
    where = "messages[0].content[1].image_url.url"
    cases = [("data:image/png;base64,bm90IGFuIGltYWdl", "not a readable image", "invalid_image"),
             ("data:image/png;base64,@@@", "not valid base64", "invalid_image"),
             ("https://example.com/cat.png", "remote URLs and file paths are refused", "invalid_image_url"),
             ("/etc/passwd", "remote URLs and file paths are refused", "invalid_image_url"),
             ("data:text/plain;base64,aGk=", "expected 'data:image/<type>;base64,<data>'", "invalid_image_url")]
    for url, words, code in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="mini", messages=ask(url))
        err = e.value.body
        assert e.value.status_code == 400 and err["param"] == where and err["code"] == code, url
        assert words in err["message"], (url, err["message"])


def test_image_over_the_pixel_limit_is_refused(client):
    huge = Image.new("RGB", (4097, 4096), (0, 0, 0))  # one column over 4096 x 4096; compresses to a few KB
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mini", messages=ask(png_url(huge)))
    assert e.value.body["code"] == "image_too_large"
    assert "4097x4096 = 16781312 pixels, over the limit of 16777216" in e.value.body["message"]


@pytest.mark.parametrize("kw, param, words", [
    (dict(temperature=-1), "temperature", "greater than or equal to 0"),
    (dict(top_p=1.5), "top_p", "less than or equal to 1"),
    (dict(max_tokens=1000), "max_tokens", "1000 is over this server's limit of 64"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate", "unknown or unsupported field"),
    (dict(n=2), "n", "Input should be 1"),
])
def test_bad_chat_field_is_400_naming_it(client, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mini", messages=[{"role": "user", "content": "hi"}], **kw)
    assert e.value.body["param"] == param and words in e.value.body["message"]


@pytest.mark.parametrize("messages, param, words", [
    ([{"role": "assistant", "content": "hi"}], "messages[0].role", "the last message must be the user's"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages", "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "messages[1].role", "a system message must come before"),
    ([{"role": "user", "content": "the <image_placeholder> token"}], "messages[0].content", "reserved string"),
    ([{"role": "user", "content": "shape " * 2000}], "messages", "the model's context is"),
    ([{"role": "tool", "content": "x"}], "messages[0].role", "Input should be"),
])
def test_bad_conversation_is_400(client, messages, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mini", messages=messages)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


@pytest.mark.parametrize("kw, param, words", [
    (dict(n=5), "n", "5 is over this server's limit of 4"),
    (dict(n=0), "n", "greater than or equal to 1"),
    (dict(size="1024x1024"), "size", "makes 64x64 images only"),
    (dict(response_format="url"), "response_format", "Input should be 'b64_json'"),
    (dict(extra_body={"steps": 10}), "steps", "only JanusFlow"),
    (dict(extra_body={"cfg_weight": -1}), "cfg_weight", "greater than or equal to 0"),
    (dict(extra_body={"guidance": -1}), "guidance", "greater than or equal to 0"),  # cfg_weight's older name
    (dict(extra_body={"guidance": 1, "cfg_weight": 2}), "guidance", "unknown or unsupported field"),  # one of them
    (dict(extra_body={"seed": "abc"}), "seed", "valid integer"),
])
def test_bad_image_field_is_400_naming_it(client, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="mini", prompt="a red circle", **kw)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


@pytest.mark.parametrize("kw, param, words", [
    (dict(n=5), "n", "5 is over this server's limit of 4"),
    (dict(n=0), "n", "greater than or equal to 1"),
    (dict(size="1024x1024"), "size", "makes 64x64 images only"),
    (dict(response_format="url"), "response_format", "Input should be 'b64_json'"),
    (dict(extra_body={"steps": 10}), "steps", "only JanusFlow"),
    (dict(extra_body={"cfg_image": -1}), "cfg_image", "greater than or equal to 0"),
    (dict(extra_body={"cfg_text": 1, "cfg_weight": 2}), "cfg_text", "unknown or unsupported field"),  # one of them
    (dict(extra_body={"strength": 0}), "strength", "greater than 0"),
    (dict(extra_body={"strength": 2}), "strength", "less than or equal to 1"),
    (dict(extra_body={"strength": "abc"}), "strength", "valid number"),
    (dict(extra_body={"strength": 0.5, "cfg_image": 2}), "cfg_image", "image guidance is for edits by instruction"),
    (dict(extra_body={"seed": "abc"}), "seed", "valid integer"),
    (dict(extra_body={"guidance": 2}), "guidance", "unknown or unsupported field"),
    (dict(prompt=""), "prompt", "at least 1 character"),
    (dict(prompt="   "), "prompt", "prompt: empty"),
    (dict(mask=("mask.png", b"\x89PNG", "image/png")), "mask", "inpainting masks are not supported"),
])
def test_bad_edit_field_is_400_naming_it(client, scene_image, kw, param, words):
    kw = {"prompt": "make it green", **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(model="mini", image=png_file(scene_image), **kw)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-3", prompt="a red circle")
    assert e.value.body["code"] == "model_not_found" and "'dall-e-3' is not served here" in e.value.body["message"]


def test_invalid_json_and_unknown_route(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_oversize_request_is_413(client, server):
    blob = "data:image/png;base64," + "A" * (3 * 2**20)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="mini", messages=ask(blob))
    assert e.value.status_code == 413
    assert "over the limit of 2097152" in e.value.body["message"] and e.value.body["code"] == "request_too_large"
    # the same without a Content-Length (chunked upload) is refused too
    r = httpx.post(server.url + "/v1/chat/completions", content=iter([b"x" * 2**20] * 3))
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_queue_full_is_429_with_retry_after_and_nothing_is_lost(client, server):
    with server.engine.paused():
        ts, out, errs = _concurrently([
            lambda s=s: client.images.generate(model="mini", prompt="a red square", extra_body={"seed": s})
            for s in range(4)])
        wait_for(lambda: server.engine.waiting == 4)
        with pytest.raises(openai.RateLimitError) as e:
            client.images.generate(model="mini", prompt="a red square")
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "2"
        assert e.value.body["code"] == "queue_full" and "4 requests are waiting (the limit is 4)" in e.value.body["message"]
    for t in ts:
        t.join(60)
    assert not errs and all(len(r.data) == 1 for r in out)


def test_client_that_disconnects_frees_its_slot(server):
    with server.engine.paused():
        ts, _, errs = _concurrently([lambda: httpx.post(server.url + "/v1/images/generations",
                                                        json={"prompt": "a red circle"}, timeout=2)])
        wait_for(lambda: server.engine.waiting == 1, timeout=5)  # queued (nothing runs while paused)...
        ts[0].join(10)
        assert [type(e) for e in errs] == [httpx.ReadTimeout]  # ...until the client gave up
        wait_for(lambda: server.engine.waiting == 0, timeout=5)


def test_stream_client_that_leaves_frees_its_slot(server):
    with server.engine.paused():
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=10,
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
            lines = r.iter_lines()  # kept: a discarded line iterator closes the response at once
            first = next(lines)
            assert first.startswith("data: ") and '"role": "assistant"' in first
            wait_for(lambda: server.engine.waiting == 1, timeout=5)  # queued (nothing runs while paused)
        wait_for(lambda: server.engine.waiting == 0, timeout=5)


def test_request_timeout_is_504_and_frees_the_slot(pipe):
    with ServerThread(pipe, model_id="mini", limits=Limits(timeout_s=0.5)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        with s.engine.paused():
            with pytest.raises(openai.APIStatusError) as e:
                c.images.generate(model="mini", prompt="a red circle")
            assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
            assert "timed out after 0.5 s" in e.value.body["message"]
            assert s.engine.waiting == 0


# -- JanusFlow --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow_pipe(tmp_path_factory):
    return januskit.load(init_checkpoint(tmp_path_factory.mktemp("jf") / "ckpt", arch="janusflow", seed=0))


def test_janusflow_images_batch_and_equal_alone(flow_pipe):
    with ServerThread(flow_pipe, model_id="flow") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        reqs = [("a blue square", 2, 2.0), ("a red circle above a green triangle", 5, 3.5)]
        with s.engine.paused():
            ts, out, errs = _concurrently([
                lambda p=p, sd=sd, g=g: c.images.generate(model="flow", prompt=p, n=1,
                                                          extra_body={"seed": sd, "cfg_weight": g, "steps": 3})
                for p, sd, g in reqs])
            wait_for(lambda: s.engine.waiting == 2)
        for t in ts:
            t.join(60)
        assert not errs and s.engine.batches[-1] == ("image", 2, 2)
        for (p, sd, g), r in zip(reqs, out):
            # Latents are continuous: batched rows differ from a lone run in the last float bits (the
            # sampler's own test bounds that at 1e-4), which uint8 truncation can turn into a 1-level step.
            ref = np.asarray(flow_pipe.generate_images(p, n=1, steps=3, cfg_weight=g, seed=sd).images[0]).astype(int)
            diff = np.abs(decode(r.data[0].b64_json).astype(int) - ref)
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
        with pytest.raises(openai.BadRequestError) as e:
            c.images.generate(model="flow", prompt="x", extra_body={"temperature": 0.5})
        assert e.value.body["param"] == "temperature" and "JanusFlow samples no tokens" in e.value.body["message"]
        r = c.chat.completions.create(model="flow", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        assert r.choices[0].message.content == flow_pipe.chat("hello", max_new_tokens=4)


def test_janusflow_edits_batch_and_equal_alone_and_image_to_image(flow_pipe, scene_image, other_image):
    with ServerThread(flow_pipe, model_id="flow") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        reqs = [("make the circle blue", [scene_image], 2, 2.0), ("merge them", [scene_image, other_image], 5, 3.5)]
        with s.engine.paused():
            ts, out, errs = _concurrently([
                lambda p=p, im=im, sd=sd, g=g: c.images.edit(model="flow", prompt=p, image=[png_file(x) for x in im],
                                                             extra_body={"seed": sd, "cfg_weight": g, "steps": 3})
                for p, im, sd, g in reqs])
            wait_for(lambda: s.engine.waiting == 2)
        for t in ts:
            t.join(60)
        assert not errs and s.engine.batches[-1] == ("edit", 2, 2)
        for (p, im, sd, g), r in zip(reqs, out):
            # continuous latents: batched rows may move a pixel by one level (as for generations above)
            ref = np.asarray(flow_pipe.edit_image(p, im, steps=3, cfg_text=g, seed=sd).images[0]).astype(int)
            diff = np.abs(decode(r.data[0].b64_json).astype(int) - ref)
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
        r = c.images.edit(model="flow", prompt="a red circle", image=png_file(scene_image), n=2,
                          extra_body={"seed": 4, "strength": 0.6, "steps": 5})
        ref = flow_pipe.image_to_image("a red circle", scene_image, strength=0.6, n=2, seed=4, steps=5)
        assert s.engine.batches[-1] == ("image-to-image", 1, 2)
        for d, im in zip(r.data, ref.images, strict=True):  # run alone, as the pipeline runs it: equal
            got = decode(d.b64_json)
            assert got.shape == (128, 128, 3)
            np.testing.assert_array_equal(got, np.asarray(im))
        with pytest.raises(openai.BadRequestError) as e:
            c.images.edit(model="flow", prompt="x", image=png_file(scene_image), extra_body={"temperature": 0.5})
        assert e.value.body["param"] == "temperature" and "JanusFlow samples no tokens" in e.value.body["message"]


def test_januskit_serve_command(tmp_path):
    """The CLI as a user runs it: `januskit serve` on the bundled model answers /health and a chat, then
    stops cleanly on SIGINT."""
    import signal
    import subprocess
    import sys

    from januskit.serving.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "januskit.cli", "serve", "--no-ui", "--port", str(port),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < end, "januskit serve did not come up"
                time.sleep(0.2)
        assert h["model"] == "januskit-default" and h["arch"] == "janus"
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="januskit-default", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=3)
        assert r.usage.completion_tokens <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert f"serving januskit-default on http://127.0.0.1:{port}" in out
