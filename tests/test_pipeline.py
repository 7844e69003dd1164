"""JanusPipeline on the tiny random presets: text-to-image (CFG, seeding, chunking, progress),
understanding (greedy, streaming, batching, stopping, limits) and the VQ tokenizer both ways.
Reference results are recomputed here the slow, obvious way (full forward, no KV cache)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import januskit
from januskit.checkpoint.init import init_checkpoint
from januskit.models.llama import rope_inv_freq
from januskit.processing.chat import Message
from januskit.processing.tokenizer import IMAGE_TOKEN
from januskit.sampling.image_ar import cfg_rows, generate_image_tokens
from januskit.sampling.text import generate_text

N_TOK = 64  # VQ tokens per image in the tiny presets (128 px / 16)


def _preset(name):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        return januskit.load(name)


def _folder_pipeline(tmp_path_factory, preset):
    folder = init_checkpoint(tmp_path_factory.mktemp(preset) / "ckpt", preset_name=preset, seed=0)
    return januskit.load(folder)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return _folder_pipeline(tmp_path_factory, "tiny-janus-pro")


@pytest.fixture(scope="module")
def pipe_janus(tmp_path_factory):
    return _folder_pipeline(tmp_path_factory, "tiny-janus")


def picture(w=96, h=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def test_load_preset_warns_about_random_weights():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        p = januskit.load("tiny-janus")
    assert p.processor.roles == ("User", "Assistant")
    assert _preset("tiny-janus-pro").processor.roles == ("<|User|>", "<|Assistant|>")


def test_preset_model_has_correct_rope_frequencies():
    p = _preset("tiny-janus-pro")
    assert torch.equal(p.model.llm.inv_freq, rope_inv_freq(p.config.llm))


def test_preset_weights_equal_init_checkpoint_weights(tmp_path):
    folder = init_checkpoint(tmp_path / "ck", preset_name="tiny-janus-pro", seed=0)
    a, b = _preset("tiny-janus-pro").model, januskit.load(folder).model
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n
    assert torch.equal(b.llm.inv_freq, rope_inv_freq(b.config.llm))


# ----------------------------------------------------------------------------------------------- references


@torch.no_grad()
def ref_cfg_greedy(model, prompt, pad_id, cfg, steps):
    """Image tokens, greedy, from separate full forwards of the conditional and unconditional rows."""
    cond = torch.tensor(prompt)
    uncond = torch.full_like(cond, pad_id)
    uncond[0], uncond[-1] = cond[0], cond[-1]
    seqs = [model.text_embeds(cond[None]), model.text_embeds(uncond[None])]
    toks = []
    for _ in range(steps):
        lc, lu = (model.image_logits(model.llm(s, torch.arange(s.shape[1])[None])[:, -1]) for s in seqs)
        logits = lc if cfg is None else lu + cfg * (lc - lu)
        t = logits.argmax(-1)
        toks.append(int(t))
        e = model.gen_embeds(t)[:, None]
        seqs = [torch.cat([s, e], 1) for s in seqs]
    return toks


@torch.no_grad()
def ref_text_greedy(pipe, messages, steps, system_prompt=None):
    """Answer ids, greedy, recomputing the whole sequence every step (no cache, no padding)."""
    proc, model = pipe.processor, pipe.model
    enc = proc.encode_chat(messages) if system_prompt is None else proc.encode_chat(messages, system_prompt)
    b = proc.batch([enc])
    h = model.splice(b.input_ids, b.image_mask, b.pixel_values)
    out = []
    for _ in range(steps):
        t = model.text_logits(model.llm(h, torch.arange(h.shape[1])[None])[:, -1]).argmax(-1)
        out.append(int(t))
        if int(t) == proc.tokenizer.eos_id:
            break
        h = torch.cat([h, model.text_embeds(t)[:, None]], 1)
    return out


# ----------------------------------------------------------------------------------------------- text-to-image


def test_cfg_rows_layout(pipe):
    tok = pipe.processor.tokenizer
    pad = pipe.processor.pad_id
    a = pipe.processor.generation_prompt("a cat")
    ids, valid = cfg_rows([a, a], pad)
    assert valid is None
    assert ids.shape == (4, len(a))
    assert ids[0].tolist() == a and ids[1].tolist() == a
    for r in (2, 3):  # unconditional rows: BOS kept, <begin_of_image> kept, middle = pad
        assert ids[r, 0] == tok.bos_id and ids[r, -1] == tok.boi_id
        assert ids[r, 1:-1].tolist() == [pad] * (len(a) - 2)
    assert pad == tok.pad_id

    b = pipe.processor.generation_prompt("a large red circle above a small blue square")
    ids, valid = cfg_rows([a, b], pad)
    L, d = len(b), len(b) - len(a)
    assert ids.shape == (4, L) and valid.shape == (4, L)
    assert ids[0, d:].tolist() == a and ids[0, :d].tolist() == [pad] * d
    assert valid[0].tolist() == [False] * d + [True] * len(a) == valid[2].tolist()
    assert bool(valid[1].all()) and bool(valid[3].all())
    assert ids[2, d].item() == tok.bos_id and ids[2, -1].item() == tok.boi_id
    assert ids[3].tolist() == [tok.bos_id] + [pad] * (L - 2) + [tok.boi_id]
    with pytest.raises(ValueError, match="at least BOS"):
        cfg_rows([[1]], pad)


def test_cfg_weight_one_equals_conditional_greedy(pipe):
    prompt = pipe.processor.generation_prompt("a cat")
    got = generate_image_tokens(pipe.model, [prompt], pad_id=pipe.processor.pad_id, cfg_weight=1.0, temperature=0)
    want = ref_cfg_greedy(pipe.model, prompt, pipe.processor.pad_id, None, N_TOK)
    assert got.shape == (1, N_TOK)
    assert got[0].tolist() == want
    # same through the pipeline
    res = pipe.generate_images("a cat", n=1, cfg_weight=1.0, temperature=0)
    assert res.tokens[0].tolist() == want


def test_cfg_greedy_matches_reference(pipe):
    prompt = pipe.processor.generation_prompt("a cat")
    got = generate_image_tokens(pipe.model, [prompt], pad_id=pipe.processor.pad_id, cfg_weight=5.0, temperature=0)
    want = ref_cfg_greedy(pipe.model, prompt, pipe.processor.pad_id, 5.0, N_TOK)
    assert got[0].tolist() == want
    assert want != ref_cfg_greedy(pipe.model, prompt, pipe.processor.pad_id, None, N_TOK)  # CFG does something


def test_prompts_of_different_lengths_are_padded_and_masked(pipe):
    proc = pipe.processor
    a = proc.generation_prompt("a cat")
    b = proc.generation_prompt("a large red circle above a small blue square")
    both = generate_image_tokens(pipe.model, [a, b], pad_id=proc.pad_id, cfg_weight=3.0, temperature=0)
    assert both[0].tolist() == ref_cfg_greedy(pipe.model, a, proc.pad_id, 3.0, N_TOK)
    assert both[1].tolist() == ref_cfg_greedy(pipe.model, b, proc.pad_id, 3.0, N_TOK)


def test_generate_images_outputs_and_seed(pipe):
    r1 = pipe.generate_images("a red circle", n=2, seed=7)
    r2 = pipe.generate_images("a red circle", n=2, seed=7)
    r3 = pipe.generate_images("a red circle", n=2, seed=8)
    assert isinstance(r1.tokens, torch.Tensor) and r1.tokens.dtype == torch.long
    assert r1.tokens.shape == (2, N_TOK)
    assert int(r1.tokens.min()) >= 0 and int(r1.tokens.max()) < pipe.config.vq.codebook_size
    assert torch.equal(r1.tokens, r2.tokens)
    assert not torch.equal(r1.tokens, r3.tokens)
    assert not torch.equal(r1.tokens[0], r1.tokens[1])  # images of one request differ
    assert len(r1.images) == 2
    for a, b in zip(r1.images, r2.images):
        assert isinstance(a, Image.Image) and a.size == (128, 128) and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert r1.seed == 7 and r1.info["tokens_per_image"] == N_TOK
    # images are the decoded tokens
    assert np.array_equal(np.asarray(r1.images[1]), np.asarray(pipe.decode_image_tokens(r1.tokens[1:2])[0]))


def test_image_i_independent_of_n_and_chunking(pipe):
    kw = dict(seed=3, cfg_weight=4.0, temperature=1.0, top_k=100)
    three = pipe.generate_images("a blue square", n=3, **kw)
    assert three.info["chunk"] == 3
    one = pipe.generate_images("a blue square", n=1, **kw)
    chunked = pipe.generate_images("a blue square", n=3, memory_budget_gb=1e-9, **kw)
    assert chunked.info["chunk"] == 1
    assert torch.equal(one.tokens[0], three.tokens[0])
    assert torch.equal(chunked.tokens, three.tokens)
    for a, b in zip(chunked.images, three.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("budget", [4.0, 1e-9])
def test_progress_callback(pipe, budget):
    calls = []
    pipe.generate_images("a cat", n=3, seed=0, memory_budget_gb=budget, progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert {t for _, t in calls} == {3 * N_TOK}
    assert all(b > a for a, b in zip(done, done[1:]))
    assert done[-1] == 3 * N_TOK and done[0] > 0


def test_generate_images_errors(pipe):
    with pytest.raises(ValueError, match="n must be >= 1"):
        pipe.generate_images("x", n=0)
    with pytest.raises(ValueError, match="temperature"):
        pipe.generate_images("x", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        pipe.generate_images("x", top_p=2.0)
    with pytest.raises(ValueError, match="memory_budget_gb"):
        pipe.generate_images("x", memory_budget_gb=float("nan"))
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        pipe.generate_images("x", seed=-3)
    long = "cat " * 1100
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens.*1024 tokens"):
        pipe.generate_images(long)


def test_generate_batch_rows_equal_each_prompt_alone(pipe):
    """Rows of different prompts, seeds and CFG weights in one call (chunked or not) give what each
    prompt's generate_images gives alone; progress counts the tokens of all rows."""
    from januskit.sampling.logits import row_generator

    proc = pipe.processor
    rows = [("a red circle", 2, 4.0, 0), ("two small blue squares above a star", 5, 2.0, 1), ("a red circle", 2, 4.0, 1)]
    calls = []
    for budget in (4.0, 1e-9):
        out = pipe.generate_batch([proc.generation_prompt(p) for p, *_ in rows],
                                  generators=[row_generator(s, i) for _, s, _, i in rows],
                                  cfg_weight=[w for _, _, w, _ in rows], temperature=1.0, top_k=100,
                                  memory_budget_gb=budget, progress=lambda d, t: calls.append((d, t)))
        assert out.info["chunk"] == (3 if budget == 4.0 else 1) and out.latents is None
        assert out.pixels.shape == (3, 3, 128, 128) and out.uint8().shape == (3, 128, 128, 3)
        for r, (p, s, w, i) in enumerate(rows):
            alone = pipe.generate_images(p, n=i + 1, seed=s, cfg_weight=w, top_k=100)
            assert torch.equal(out.tokens[r], alone.tokens[i])
            assert np.array_equal(np.asarray(out.pil()[r]), np.asarray(alone.images[i]))
        assert calls[-1] == (3 * N_TOK, 3 * N_TOK)
    assert pipe.generate_batch([proc.generation_prompt("x")], generators=[row_generator(0, 0)]).info["cfg_weight"] \
        == pipe.default_cfg_weight == 5.0


