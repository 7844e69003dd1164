"""Processor: prompt format, image expansion, batching, image pre/post-processing (official-spec §2.3, §6, §7)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from januskit.processing.chat import SYSTEM_PROMPT, Message, Processor
from januskit.processing.image import ImageError, ImageTransform, load_image, to_pil, to_uint8
from januskit.processing.tokenizer import (BOI_TOKEN, BOS_TOKEN, EOI_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN,
                                           TextTokenizer)
from januskit.processing.synthetic_tokenizer import build_synthetic_tokenizer

N_IMG = 5  # image slots per image in the processor fixtures (small, so id lists stay readable)


@pytest.fixture(scope="module")
def pro_tok():
    return build_synthetic_tokenizer(1024, style="pro")


@pytest.fixture(scope="module")
def janus_tok():
    return build_synthetic_tokenizer(1024, style="janus")


@pytest.fixture(scope="module")
def pro(pro_tok):
    return Processor(pro_tok, ImageTransform(size=32), N_IMG)


@pytest.fixture(scope="module")
def janus(janus_tok):
    return Processor(janus_tok, ImageTransform(size=32), N_IMG)


def img(w=20, h=10, colour=(200, 30, 60)):
    return Image.new("RGB", (w, h), colour)


# ----------------------------------------------------------------------------------------------- prompt format


def test_pro_understanding_prompt_exact(pro):
    text = pro.render([Message("user", f"{IMAGE_TOKEN}\nDescribe.")])
    assert text == f"{SYSTEM_PROMPT}\n\n<|User|>: {IMAGE_TOKEN}\nDescribe.\n\n<|Assistant|>:"


def test_default_system_prompt_is_the_reference_one():
    assert SYSTEM_PROMPT == (
        "You are a helpful language and vision assistant. You are able to understand the visual content "
        "that the user provides, and assist the user with a variety of tasks using natural language.")


def test_checkpoint_can_name_its_system_prompt(pro_tok, tmp_path):
    """processor_config.json's system_prompt (the official VLChatProcessor's key) becomes the default
    of render / encode_chat; an explicit argument still wins; a non-string is refused by file."""
    (tmp_path / "tokenizer.json").write_text(pro_tok.to_json_str())
    (tmp_path / "processor_config.json").write_text(json.dumps({"system_prompt": ""}))
    p = Processor.from_folder(tmp_path, 32, N_IMG)
    assert p.render([Message("user", "Hi")]) == "<|User|>: Hi\n\n<|Assistant|>:"
    assert p.render([Message("user", "Hi")], system_prompt="S") == "S\n\n<|User|>: Hi\n\n<|Assistant|>:"
    (tmp_path / "processor_config.json").write_text(json.dumps({"num_image_tokens": N_IMG}))
    assert Processor.from_folder(tmp_path, 32, N_IMG).system_prompt == SYSTEM_PROMPT
    (tmp_path / "processor_config.json").write_text(json.dumps({"system_prompt": 3}))
    with pytest.raises(ValueError, match="processor_config.json: system_prompt must be a string, got int"):
        Processor.from_folder(tmp_path, 32, N_IMG)


def test_checkpoint_can_place_images_after_the_text(pro_tok, tmp_path):
    """processor_config.json's image_placement "after" (a model trained with the question first) puts unmarked
    images after the prompt, as its training conversations did; markers in the text still decide; anything
    but "before" / "after" is refused by file and field."""
    (tmp_path / "tokenizer.json").write_text(pro_tok.to_json_str())
    from januskit.checkpoint.init import processor_files
    from januskit.config import preset

    files = processor_files(preset("mini-janus-pro"), image_placement="after")
    assert json.loads(files["processor_config.json"])["image_placement"] == "after"
    assert "image_placement" not in json.loads(processor_files(preset("mini-janus-pro"))["processor_config.json"])
    (tmp_path / "processor_config.json").write_text(files["processor_config.json"])
    p = Processor.from_folder(tmp_path, 32, N_IMG)
    [m] = p.user_turn("What colour is the square?", [img()])
    assert m.content == f"What colour is the square?\n{IMAGE_TOKEN}"
    [m] = p.user_turn("Compare.", [img(), img()])
    assert m.content == f"Compare.\n{IMAGE_TOKEN}\n{IMAGE_TOKEN}"
    [m] = p.user_turn(f"{IMAGE_TOKEN} Look.", [img()])
    assert m.content == f"{IMAGE_TOKEN} Look."
    ids = p.encode_chat(p.user_turn("Hi?", [img()]), system_prompt="").ids
    assert ids.index(pro_tok.boi_id) > len(pro_tok.encode("<|User|>: Hi?", add_bos=False))
    (tmp_path / "processor_config.json").write_text(json.dumps({}))
    assert Processor.from_folder(tmp_path, 32, N_IMG).image_placement == "before"
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_placement": "middle"}))
    with pytest.raises(ValueError, match="processor_config.json: image_placement 'middle' is not one of before, after"):
        Processor.from_folder(tmp_path, 32, N_IMG)
    with pytest.raises(ValueError, match="image_placement 'left' is not one of before, after"):
        Processor(pro_tok, p.transform, N_IMG, image_placement="left")


def test_pro_multi_turn_exact(pro):
    msgs = [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "more")]
    assert pro.render(msgs, system_prompt="") == (
        f"<|User|>: Hi\n\n<|Assistant|>: Hello!{EOS_TOKEN}<|User|>: more\n\n<|Assistant|>:")
    assert pro.render(msgs, system_prompt="S") == (
        f"S\n\n<|User|>: Hi\n\n<|Assistant|>: Hello!{EOS_TOKEN}<|User|>: more\n\n<|Assistant|>:")


def test_contents_are_stripped_and_explicit_empty_assistant(pro):
    msgs = [Message("user", "  a cat \n"), Message("assistant", "")]
    assert pro.render(msgs, system_prompt="") == "<|User|>: a cat\n\n<|Assistant|>:"


def test_role_errors(pro):
    with pytest.raises(ValueError, match="role 'system'"):
        pro.render([Message("system", "x")])
    with pytest.raises(ValueError, match="alternate"):
        pro.render([Message("user", "a"), Message("user", "b")])
    with pytest.raises(ValueError, match="alternate"):
        pro.render([Message("assistant", "a")])


def test_text_to_image_prompt_exact(pro, pro_tok):
    ids = pro.generation_prompt("a cat")
    assert ids[0] == pro_tok.bos_id
    assert ids[-1] == pro_tok.boi_id
    assert ids.count(pro_tok.bos_id) == 1
    assert pro_tok.decode(ids, skip_special_tokens=False) == f"{BOS_TOKEN}<|User|>: a cat\n\n<|Assistant|>:{BOI_TOKEN}"
    # the same ids as tokenising the reference string (which appends the tag before tokenising)
    assert ids == pro_tok.encode("<|User|>: a cat\n\n<|Assistant|>:" + BOI_TOKEN)
    # roles are single tokens in the Pro format
    assert pro_tok.token_id("<|User|>") == ids[1]


def test_janus_style_roles(janus, janus_tok):
    assert not janus_tok.is_pro_format
    assert janus.roles == ("User", "Assistant")
    assert janus.render([Message("user", f"{IMAGE_TOKEN}\nDescribe.")]) == (
        f"{SYSTEM_PROMPT}\n\nUser: {IMAGE_TOKEN}\nDescribe.\n\nAssistant:")
    msgs = [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "more")]
    assert janus.render(msgs, system_prompt="") == f"User: Hi\n\nAssistant: Hello!{EOS_TOKEN}User: more\n\nAssistant:"
    ids = janus.generation_prompt("a cat")
    assert janus_tok.decode(ids, skip_special_tokens=False) == f"{BOS_TOKEN}User: a cat\n\nAssistant:{BOI_TOKEN}"
    assert ids[0] == janus_tok.bos_id and ids[-1] == janus_tok.boi_id


def test_pro_format_override(pro_tok):
    p = Processor(pro_tok, ImageTransform(size=32), N_IMG, pro_format=False)
    assert p.render([Message("user", "x")], system_prompt="") == "User: x\n\nAssistant:"


# ----------------------------------------------------------------------------------------------- image expansion


def _expanded(tok, n=N_IMG):
    return [tok.boi_id] + [tok.image_id] * n + [tok.eoi_id]


def test_single_image_expansion(pro, pro_tok):
    enc = pro.encode_chat([Message("user", f"{IMAGE_TOKEN}\nDescribe.", [img()])])
    raw = pro_tok.encode(pro.render([Message("user", f"{IMAGE_TOKEN}\nDescribe.")]))
    p = raw.index(pro_tok.image_id)
    assert enc.ids == raw[:p] + _expanded(pro_tok) + raw[p + 1:]
    assert len(enc.ids) == len(raw) - 1 + N_IMG + 2
    assert len(enc.images) == 1 and enc.images[0].shape == (3, 32, 32)


def test_several_images_in_one_message_and_across_turns(pro, pro_tok):
    a, b, c = img(colour=(255, 0, 0)), img(colour=(0, 255, 0)), img(colour=(0, 0, 255))
    msgs = [Message("user", f"{IMAGE_TOKEN} and {IMAGE_TOKEN}: compare", [a, b]),
            Message("assistant", "They differ."),
            Message("user", f"Now {IMAGE_TOKEN}?", [c])]
    enc = pro.encode_chat(msgs)
    ids = enc.ids
    assert ids.count(pro_tok.boi_id) == 3 and ids.count(pro_tok.eoi_id) == 3
    assert ids.count(pro_tok.image_id) == 3 * N_IMG
    # every run of placeholders is exactly N_IMG long and framed by begin/end
    starts = [i for i, t in enumerate(ids) if t == pro_tok.boi_id]
    for s in starts:
        assert ids[s:s + N_IMG + 2] == _expanded(pro_tok)
    # the text around the images is the tokenised rendering with each marker replaced
    raw = pro_tok.encode(pro.render(msgs))
    rebuilt = []
    for t in raw:
        rebuilt += _expanded(pro_tok) if t == pro_tok.image_id else [t]
    assert ids == rebuilt
    # images kept in order (red, green, blue after normalisation)
    assert [int(x[:, 16, 16].argmax()) for x in enc.images] == [0, 1, 2]
    # the third image sits after the assistant's EOS
    assert ids.index(pro_tok.eos_id) < starts[2]


def test_marker_image_count_mismatch(pro):
    with pytest.raises(ValueError, match=r"2 <image_placeholder> marker\(s\) but 1 image\(s\)"):
        pro.encode_chat([Message("user", f"{IMAGE_TOKEN}{IMAGE_TOKEN} x", [img()])])
    with pytest.raises(ValueError, match=r"0 <image_placeholder> marker\(s\) but 1 image\(s\)"):
        pro.encode_chat([Message("user", "x", [img()])])


def test_user_turn_places_markers(pro):
    [m] = pro.user_turn("Describe.", [img(), img()])
    assert m.content == f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nDescribe."
    [m] = pro.user_turn(f"Look: {IMAGE_TOKEN}", [img()])
    assert m.content == f"Look: {IMAGE_TOKEN}"


# ----------------------------------------------------------------------------------------------- batching


def test_left_padded_batch(pro, pro_tok):
    short = pro.encode_chat([Message("user", "hi")], system_prompt="")
    long = pro.encode_chat([Message("user", f"{IMAGE_TOKEN}\nDescribe the image please.", [img()])], system_prompt="")
    b = pro.batch([short, long])
    T = len(long.ids)
    assert b.input_ids.shape == (2, T) and b.valid.shape == (2, T) and b.image_mask.shape == (2, T)
    npad = T - len(short.ids)
    assert npad > 0
    assert b.input_ids[0, :npad].tolist() == [pro_tok.pad_id] * npad
    assert b.input_ids[0, npad:].tolist() == short.ids
    assert b.input_ids[1].tolist() == long.ids
    assert b.valid[0].tolist() == [False] * npad + [True] * len(short.ids)
    assert bool(b.valid[1].all())
    assert b.padded
    assert b.image_mask[0].sum() == 0
    assert b.image_mask[1].tolist() == [t == pro_tok.image_id for t in long.ids]
    assert int(b.image_mask.sum()) == N_IMG
    assert b.pixel_values.shape == (1, 3, 32, 32)
    torch.testing.assert_close(b.pixel_values[0], long.images[0], rtol=0, atol=0)


def test_batch_without_images_or_padding(pro):
    e = pro.encode_chat([Message("user", "hi")])
    b = pro.batch([e, e])
    assert b.pixel_values is None and not b.padded and not b.image_mask.any()


SPECIAL_IDS = {BOS_TOKEN: 3, EOS_TOKEN: 700, PAD_TOKEN: 11, IMAGE_TOKEN: 512, BOI_TOKEN: 600, EOI_TOKEN: 77}


@pytest.fixture(scope="module")
def odd_tok():
    return build_synthetic_tokenizer(1024, style="pro", special_ids=SPECIAL_IDS)


def test_special_ids_are_looked_up_by_string(odd_tok):
    assert (odd_tok.bos_id, odd_tok.eos_id, odd_tok.pad_id, odd_tok.image_id, odd_tok.boi_id, odd_tok.eoi_id) == (
        3, 700, 11, 512, 600, 77)
    p = Processor(odd_tok, ImageTransform(size=32), 3)
    assert p.pad_id == 11
    gen = p.generation_prompt("a cat")
    assert gen[0] == 3 and gen[-1] == 600
    multi = [Message("user", "x"), Message("assistant", "y"), Message("user", f"{IMAGE_TOKEN} z", [img()])]
    e = p.encode_chat(multi, system_prompt="")
    assert e.ids[0] == 3
    assert 700 in e.ids  # EOS after the assistant turn
    i = e.ids.index(600)
    assert e.ids[i:i + 5] == [600, 512, 512, 512, 77]
    short = p.encode_chat([Message("user", "q")], system_prompt="")
    b = p.batch([short, e])
    npad = len(e.ids) - len(short.ids)
    assert b.input_ids[0, :npad].tolist() == [11] * npad
    assert b.image_mask[1].nonzero().flatten().tolist() == [i + 1, i + 2, i + 3]


def test_pad_falls_back_to_eos_without_pad_token():
    tok = build_synthetic_tokenizer(1024, style="pro")
    d = json.loads(tok.to_json_str())
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != PAD_TOKEN]
    del d["model"]["vocab"][PAD_TOKEN]
    nopad = TextTokenizer.from_json_str(json.dumps(d, ensure_ascii=False))
    assert not nopad.has_token(PAD_TOKEN)
    assert Processor(nopad, ImageTransform(size=32), 3).pad_id == nopad.eos_id


# ----------------------------------------------------------------------------------------------- image preprocessing


def reference_preprocess(image: Image.Image, size: int = 384, min_size: int = 14) -> np.ndarray:
    """Straightforward re-statement of the official VLMImageProcessor (spec §2.3)."""
    image = image.convert("RGB")
    w, h = image.size
    longest = max(w, h)
    new_h = max(int(h / longest * size), min_size)
    new_w = max(int(w / longest * size), min_size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    side = max(new_w, new_h)
    if new_w != new_h:
        square = Image.new("RGB", (side, side), (127, 127, 127))
        square.paste(image, ((side - new_w) // 2, (side - new_h) // 2))
        image = square
    x = np.asarray(image).transpose(2, 0, 1).astype(np.float32) / 255
    return (x - 0.5) / 0.5


def _gradient(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 7 + yy * 3) % 256, (xx * 2 + yy * 11) % 256, (xx * yy) % 256], -1)
    noise = rng.integers(0, 40, size=base.shape)
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        im = Image.fromarray(np.dstack([arr, alpha]), "RGBA")
    elif mode == "L":
        im = im.convert("L")
    return im


@pytest.mark.parametrize("w,h,mode", [
    (640, 360, "RGB"),  # wide
    (300, 500, "RGB"),  # tall
    (5, 100, "RGB"),  # tiny: short side clamps at min_size 14
    (100, 5, "RGB"),
    (7, 100, "RGB"),  # 26.88 -> 26: int() truncates, it does not round
    (333, 200, "RGB"),  # 230.63 -> 230
    (257, 257, "RGB"),  # already square
    (384, 384, "RGB"),
    (123, 77, "RGBA"),
    (90, 150, "L"),
])
def test_preprocess_matches_reference_bit_exactly(w, h, mode):
    im = _gradient(w, h, mode, seed=w * 1000 + h)
    t = ImageTransform()
    got = t(im)
    want = torch.from_numpy(reference_preprocess(im))
    assert got.dtype == torch.float32 and got.shape == (3, 384, 384)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"
    assert float(got.min()) >= -1 and float(got.max()) <= 1


def test_every_byte_value_normalises_like_the_reference():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    im = Image.fromarray(np.dstack([arr, arr[::-1], arr.T]), "RGB")
    got = ImageTransform(size=16).to_tensor(im)
    want = (np.asarray(im).transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.5
    assert torch.equal(got, torch.from_numpy(want))


def test_padding_colour_and_placement():
    t = ImageTransform()
    x = t(Image.new("RGB", (200, 100), (255, 255, 255)))  # -> 384 x 192, centred vertically (offset 96)
    grey = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(x[:, :96], torch.full_like(x[:, :96], grey), atol=1e-6)
    assert torch.allclose(x[:, 96 + 192:], torch.full_like(x[:, 96 + 192:], grey), atol=1e-6)
    assert torch.allclose(x[:, 100:280], torch.ones_like(x[:, 100:280]))
    assert t.background == (127, 127, 127)


def test_path_bytes_and_data_uri_inputs(tmp_path):
    im = _gradient(50, 30)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    png = buf.getvalue()
    p = tmp_path / "x.png"
    p.write_bytes(png)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    t = ImageTransform(size=64)
    want = t(im)
    for src in (str(p), p, png, uri):
        assert torch.equal(t(src), want)
    rgba = tmp_path / "a.png"
    _gradient(20, 20, "RGBA").save(rgba)
    assert load_image(rgba).mode == "RGB"


def test_image_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png.*empty \(0 bytes\)"):
        load_image(empty)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match=r"junk\.jpg.*not a readable image"):
        load_image(junk)
    with pytest.raises(ImageError, match=r"nope\.png.*file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"\x89PNG garbage")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="data URI.*base64"):
        load_image("data:image/png;base64,@@@not base64@@@")
    with pytest.raises(ImageError, match="data URI"):
        load_image("data:image/png;base64")
    with pytest.raises(ImageError, match="data URI.*expected"):
        load_image("data:image/png,rawnotbase64")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(TypeError, match="got int"):
        load_image(5)
    assert issubclass(ImageError, ValueError)


def test_data_uri_with_line_breaks():
    im = _gradient(12, 9)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    wrapped = "\n".join(b64[i:i + 20] for i in range(0, len(b64), 20))
    got = load_image("data:image/png;base64," + wrapped)
    assert np.array_equal(np.asarray(got), np.asarray(im))


def test_preprocessor_config_is_honoured():
    t = ImageTransform.from_preprocessor_config({"image_size": 64, "min_size": 14, "image_mean": [0.5] * 3,
                                                 "image_std": [0.5] * 3, "do_normalize": False}, 384)
    x = t(Image.new("RGB", (10, 10), (255, 0, 51)))
    assert x.shape == (3, 64, 64)
    assert torch.allclose(x[:, 5, 5], torch.tensor([1.0, 0.0, 0.2]))


# ----------------------------------------------------------------------------------------------- post-processing


def _pixel_for(value: float) -> float:
    """Decoder output whose (x + 1) / 2 * 255, in float32, is just around `value`."""
    return float(np.float32(value) / np.float32(255) * np.float32(2) - np.float32(1))


def test_output_truncates_not_rounds():
    vals = [254.9, 127.6, 0.7, 3.5, 200.99]
    x = torch.tensor([_pixel_for(v) for v in vals], dtype=torch.float32)
    # compute what float32 gives, then check it is truncated
    scaled = ((x.numpy() + 1) / 2 * 255)
    assert np.all(np.abs(scaled - np.array(vals, dtype=np.float32)) < 1e-3)
    pix = x.view(1, 1, 1, -1).expand(1, 3, 1, len(vals)).contiguous()
    out = to_uint8(pix)
    assert out.dtype == np.uint8 and out.shape == (1, 1, len(vals), 3)
    assert out[0, 0, :, 0].tolist() == [254, 127, 0, 3, 200]


def test_output_clips_and_layout():
    pix = torch.zeros(2, 3, 4, 5)
    pix[0, 0] = 5.0  # way above 1 -> 255
    pix[0, 1] = -3.0  # below -1 -> 0
    pix[1] = 1.0
    out = to_uint8(pix)
    assert out.shape == (2, 4, 5, 3)
    assert (out[0, ..., 0] == 255).all() and (out[0, ..., 1] == 0).all() and (out[0, ..., 2] == 127).all()
    assert (out[1] == 255).all()
    ims = to_pil(pix)
    assert [i.size for i in ims] == [(5, 4), (5, 4)] and ims[0].mode == "RGB"
    assert np.array_equal(np.asarray(ims[0]), out[0])
    # bf16 input is accepted
    assert np.array_equal(to_uint8(pix.bfloat16()), out)
