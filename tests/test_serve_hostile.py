"""The server against hostile and careless clients: every refusal is a 4xx in OpenAI's error shape naming
the field, never a 500 or a dropped connection; images are checked from their header before decoding;
text is measured before tokenising; stalled sockets are closed. The property-based tests (hypothesis,
fixed seed, bounded) throw random request bodies, random image bytes and random edit forms at the same
checks. Image edits (multipart/form-data) get the same refusals for their uploads, fields and bodies."""
from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from http.client import HTTPConnection
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import januskit
from januskit.processing.image import ImageError, ImageTooLarge, load_image
from januskit.serving.engine import Limits
from januskit.serving.errors import APIError
from januskit.serving.media import decode_image_url
from januskit.serving.server import ServerThread
from januskit.world.render import render
from januskit.world.scene import Obj

DEFAULT = Path(januskit.__file__).parent / "assets" / "default-model"
LIMITS = Limits(max_queue=8, max_n=2, max_tokens=4, max_body_bytes=4 * 2**20, timeout_s=120, read_timeout_s=1.0,
                max_prompt_chars=20_000)
CHAT, IMAGES, EDITS = "/v1/chat/completions", "/v1/images/generations", "/v1/images/edits"
IMG = "messages[0].content[0].image_url.url"


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    with ServerThread(januskit.load(DEFAULT), model_id="mini", limits=LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def post(http: httpx.Client, path: str, body: str | bytes | dict) -> httpx.Response:
    content = json.dumps(body) if isinstance(body, dict) else body
    return http.post(path, content=content, headers={"content-type": "application/json"})


def refused(r: httpx.Response, status: int = 400) -> dict:
    """The OpenAI error body of a refusal with `status`; the connection stays usable."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def png(w: int, h: int, rows: int | None = None) -> bytes:
    """A 1-bit PNG whose header says w x h, with `rows` rows of data (small on the wire)."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    row = b"\0" * (1 + (w + 7) // 8)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * (h if rows is None else rows), 9)) + chunk(b"IEND", b""))


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def ask(u: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}},
                                                      {"type": "text", "text": "What is this?"}]}], "max_tokens": 2}


SCENE = render((Obj("circle", "red", 0), Obj("square", "blue", 3)))


# -- text --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, raw, param", [
    (CHAT, '{"messages":[{"role":"user","content":"hi \\ud800"}],"max_tokens":4}', "messages[0].content"),
    (CHAT, '{"messages":[{"role":"system","content":"\\udfff"},{"role":"user","content":"x"}]}', "messages[0].content"),
    (CHAT, '{"messages":[{"role":"user","content":[{"type":"text","text":"a\\ud800"}]}]}', "messages[0].content[0].text"),
    (CHAT, '{"messages":[{"role":"user","content":"hi","name":"\\ud800"}]}', "messages[0].name"),
    (IMAGES, '{"prompt":"a red circle","model":"\\ud800"}', "model"),
])
def test_lone_surrogate_is_400_naming_the_field(http, path, raw, param):
    err = refused(post(http, path, raw))
    assert err["param"] == param and "not valid Unicode (a lone surrogate" in err["message"], err


def test_lone_surrogate_in_an_image_prompt_is_400(http):
    err = refused(post(http, IMAGES, '{"prompt":"a \\ud800 circle"}'))
    assert err["param"] == "prompt" and "unicode" in err["message"].lower()


@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"messages": [{"role": "user", "content": "a b " * 6000}]}, "messages"),
    (CHAT, {"messages": [{"role": "system", "content": "x" * 15_000}, {"role": "user", "content": "y" * 6000}]},
     "messages"),
    (IMAGES, {"prompt": "red " * 6000}, "prompt"),
])
def test_text_over_the_character_limit_is_refused_before_tokenising(http, path, body, param):
    err = refused(post(http, path, body))
    assert err["param"] == param and err["code"] == "context_length_exceeded"
    assert "characters of text, over this server's limit of 20000" in err["message"]


