"""Tests for januskit.processing.tokenizer (synthetic tokenizers only; no downloads)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from januskit.processing import tokenizer as tk
from januskit.processing.tokenizer import (ASSISTANT_TOKEN, BEGIN_OF_GENERATION_TOKEN, BOI_TOKEN, BOS_TOKEN,
                                           EOI_TOKEN, EOS_TOKEN, GROUNDING_TOKEN, IMAGE_TOKEN, PAD_TOKEN,
                                           PATCH_TOKEN, StreamDecoder, TextTokenizer, USER_TOKEN)
from januskit.processing.synthetic_tokenizer import build_synthetic_tokenizer, real_special_ids

MULTIBYTE = "naïve 猫 🐱"


@pytest.fixture(scope="module")
def pro() -> TextTokenizer:
    return build_synthetic_tokenizer(1024, style="pro")


@pytest.fixture(scope="module")
def janus() -> TextTokenizer:
    return build_synthetic_tokenizer(1024, style="janus")


@pytest.fixture(scope="module")
def full_1b() -> TextTokenizer:
    return build_synthetic_tokenizer(102400, special_ids=real_special_ids("janus-pro-1b"))


# ----------------------------------------------------------------- token strings


def test_special_strings_use_fullwidth_bars() -> None:
    assert BOS_TOKEN == "<｜begin▁of▁sentence｜>"
    assert EOS_TOKEN == "<｜end▁of▁sentence｜>"
    assert PAD_TOKEN == "<｜▁pad▁｜>"
    assert BEGIN_OF_GENERATION_TOKEN == "<｜begin▁of▁generation｜>"
    assert "\uff5c" in BOS_TOKEN and "\u2581" in BOS_TOKEN
    assert USER_TOKEN == "<|User|>" and ASSISTANT_TOKEN == "<|Assistant|>"


# ----------------------------------------------------------------- special ids


def test_default_placement_pro(pro: TextTokenizer) -> None:
    # 15 specials take ids 1009..1023 with bos, eos, pad first.
    assert (pro.bos_id, pro.eos_id, pro.pad_id) == (1009, 1010, 1011)
    assert (pro.image_id, pro.boi_id, pro.eoi_id) == (1012, 1013, 1014)
    assert pro.token_id(ASSISTANT_TOKEN) == 1023
    assert pro.vocab_size == 1024
    assert pro.is_pro_format is True
    assert pro.has_token(USER_TOKEN)


def test_default_placement_janus(janus: TextTokenizer) -> None:
    # Janus-1.3B style has 13 specials (no role tokens) -> ids 1011..1023.
    assert (janus.bos_id, janus.eos_id, janus.pad_id) == (1011, 1012, 1013)
    assert janus.image_id == 1014
    assert janus.token_id(BEGIN_OF_GENERATION_TOKEN) == 1023
    assert janus.vocab_size == 1024
    assert janus.is_pro_format is False
    assert not janus.has_token(USER_TOKEN)
    assert len(janus.encode(USER_TOKEN, add_bos=False)) > 1
    assert janus.decode(janus.encode("<|User|>: hi")) == "<|User|>: hi"


def test_all_ids_below_vocab_size(pro: TextTokenizer) -> None:
    vocab = pro.raw.get_vocab(with_added_tokens=True)
    assert max(vocab.values()) == 1023
    assert len(set(vocab.values())) == len(vocab)  # no id shared by two strings


def test_real_special_ids_full_vocab(full_1b: TextTokenizer) -> None:
    assert (full_1b.bos_id, full_1b.eos_id, full_1b.pad_id) == (100000, 100001, 100002)
    assert full_1b.image_id == 100581
    assert full_1b.is_pro_format is True
    ids = full_1b.encode(f"{IMAGE_TOKEN}{BOI_TOKEN}x{EOI_TOKEN}", add_bos=True)
    assert ids[:3] == [100000, 100581, full_1b.boi_id]
    assert ids[-1] == full_1b.eoi_id
    # Gaps between the trained BPE vocab and 100000 survive a save/load round trip.
    for token, tid in real_special_ids("janus-pro-1b").items():
        assert full_1b.token_id(token) == tid
        assert full_1b.encode(token, add_bos=False) == [tid]
        assert full_1b.decode([tid], skip_special_tokens=False) == token


def test_real_special_ids_presets() -> None:
    p7 = real_special_ids("janus-pro-7b")
    assert p7[BOS_TOKEN] == 100000 and p7[EOS_TOKEN] == 100001
    assert p7[PAD_TOKEN] == 100015 and p7[IMAGE_TOKEN] == 100594
    j13 = real_special_ids("janus-1.3b")
    assert j13[PAD_TOKEN] == 100002 and j13[IMAGE_TOKEN] == 100581
    assert USER_TOKEN not in j13 and USER_TOKEN in p7
    for preset in ("janus-1.3b", "janus-pro-1b", "janus-pro-7b"):
        ids = real_special_ids(preset)
        assert len(set(ids.values())) == len(ids)
        assert all(100000 <= v < 102400 for v in ids.values())
    with pytest.raises(ValueError, match="janus-pro-3b"):
        real_special_ids("janus-pro-3b")

    t7 = build_synthetic_tokenizer(102400, special_ids=p7)
    assert (t7.pad_id, t7.image_id) == (100015, 100594)
    t13 = build_synthetic_tokenizer(102400, style="janus", special_ids=j13)
    assert t13.is_pro_format is False and t13.image_id == 100581


def test_partial_special_ids_rest_at_top() -> None:
    t = build_synthetic_tokenizer(2048, special_ids={BOS_TOKEN: 1500, IMAGE_TOKEN: 2047})
    assert t.bos_id == 1500 and t.image_id == 2047
    # Remaining 13 specials fill the highest free ids 2034..2046 in declaration order.
    assert (t.eos_id, t.pad_id, t.boi_id) == (2034, 2035, 2036)
    assert t.token_id(ASSISTANT_TOKEN) == 2046


def test_extra_special_token_via_special_ids() -> None:
    t = build_synthetic_tokenizer(1024, special_ids={"<my_tok>": 500})
    assert t.token_id("<my_tok>") == 500
    assert t.encode("a<my_tok>b", add_bos=False)[1] == 500


# ----------------------------------------------------------------- encode/decode


def test_encode_prepends_single_bos(pro: TextTokenizer) -> None:
    # The synthetic file's post-processor adds BOS itself; encode must not double it.
    assert pro.raw.encode("hi").ids[0] == pro.bos_id
    ids = pro.encode("hi")
    assert ids[0] == pro.bos_id and ids.count(pro.bos_id) == 1
    assert pro.encode("hi", add_bos=False) == ids[1:]
    assert pro.encode("", add_bos=True) == [pro.bos_id]


def test_special_strings_in_text_are_single_ids(pro: TextTokenizer) -> None:
    text = f"{USER_TOKEN}: {BOI_TOKEN}{IMAGE_TOKEN}{IMAGE_TOKEN}{EOI_TOKEN} describe{ASSISTANT_TOKEN}"
    ids = pro.encode(text, add_bos=False)
    assert ids[0] == pro.token_id(USER_TOKEN)
    boi = ids.index(pro.boi_id)
    assert ids[boi : boi + 4] == [pro.boi_id, pro.image_id, pro.image_id, pro.eoi_id]
    assert ids[-1] == pro.token_id(ASSISTANT_TOKEN)
    for token in tk.special_tokens_for_style("pro"):
        assert pro.encode(token, add_bos=False) == [pro.token_id(token)]
    assert pro.decode(ids, skip_special_tokens=False) == text
    assert pro.decode(ids) == ":  describe"


@pytest.mark.parametrize(
    "text",
    [
        "The red circle is above the blue square.",
        "  leading spaces, tabs\tand\nnewlines 12345!",
        MULTIBYTE,
        "emoji 👩‍💻 and Ωmega ∑ 日本語テキスト",
    ],
)
def test_roundtrip(pro: TextTokenizer, text: str) -> None:
    assert pro.decode(pro.encode(text)) == text
    assert pro.decode(pro.encode(text, add_bos=False)) == text


def test_decode_keeps_specials_when_asked(pro: TextTokenizer) -> None:
    ids = pro.encode("hi")
    assert pro.decode(ids, skip_special_tokens=False) == BOS_TOKEN + "hi"
    assert pro.decode(ids) == "hi"


# ----------------------------------------------------------------- streaming


def _stream(tok: TextTokenizer, ids: list[int], skip: bool = True) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_multibyte(pro: TextTokenizer) -> None:
    text = MULTIBYTE + " and more 猫猫 🐱🐱 text"
    ids = pro.encode(text)
    pieces = _stream(pro, ids)
    assert "".join(pieces) == pro.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # The cat emoji is 4 bytes split across byte tokens: some pushes must be held.
    assert pieces.count("") > 1


def test_stream_with_specials(pro: TextTokenizer) -> None:
    ids = pro.encode(f"{USER_TOKEN}{MULTIBYTE}{IMAGE_TOKEN}x") + [pro.eos_id]
    for skip in (True, False):
        assert "".join(_stream(pro, ids, skip)) == pro.decode(ids, skip_special_tokens=skip)


def test_stream_random_ids_matches_decode(pro: TextTokenizer) -> None:
    # Random ids produce invalid UTF-8 too; concatenation must still equal decode.
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(pro.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert "".join(_stream(pro, ids, skip)) == pro.decode(ids, skip)


def test_stream_decoder_reusable_after_flush(pro: TextTokenizer) -> None:
    dec = StreamDecoder(pro)
    first = "".join(dec.push(i) for i in pro.encode("猫")) + dec.flush()
    second = "".join(dec.push(i) for i in pro.encode("dog", add_bos=False)) + dec.flush()
    assert (first, second) == ("猫", "dog")


def test_stream_decoder_lstrip_drops_only_the_leading_whitespace(pro: TextTokenizer) -> None:
    """A chat answer's first token carries the space after "Assistant:": lstrip drops it (and any
    whitespace-only pieces before the text), keeps every later space, and starts over after flush."""
    ids = pro.encode("  \n 4 and  five ", add_bos=False)
    dec = StreamDecoder(pro, lstrip=True)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == "4 and  five "
    assert not next(p for p in pieces if p)[0].isspace()
    assert "".join([dec.push(i) for i in pro.encode(" again", add_bos=False)] + [dec.flush()]) == "again"
    rng = random.Random(1)
    for _ in range(20):  # random ids: still the plain decode, left-stripped
        ids = [rng.randrange(pro.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(_stream_lstrip(pro, ids)) == pro.decode(ids).lstrip()


def _stream_lstrip(tok: TextTokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok, lstrip=True)
    return [dec.push(i) for i in ids] + [dec.flush()]


# ----------------------------------------------------------------- files & determinism


def test_save_and_load_roundtrip(full_1b: TextTokenizer, tmp_path: Path) -> None:
    path = full_1b.save(tmp_path / "ckpt" / "tokenizer.json")
    loaded = TextTokenizer.from_file(path)
    assert loaded.path == path
    assert loaded.to_json_str() == full_1b.to_json_str()
    assert (loaded.bos_id, loaded.image_id) == (100000, 100581)
    assert loaded.vocab_size == full_1b.vocab_size
    # A directory containing tokenizer.json is accepted too.
    assert TextTokenizer.from_file(tmp_path / "ckpt").bos_id == 100000
    text = f"{MULTIBYTE}{IMAGE_TOKEN}"
    assert loaded.encode(text) == full_1b.encode(text)


def test_deterministic_in_process() -> None:
    kwargs = dict(style="janus", special_ids={BOS_TOKEN: 700}, seed_text="zebra quokka")
    a = build_synthetic_tokenizer(1024, **kwargs).to_json_str()
    b = build_synthetic_tokenizer(1024, **kwargs).to_json_str()
    assert a.encode() == b.encode()
    assert build_synthetic_tokenizer(1024).to_json_str() != a


def test_deterministic_across_processes(tmp_path: Path) -> None:
    # Rust HashMaps are seeded per process, so compare with a fresh interpreter.
    script = (
        "import sys\n"
        "import januskit.processing.synthetic_tokenizer as m\n"
        "m.build_synthetic_tokenizer(1024).save(sys.argv[1])\n"
        "m.build_synthetic_tokenizer(102400, special_ids=m.real_special_ids('janus-pro-7b'))"
        ".save(sys.argv[2])\n"
    )
    out_a, out_b = tmp_path / "a.json", tmp_path / "b.json"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(out_a), str(out_b)], check=True, env=env)
    here_a = tmp_path / "here_a.json"
    here_b = tmp_path / "here_b.json"
    build_synthetic_tokenizer(1024).save(here_a)
    build_synthetic_tokenizer(102400, special_ids=real_special_ids("janus-pro-7b")).save(here_b)
    assert out_a.read_bytes() == here_a.read_bytes()
    assert out_b.read_bytes() == here_b.read_bytes()


# ----------------------------------------------------------------- errors


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        TextTokenizer.from_file(missing)


def test_bad_json_names_path(tmp_path: Path) -> None:
    bad = tmp_path / "broken_tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken_tokenizer.json"):
        TextTokenizer.from_file(bad)


def test_missing_token_names_token_and_file(pro: TextTokenizer, tmp_path: Path) -> None:
    # Drop pad and image tokens: other lookups still work, the missing ones raise on access.
    data = json.loads(pro.to_json_str())
    gone = {PAD_TOKEN, IMAGE_TOKEN}
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in gone]
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k not in gone}
    path = tmp_path / "nopad_tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tok = TextTokenizer.from_file(path)
    assert tok.bos_id == pro.bos_id and tok.eos_id == pro.eos_id
    with pytest.raises(KeyError) as exc:
        _ = tok.pad_id
    assert PAD_TOKEN in str(exc.value) and "nopad_tokenizer.json" in str(exc.value)
    with pytest.raises(KeyError, match="image_placeholder"):
        _ = tok.image_id
    with pytest.raises(KeyError, match="no_such_token"):
        pro.token_id("<no_such_token>")
    assert not pro.has_token("<no_such_token>")


def test_vocab_too_small() -> None:
    with pytest.raises(ValueError, match=r"vocab_size 200 is too small.*271"):
        build_synthetic_tokenizer(200)
    with pytest.raises(ValueError, match="too small"):
        build_synthetic_tokenizer(256 + 14)  # pro needs 256 + 15
    build_synthetic_tokenizer(256 + 15)  # exactly enough: only byte tokens


def test_bad_special_ids() -> None:
    with pytest.raises(ValueError, match="collide") as exc:
        build_synthetic_tokenizer(1024, special_ids={BOS_TOKEN: 900, EOS_TOKEN: 900})
    assert BOS_TOKEN in str(exc.value) and EOS_TOKEN in str(exc.value)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_synthetic_tokenizer(1024, special_ids={IMAGE_TOKEN: 1024})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_synthetic_tokenizer(1024, special_ids={IMAGE_TOKEN: -1})
    with pytest.raises(ValueError, match="style"):
        build_synthetic_tokenizer(1024, style="flow")


def test_full_vocab_and_seed_text_builds() -> None:
    """The 7B layout at full vocabulary, and a small build whose seed-text words become single tokens
    (no build-time limit here: timings belong in bench/)."""
    ids = real_special_ids("janus-pro-7b")
    t7 = build_synthetic_tokenizer(102400, special_ids=ids)
    assert {t: t7.token_id(t) for t in ids} == ids
    seeded = build_synthetic_tokenizer(1024, seed_text="extra words " * 50)
    assert [seeded.decode([i]) for i in seeded.encode("extra words", add_bos=False)] == ["extra", " words"]


def test_patch_and_grounding_tokens_present(pro: TextTokenizer) -> None:
    for token in (PATCH_TOKEN, GROUNDING_TOKEN, BEGIN_OF_GENERATION_TOKEN):
        assert 1009 <= pro.token_id(token) < 1024