def test_generation_arguments_are_keyword_only_and_checked(pipe):
    with pytest.raises(TypeError):
        pipe.generate_images("a cat", 2)
    with pytest.raises(TypeError):
        pipe.generate_images("a cat", n=1, cfg=5.0)  # the old name
    with pytest.raises(januskit.UnsupportedOption, match="steps: only JanusFlow") as e:
        pipe.generate_images("a cat", steps=10)
    assert e.value.option == "steps"
    with pytest.raises(ValueError, match="latents: only JanusFlow"):
        pipe.generate_images("a cat", latents=torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="generators: 1 for 2 prompts"):
        pipe.generate_batch([[1, 2], [1, 2]], generators=[torch.Generator()])
    assert pipe.own_options(temperature=0.5, steps=30) == {"temperature": 0.5}


def test_janus_style_generation_prompt(pipe_janus):
    proc = pipe_janus.processor
    tok = proc.tokenizer
    ids = proc.generation_prompt("a cat")
    assert tok.decode(ids[1:-1], skip_special_tokens=False) == "User: a cat\n\nAssistant:"
    r = pipe_janus.generate_images("a cat", n=1, seed=0)
    assert r.tokens.shape == (1, N_TOK)


# ----------------------------------------------------------------------------------------------- understanding


def test_chat_greedy_matches_reference_and_is_deterministic(pipe):
    tok = pipe.processor.tokenizer
    a = pipe.chat("Hello there", max_new_tokens=12)
    b = pipe.chat("Hello there", max_new_tokens=12)
    assert a == b
    want = ref_text_greedy(pipe, [Message("user", "Hello there")], 12)
    # the reference's text without the whitespace the first token carries after "Assistant:"
    assert a == tok.decode([t for t in want if t != tok.eos_id]).lstrip()