def test_a_huge_prompt_does_not_stall_health(server, http):
    """3 MB of text (under the body limit) is refused by its length, never tokenised (which holds the GIL for
    seconds); /health answers meanwhile."""
    body = json.dumps({"messages": [{"role": "user", "content": "a b " * 700_000}]})
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=post(httpx.Client(base_url=server.url, timeout=60), CHAT, body)))
    t.start()
    while t.is_alive():
        assert http.get("/health").json()["status"] == "ok"
    t.join()
    assert "2800000 characters of text, over this server's limit of 20000" in refused(out["r"])["message"]


@pytest.mark.parametrize("raw, words", [
    (b"{not json", "not valid JSON at character 1"),
    (b"[" * 100_000, "could not be parsed as JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"null", "body: Input should be a valid dictionary"),
])
def test_unparsable_bodies_name_the_body(http, raw, words):
    err = refused(post(http, CHAT, raw))
    assert err["param"] == "body" and words in err["message"], err


def test_an_unexpected_error_is_a_shaped_500(server, http, monkeypatch):
    import januskit.serving.app as app_module

    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(app_module, "chat_spec", broken)
    err = refused(post(http, CHAT, {"messages": [{"role": "user", "content": "hi"}]}), 500)
    assert err["type"] == "server_error" and "RuntimeError" in err["message"] and "boom" not in err["message"]


# -- images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, mime, code, words", [
    (base64.b64decode("iVBORw0KGgoAAAANSUhEUgAATiAAAE4gAQAAAADLC3uUAAAAAElFTkSuQmCC"), "image/png",
     "image_too_large", "over the limit of 16777216"),  # the header says 20000 x 20000
    (png(16_000_000, 1), "image/png", "image_too_large", "16000000x1 has a side of 16000000 px"),
    (png(9000, 10, rows=1), "image/png", "image_too_large", "has a side of 9000 px, over the limit of 8192"),
    (png(12000, 12000, rows=1), "image/png", "image_too_large", "12000x12000 = 144000000 pixels"),
    (base64.b64decode("UDYKMf8gMQoyNTUKAAAA"), "image/png", "invalid_image", "not a readable image in an accepted"),
    (encoded(SCENE, "ICO"), "image/x-icon", "invalid_image", "type 'image/x-icon' is not accepted"),
    (encoded(SCENE, "ICO"), "image/png", "invalid_image", "not a readable image in an accepted format"),
    (encoded(SCENE, "JPEG"), "image/png", "invalid_image", "declared 'image/png' but the bytes are JPEG"),
    (encoded(SCENE, "PNG")[:60], "image/png", "invalid_image", "not a readable image"),
])
def test_hostile_images_are_refused_from_the_header(http, data, mime, code, words):
    err = refused(post(http, CHAT, ask(url(data, mime))))
    assert err["param"] == IMG and err["code"] == code and words in err["message"], err


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_accepted_formats_are_answered(http, fmt):
    r = post(http, CHAT, ask(url(encoded(SCENE, fmt), f"image/{fmt.lower()}")))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_load_image_limits_are_parameters(tmp_path):
    p = tmp_path / "wide.png"
    p.write_bytes(png(300, 2, rows=2))
    assert load_image(p).size == (300, 2)
    with pytest.raises(ImageTooLarge, match=r"wide.png: 300x2 = 600 pixels, over the limit of 500"):
        load_image(p, max_pixels=500)
    with pytest.raises(ImageTooLarge, match="has a side of 300 px, over the limit of 256"):
        load_image(p, max_side=256)
    with pytest.raises(ImageError, match="not a readable image in an accepted format \\(JPEG\\)"):
        load_image(p, formats=("JPEG",))
    with pytest.raises(ImageError, match="path contains a NUL byte"):
        load_image("a\0b.png")


# -- image edits (multipart) ----------------------------------------------------------------------

SCENE_PNG = encoded(SCENE, "PNG")
BOMB = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAATiAAAE4gAQAAAADLC3uUAAAAAElFTkSuQmCC")  # declares 20000 x 20000


def edit(http: httpx.Client, images: list[tuple[str, tuple]] = (), **fields: str | list[str]) -> httpx.Response:
    """A multipart edit request: `images` as (field, (filename, bytes, type)), then the text fields (a
    part without a filename is a text field; a list repeats the field). Always multipart, even with no file."""
    fields = {"prompt": "make the circle green", **fields}
    parts = list(images) + [(k, (None, v)) for k, vs in fields.items() for v in (vs if isinstance(vs, list) else [vs])]
    return http.post(EDITS, files=parts)


def img(data: bytes = SCENE_PNG, mime: str = "image/png", field: str = "image") -> tuple[str, tuple]:
    return field, ("source.png", data, mime)


@pytest.mark.parametrize("images, fields, param, code, words", [
    ([], {}, "image", None, "no source image"),
    ([img(b"")], {}, "image", "invalid_image", "image: empty (0 bytes)"),
    ([img(b"just some text, not a picture", "text/plain")], {}, "image", "invalid_image",
     "not a readable image in an accepted format"),
    ([img(BOMB)], {}, "image", "image_too_large", "over the limit of 16777216"),
    ([img(png(12000, 12000, rows=1))], {}, "image", "image_too_large", "12000x12000 = 144000000 pixels"),
    ([img(png(16_000_000, 1))], {}, "image", "image_too_large", "has a side of 16000000 px"),
    ([img(encoded(SCENE, "JPEG"))], {}, "image", "invalid_image", "declared 'image/png' but the bytes are JPEG"),
    ([img(encoded(SCENE, "ICO"), "image/x-icon")], {}, "image", "invalid_image", "type 'image/x-icon' is not accepted"),
    ([img(encoded(SCENE, "ICO"), "application/octet-stream")], {}, "image", "invalid_image",
     "not a readable image in an accepted format"),
    ([img(field="image[]"), img(SCENE_PNG[:60], field="image[]")], {}, "image[1]", "invalid_image", "not a readable image"),
    ([img()] * 5, {}, "image", None, "5 source images, over this server's limit of 4"),
    ([img()] * 2, {"strength": "0.5"}, "image", None, "image-to-image (strength) takes one source image, got 2"),
    ([img()], {"image": "aGVsbG8="}, "image", "invalid_image", "expected an image file (a multipart file part)"),
    ([img(), img(field="mask")], {}, "mask", None, "inpainting masks are not supported"),
    ([img(), img(field="picture")], {}, "picture", None, "unknown or unsupported field"),
    ([img()], {"frobnicate": "1"}, "frobnicate", None, "unknown or unsupported field"),
    ([img()], {"n": ["1", "2"]}, "n", None, "n: given more than once"),
    ([img()], {"n": "3"}, "n", None, "3 is over this server's limit of 2"),
    ([img()], {"n": "0"}, "n", None, "greater than or equal to 1"),
    ([img()], {"n": "two"}, "n", None, "valid integer"),
    ([img()], {"strength": "0"}, "strength", None, "greater than 0"),
    ([img()], {"strength": "2"}, "strength", None, "less than or equal to 1"),
    ([img()], {"strength": "abc"}, "strength", None, "valid number"),
    ([img()], {"strength": "nan"}, "strength", None, "strength: Input should be"),
    ([img()], {"cfg_image": "inf"}, "cfg_image", None, "less than or equal to 100"),
    ([img()], {"prompt": "red " * 6000}, "prompt", "context_length_exceeded", "over this server's limit of 20000"),
    ([img()], {"prompt": "the <image_placeholder> here"}, "prompt", None, "must not contain <image_placeholder>"),
    ([img()], {"prompt": []}, "prompt", None, "Field required"),
    ([img()], {"model": "dall-e-2"}, "model", "model_not_found", "is not served here"),
])
def test_hostile_edits_are_refused_by_name(server, http, images, fields, param, code, words):
    r = edit(http, images, **fields)
    err = refused(r, 404 if code == "model_not_found" else 400)
    assert err["param"] == param and err["code"] == code and words in err["message"], err
    assert http.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("content, ctype, status, code, words", [
    (b'{"prompt": "x"}', "application/json", 415, "unsupported_media_type", "image edits take multipart/form-data"),
    (b"", None, 415, "unsupported_media_type", "got content-type ''"),
    (b"prompt=make+it+green", "application/x-www-form-urlencoded", 400, None, "image: no source image"),
    (b"--b\r\nnot a header\r\n\r\n", "multipart/form-data; boundary=b", 400, "invalid_multipart",
     "not valid multipart/form-data"),
    (b"garbage", "multipart/form-data", 400, "invalid_multipart", "Missing boundary"),
    (b'--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n', "multipart/form-data; boundary=b", 400,
     "invalid_multipart", '"name" must be provided'),
])
def test_edit_bodies_that_are_not_forms_are_refused(http, content, ctype, status, code, words):
    r = http.post(EDITS, content=content, headers={} if ctype is None else {"content-type": ctype})
    err = refused(r, status)
    assert err["code"] == code and words in err["message"], err
    assert http.get("/health").json()["status"] == "ok"