def test_chat_with_image_matches_reference(pipe):
    tok = pipe.processor.tokenizer
    im = picture()
    got = pipe.chat("Describe.", images=[im], max_new_tokens=10)
    want = ref_text_greedy(pipe, [Message("user", f"{IMAGE_TOKEN}\nDescribe.", [im])], 10)
    assert got == tok.decode([t for t in want if t != tok.eos_id]).lstrip()
    # the image matters
    other = ref_text_greedy(pipe, [Message("user", f"{IMAGE_TOKEN}\nDescribe.", [picture(seed=5)])], 10)
    assert other != want


def test_chat_conversation_input(pipe):
    conv = [Message("user", "hi"), Message("assistant", "hello"), Message("user", f"{IMAGE_TOKEN} what?", [picture()])]
    tok = pipe.processor.tokenizer
    want = ref_text_greedy(pipe, conv, 8, system_prompt="")
    assert pipe.chat(conv, max_new_tokens=8, system_prompt="") == \
        tok.decode([t for t in want if t != tok.eos_id]).lstrip()
    with pytest.raises(ValueError, match="inside the messages"):
        pipe.chat(conv, images=[picture()])


def test_stream_equals_non_stream(pipe):
    for kw in (dict(), dict(temperature=0.8, top_p=0.9, seed=4)):
        full = pipe.chat("Tell me about the picture", images=[picture()], max_new_tokens=25, **kw)
        pieces = list(pipe.chat_stream("Tell me about the picture", images=[picture()], max_new_tokens=25, **kw))
        assert "".join(pieces) == full
        # chat(stream=True) is an alias of chat_stream
        assert list(pipe.chat("Tell me about the picture", images=[picture()], max_new_tokens=25, stream=True,
                              **kw)) == pieces
        assert all(isinstance(p, str) and p for p in pieces)
        assert len(pieces) > 1