def test_edit_over_the_body_limit_is_413(server, http):
    big = SCENE_PNG + b"\0" * (5 * 2**20)  # valid PNG, trailing zeros past the 4 MB limit
    err = refused(edit(http, [img(big)]), 413)
    assert err["code"] == "request_too_large" and "over the limit of 4194304" in err["message"]
    r = http.post(EDITS, content=iter([b"x" * 2**20] * 5), headers={"content-type": "multipart/form-data; boundary=b"})
    assert refused(r, 413)["param"] == "body"  # chunked, no Content-Length: refused while it streams
    assert http.get("/health").json()["status"] == "ok"


def test_a_valid_edit_after_the_refusals_is_answered(http):
    r = edit(http, [img()], n="2", seed="1")
    assert r.status_code == 200, r.text
    assert [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size for d in r.json()["data"]] == [(64, 64)] * 2


# -- sockets -----------------------------------------------------------------------------------

def recv_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("sent, expect", [
    (b"", b""),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", b""),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mes", b"408 Request Timeout"),
])
def test_stalled_sockets_are_closed_after_the_read_timeout(server, http, sent, expect):
    with socket.create_connection((server.host, server.port)) as s:
        s.sendall(sent)
        t = time.monotonic()
        got = recv_all(s, timeout=20)  # returns when the server closes the socket
        assert 0.5 < time.monotonic() - t < 15
    assert expect in got
    if expect:
        body = json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]
        assert body["param"] == "body" and "nothing received for 1 s" in body["message"]
    assert http.get("/health").json()["status"] == "ok"


def test_a_kept_alive_connection_may_pause_longer_than_the_read_timeout(server):
    """The header deadline is not an idle timeout: a client that waits between two requests on one
    connection gets both answered, but half a header after a finished request is still cut off."""
    conn = HTTPConnection(server.host, server.port, timeout=10)
    try:
        for pause in (0.0, 2.5):  # 2.5 s: over the 1 s read timeout, under uvicorn's keep-alive
            time.sleep(pause)
            conn.request("GET", "/health")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        s = conn.sock  # the same socket served both
        s.sendall(b"GET /health HTTP/1.1\r\n")
        t = time.monotonic()
        assert recv_all(s, timeout=20) == b""
        assert 0.5 < time.monotonic() - t < 15
    finally:
        conn.close()


# -- property-based ------------------------------------------------------------------------------

HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
                    st.floats(allow_nan=False), st.text(max_size=30),
                    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _chat_body(draw) -> dict:
    msg = {"role": draw(st.sampled_from(["user", "assistant", "system", "tool", ""])),
           "content": draw(st.one_of(st.text(max_size=40), st.lists(st.one_of(
               st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
               st.fixed_dictionaries({"type": st.sampled_from(["image_url", "audio"]),
                                      "image_url": st.fixed_dictionaries({"url": st.text(max_size=40)})})),
               max_size=3), HOSTILE))}
    body = {"messages": draw(st.lists(st.just(msg), min_size=0, max_size=3)), "max_tokens": 2}
    for key in draw(st.lists(st.sampled_from(["model", "temperature", "top_p", "max_tokens", "seed", "stream", "n",
                                               "stream_options", "max_completion_tokens", "frobnicate"]), max_size=3)):
        body[key] = draw(HOSTILE)
    return body