def test_sampled_chat_is_seeded(pipe):
    a = pipe.chat("hello", max_new_tokens=15, temperature=1.0, seed=1)
    assert a == pipe.chat("hello", max_new_tokens=15, temperature=1.0, seed=1)
    assert a != pipe.chat("hello", max_new_tokens=15, temperature=1.0, seed=2)


def test_chat_batch_equals_each_prompt_alone(pipe):
    prompts = ["hi", "Please describe this picture in great detail, thanks", "What colour?"]
    images = [[], [picture()], [picture(40, 90, seed=2)]]
    batch = pipe.chat_batch(prompts, images, max_new_tokens=12)
    alone = [pipe.chat(p, images=im, max_new_tokens=12) for p, im in zip(prompts, images)]
    assert batch == alone
    assert len(set(batch)) == 3


def test_chat_batch_sampled_row_zero_matches_alone(pipe):
    # row i samples with row_generator(seed, i): row 0 of a batch is the single-prompt answer
    batch = pipe.chat_batch(["hi", "a much longer second prompt here"], max_new_tokens=10, temperature=1.0, seed=3)
    assert batch[0] == pipe.chat("hi", max_new_tokens=10, temperature=1.0, seed=3)


class CountLogits:
    """Wraps model.text_logits: counts calls and optionally forces EOS in some rows at some step."""

    def __init__(self, model, eos=None, at=None, rows=None):
        # the class's method, so wrapping an already patched model does not stack wrappers
        self.orig = type(model).text_logits.__get__(model)
        self.eos, self.at, self.rows, self.calls = eos, at, rows, 0

    def __call__(self, hidden):
        logits = self.orig(hidden)
        if self.at is not None and self.calls == self.at:
            logits = logits.clone()
            rows = slice(None) if self.rows is None else self.rows
            logits[rows, self.eos] = 1e4
        self.calls += 1
        return logits


def test_max_new_tokens_respected(pipe, monkeypatch):
    counter = CountLogits(pipe.model)
    monkeypatch.setattr(pipe.model, "text_logits", counter)
    pipe.chat("hello", max_new_tokens=7)
    assert counter.calls == 7
    b = pipe.processor.batch([pipe.processor.encode_chat([Message("user", "hello")])])
    steps = list(generate_text(pipe.model, b, max_new_tokens=5, stop_ids=[pipe.processor.tokenizer.eos_id]))
    assert len(steps) == 5
    assert list(generate_text(pipe.model, b, max_new_tokens=0, stop_ids=[])) == []


def test_stops_at_eos(pipe, monkeypatch):
    tok = pipe.processor.tokenizer
    free = ref_text_greedy(pipe, [Message("user", "hello")], 20)
    assert tok.eos_id not in free
    counter = CountLogits(pipe.model, eos=tok.eos_id, at=4)
    monkeypatch.setattr(pipe.model, "text_logits", counter)
    ans = pipe.chat("hello", max_new_tokens=20)
    assert counter.calls == 5  # 4 tokens + EOS, then nothing more
    assert ans == tok.decode(free[:4]).lstrip()
    assert tok.eos_id not in tok.encode(ans, add_bos=False)


def test_batch_rows_stop_independently(pipe, monkeypatch):
    tok = pipe.processor.tokenizer
    prompts = ["hello", "describe a cat please"]
    free = pipe.chat_batch(prompts, max_new_tokens=10)
    monkeypatch.setattr(pipe.model, "text_logits", CountLogits(pipe.model, eos=tok.eos_id, at=3, rows=[0]))
    got = pipe.chat_batch(prompts, max_new_tokens=10)
    want0 = ref_text_greedy(pipe, [Message("user", "hello")], 3)
    assert got[0] == tok.decode(want0).lstrip()
    assert got[1] == free[1]
    # the token stream: row 0 yields EOS at step 3, then -1
    proc = pipe.processor
    b = proc.batch([proc.encode_chat([Message("user", p)]) for p in prompts])
    monkeypatch.setattr(pipe.model, "text_logits", CountLogits(pipe.model, eos=tok.eos_id, at=3, rows=[0]))
    steps = torch.stack(list(generate_text(pipe.model, b, max_new_tokens=6, stop_ids=[tok.eos_id])))
    assert steps[3, 0] == tok.eos_id and (steps[4:, 0] == -1).all() and (steps[:, 1] >= 0).all()


def test_all_rows_finished_stops_early(pipe, monkeypatch):
    tok = pipe.processor.tokenizer
    counter = CountLogits(pipe.model, eos=tok.eos_id, at=2)
    monkeypatch.setattr(pipe.model, "text_logits", counter)
    pipe.chat_batch(["a", "bb"], max_new_tokens=50)
    assert counter.calls == 3


def test_prompt_longer_than_context(pipe):
    long = "cat " * 1100
    with pytest.raises(ValueError, match=r"prompt is (\d+) tokens.*model context of 1024 tokens") as e:
        pipe.chat(long, max_new_tokens=4)
    n = int(str(e.value).split("prompt is ")[1].split()[0])
    assert n > 1024
    with pytest.raises(ValueError, match="1024"):
        pipe.chat_stream(long, max_new_tokens=4)  # raised at the call, not at the first next()


def test_answer_truncated_at_context_end(pipe, monkeypatch):
    proc = pipe.processor
    words = "cat " * 900
    T = len(proc.encode_chat([Message("user", words)]).ids)
    assert T < 1024
    counter = CountLogits(pipe.model)
    monkeypatch.setattr(pipe.model, "text_logits", counter)
    pipe.chat(words, max_new_tokens=500)
    assert counter.calls == 1024 - T