def _image_body(draw) -> dict:
    body = {"prompt": draw(st.one_of(st.text(max_size=40), HOSTILE))}
    for key in draw(st.lists(st.sampled_from(["model", "n", "seed", "cfg_weight", "guidance", "temperature", "steps",
                                               "size", "response_format", "frobnicate"]), max_size=3)):
        body[key] = draw(HOSTILE)
    return body


@st.composite
def requests_(draw) -> tuple[str, dict]:
    return (CHAT, _chat_body(draw)) if draw(st.booleans()) else (IMAGES, _image_body(draw))


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(req=requests_())
def test_fuzzed_requests_get_an_answer_or_a_shaped_4xx(http, req):
    path, body = req
    r = post(http, path, json.dumps(body))  # ensure_ascii: lone surrogates travel as \ud800 escapes
    if r.status_code == 200:
        return
    assert r.status_code in (400, 404, 413, 429), (r.status_code, r.text, body)
    err = refused(r, r.status_code)
    assert err["message"] and (err["param"] is not None or r.status_code in (404, 429)), (err, body)


IMAGES_OK = [encoded(SCENE, f) for f in ("PNG", "JPEG", "GIF", "BMP", "WEBP")]


@st.composite
def image_bytes(draw) -> bytes:
    b = bytearray(draw(st.sampled_from(IMAGES_OK)))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, min(len(b), 80) - 1))
        b[i] = draw(st.integers(0, 255))
    return bytes(b[:draw(st.integers(0, len(b)))]) if draw(st.booleans()) else bytes(b)


FORM_VALUE = st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=20),  # httpx sends UTF-8
                       st.integers(-2**70, 2**70).map(str), st.floats().map(str),
                       st.sampled_from(["", "0", "1", "2", "0.5", "-1", "nan", "inf", "1e309", "true", "b64_json",
                                        "64x64", "mini"]))


@st.composite
def edit_forms(draw) -> list[tuple[str, tuple]]:
    parts = [(draw(st.sampled_from(["image", "image", "image[]", "mask", "prompt"])),
              ("f.png", draw(st.one_of(image_bytes(), st.binary(max_size=100))),
               draw(st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain", "image/x-icon"]))))
             for _ in range(draw(st.integers(0, 5)))]
    if draw(st.integers(0, 9)):
        parts.append(("prompt", (None, draw(st.one_of(st.just("make the circle green"), FORM_VALUE)))))
    for key in draw(st.lists(st.sampled_from(["model", "n", "seed", "cfg_weight", "cfg_text", "cfg_image", "strength",
                                               "temperature", "steps", "size", "response_format", "image", "user",
                                               "frobnicate"]), max_size=3)):
        parts.append((key, (None, draw(FORM_VALUE))))
    return parts


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(parts=edit_forms())
def test_fuzzed_edit_forms_get_an_answer_or_a_shaped_4xx(http, parts):
    r = http.post(EDITS, files=parts) if parts else http.post(EDITS, content=b"", headers={
        "content-type": "multipart/form-data; boundary=x"})
    if r.status_code == 200:
        return
    assert r.status_code in (400, 404, 413, 429), (r.status_code, r.text, parts)
    err = refused(r, r.status_code)
    assert err["message"] and (err["param"] is not None or r.status_code in (404, 429)), (err, parts)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(image_bytes(), st.binary(max_size=200)),
       mime=st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/x-icon", "",
                             "text/plain"]))
def test_fuzzed_image_bytes_decode_or_are_refused_by_name(data, mime):
    u = url(data, mime) if mime else base64.b64encode(data).decode()
    try:
        img = decode_image_url(u, "p", 4096 * 4096)
    except APIError as e:
        assert e.status == 400 and e.param == "p" and e.message.startswith("p: "), e.message
        assert e.code in ("invalid_image", "invalid_image_url", "image_too_large")
        return
    assert img.mode == "RGB" and img.size[0] * img.size[1] <= 4096 * 4096