@pytest.mark.parametrize("t", [-1.0, float("nan"), float("inf")])
def test_bad_temperature(pipe, t):
    with pytest.raises(ValueError, match="temperature"):
        pipe.chat("hello", temperature=t)
    with pytest.raises(ValueError, match="temperature"):
        pipe.chat_stream("hello", temperature=t)


def test_bad_max_new_tokens_and_filters(pipe):
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.chat("hello", max_new_tokens=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.chat_stream("hello", max_new_tokens=2.5)
    with pytest.raises(ValueError, match="top_k"):
        pipe.chat("hello", temperature=1.0, top_k=-5, stream=True)
    assert pipe.chat("hello", max_new_tokens=0) == ""
    assert pipe.chat_batch([]) == []


def test_marker_mismatch_through_chat(pipe):
    with pytest.raises(ValueError, match="marker"):
        pipe.chat(f"{IMAGE_TOKEN}{IMAGE_TOKEN} two?", images=[picture()])


# ----------------------------------------------------------------------------------------------- VQ tokenizer


def test_encode_decode_image_tokens(pipe):
    ids = pipe.encode_image_tokens(picture(150, 100))
    assert ids.shape == (1, N_TOK) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 512
    two = pipe.encode_image_tokens([picture(), picture(seed=9)])
    assert two.shape == (2, N_TOK)
    assert torch.equal(two[0], pipe.encode_image_tokens(picture())[0])
    px = pipe.decode_image_pixels(two)
    assert px.shape == (2, 3, 128, 128) and px.dtype == torch.float32 and torch.isfinite(px).all()
    ims = pipe.decode_image_tokens(two)
    assert [i.size for i in ims] == [(128, 128)] * 2
    u8 = pipe.decode_image_uint8(two)
    assert u8.shape == (2, 128, 128, 3) and u8.dtype == np.uint8
    assert np.array_equal(u8[1], np.asarray(ims[1]))
    # 1-D input is one image; decoding in chunks changes nothing
    assert torch.equal(pipe.decode_image_pixels(two[0]), px[:1])
    torch.testing.assert_close(pipe.decode_image_pixels(two, batch=2), px, atol=1e-4, rtol=0)


def test_decode_image_tokens_errors(pipe):
    with pytest.raises(ValueError, match="expected 64 per image, got 63"):
        pipe.decode_image_tokens(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 512\).*512"):
        pipe.decode_image_tokens(torch.full((1, 64), 512))
    with pytest.raises(ValueError, match=r"\[0, 512\).*-1"):
        pipe.decode_image_tokens(torch.full((2, 64), -1))
    with pytest.raises(ValueError, match=r"expected shape \(n, 64\), got \(2, 2, 64\)"):
        pipe.decode_image_tokens(torch.zeros(2, 2, 64, dtype=torch.long))


def test_folder_guidance_scale_is_the_default_cfg_weight(tmp_path):
    """generation_config.json's guidance_scale (the miniature models choose theirs) becomes the pipeline's
    default: generating without cfg_weight equals generating with it; a bad value names file and key."""
    import json

    from januskit.config import ConfigError

    folder = init_checkpoint(tmp_path / "ckpt", preset_name="tiny-janus-pro", seed=0)
    assert januskit.load(folder).default_cfg_weight == 5.0  # no file: the reference's weight
    (folder / "generation_config.json").write_text(json.dumps({"guidance_scale": 2.5}))
    pipe = januskit.load(folder)
    assert pipe.default_cfg_weight == 2.5 and type(pipe).default_cfg_weight == 5.0
    ids = [pipe.processor.generation_prompt("a cat")]
    gen = lambda **kw: pipe.generate_batch(ids, generators=[torch.Generator().manual_seed(0)], temperature=0, **kw)  # noqa: E731
    default, explicit, five = gen(), gen(cfg_weight=2.5), gen(cfg_weight=5.0)
    assert default.info["cfg_weight"] == 2.5 and torch.equal(default.tokens, explicit.tokens)
    assert not torch.equal(default.tokens, five.tokens)
    for bad in ('{"guidance_scale": -1}', '{"guidance_scale": "high"}', '{"guidance_scale": true}', "[1]", "{"):
        (folder / "generation_config.json").write_text(bad)
        with pytest.raises(ConfigError, match="generation_config.json"):
            januskit.load(folder)
