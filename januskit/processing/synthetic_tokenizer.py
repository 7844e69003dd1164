"""A byte-level BPE tokenizer built here, for random-weight presets and the miniature world: trained
on a small built-in corpus (plus any seed text), with every Janus special token placed at a chosen id."""
from __future__ import annotations

import json
from collections.abc import Mapping

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .tokenizer import (ASSISTANT_TOKEN, BEGIN_OF_GENERATION_TOKEN, BOI_TOKEN, BOS_TOKEN, DET_END_TOKEN, DET_START_TOKEN,
                        EOI_TOKEN, EOS_TOKEN, GROUNDING_TOKEN, IMAGE_TOKEN, PAD_TOKEN, PATCH_TOKEN, REF_END_TOKEN,
                        REF_START_TOKEN, USER_TOKEN, TextTokenizer, special_tokens_for_style)

_BYTE_ALPHABET_SIZE = 256  # byte-level BPE needs every byte symbol to encode arbitrary text
def real_special_ids(preset: str) -> dict[str, int]:
    """Special-token ids for full-size (vocab 102400) synthetic tokenizers.

    Known from real checkpoints: bos 100000, eos 100001, pad 100002 (Pro-7B: 100015),
    <image_placeholder> 100581 (Pro-7B: 100594). ALL OTHER IDS ARE PLACEHOLDERS chosen
    only to be distinct and plausible; runtime code must always look ids up by string.
    """
    key = preset.lower()
    if key in ("janus-1.3b", "janus-pro-1b", "janusflow-1.3b"):  # JanusFlow-1.3B: assumed as Janus-1.3B
        pad, image = 100002, 100581
    elif key == "janus-pro-7b":
        pad, image = 100015, 100594
    else:
        raise ValueError(
            f"unknown preset {preset!r}; expected 'janus-1.3b', 'janus-pro-1b', 'janus-pro-7b' or 'janusflow-1.3b'"
        )
    ids = {BOS_TOKEN: 100000, EOS_TOKEN: 100001, PAD_TOKEN: pad, IMAGE_TOKEN: image}
    # Placeholders: laid out right after <image_placeholder>.
    rest = [
        PATCH_TOKEN,
        BOI_TOKEN,
        EOI_TOKEN,
        REF_START_TOKEN,
        REF_END_TOKEN,
        DET_START_TOKEN,
        DET_END_TOKEN,
        GROUNDING_TOKEN,
        BEGIN_OF_GENERATION_TOKEN,
    ]
    if key not in ("janus-1.3b", "janusflow-1.3b"):
        rest += [USER_TOKEN, ASSISTANT_TOKEN]
    for offset, tok in enumerate(rest, start=1):
        ids[tok] = image + offset
    return ids


_COLOURS = (
    "red orange yellow green blue purple violet pink brown black white gray grey "
    "cyan magenta teal navy maroon olive golden silver beige turquoise crimson"
).split()
_SHAPES = (
    "circle square triangle rectangle oval star hexagon pentagon diamond cube sphere "
    "cylinder cone pyramid heart arrow line curve dot ring spiral cross"
).split()
_POSITIONS = (
    "left of|right of|above|below|next to|behind|in front of|inside|outside|on top of|"
    "underneath|beside|between the corners and|near the center of|far from"
).split("|")
_SIZES = "small large tiny huge medium big little enormous narrow wide tall short".split()
_OBJECTS = (
    "cat dog bird horse car bicycle tree flower house mountain river boat lamp chair "
    "table window door cup bottle book clock apple banana robot person child"
).split()
_NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()

_SENTENCES = """\
What color is the shape in the top left corner of the image?
How many circles can you see in this picture?
Describe the image in detail.
The image shows a simple scene with several geometric shapes.
There is a bright background with soft lighting and gentle shadows.
Question: Which object is closest to the camera? Answer: the red cube.
Answer the question using a single word or phrase.
Please generate an image of a sunset over the ocean with purple clouds.
A photograph of a quiet street at night, with wet pavement reflecting neon signs.
Is the triangle larger than the square? Yes, it is noticeably larger.
Count the number of stars and report the total.
Where is the blue sphere located relative to the green cone?
The drawing is made with thick black outlines and flat colors.
Identify every shape and give its position as coordinates.
This picture was taken outdoors during a cloudy afternoon.
Explain why the shadow points towards the right side of the frame.
The answer is four, because two small squares overlap two large ones.
User: Can you describe this diagram? Assistant: Certainly, it contains three nodes.
Generate a realistic portrait with natural skin tones and a blurred background.
The horizon divides the image into a darker upper half and a lighter lower half.
Which quadrant contains the most objects? The bottom right quadrant.
Please locate the yellow star and draw a bounding box around it.
An abstract painting with swirling strokes of orange, teal and gold.
The text in the image reads: OPEN 24 HOURS.
In the middle of the picture, a small robot holds a glowing lamp.
Rotate the rectangle by ninety degrees and describe the result.
Zoom in on the upper part of the image; what do you notice?
The pixels along the edge are slightly blurry because of compression.
Mathematics question: what is 12 plus 30? The result is 42.
The resolution of the image is 384 by 384 pixels, split into 24 by 24 patches.
""".splitlines()

_TEMPLATES = (
    "A {size} {colour} {shape} is {position} the {colour2} {shape2}.",
    "Q: What is {position} the {shape}? A: A {colour} {obj}.",
    "There are {number} {colour} {shape}s in the image.",
    "The {obj} is {colour}, and it sits {position} a {size} {shape}.",
    "Is there a {colour} {obj} in the picture? No, but there is a {colour2} {shape2}.",
    "Draw {number} {size} {shape}s in {colour} on a {colour2} background.",
)


def _builtin_corpus() -> list[str]:
    """Deterministic small English corpus (hand-written lines + templated lines)."""
    lines = list(_SENTENCES)
    n = 720
    for i in range(n):
        # Co-prime strides walk through the word lists without randomness.
        lines.append(
            _TEMPLATES[i % len(_TEMPLATES)].format(
                size=_SIZES[(i * 5) % len(_SIZES)],
                colour=_COLOURS[(i * 7) % len(_COLOURS)],
                colour2=_COLOURS[(i * 11 + 3) % len(_COLOURS)],
                shape=_SHAPES[(i * 3) % len(_SHAPES)],
                shape2=_SHAPES[(i * 13 + 5) % len(_SHAPES)],
                position=_POSITIONS[(i * 17) % len(_POSITIONS)],
                obj=_OBJECTS[(i * 19) % len(_OBJECTS)],
                number=_NUMBERS[i % len(_NUMBERS)],
            )
        )
    lines.append(" ".join(str(k) for k in range(0, 1000, 7)))  # some digit merges
    return lines


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # In the spirit of DeepSeek-LLM: digits split into chunks of <= 3, then byte-level.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _place_special_ids(
    vocab_size: int, specials: tuple[str, ...], special_ids: Mapping[str, int]
) -> dict[str, int]:
    placed: dict[str, int] = {}
    owner: dict[int, str] = {}
    for tok, tid in special_ids.items():
        if not isinstance(tid, int) or isinstance(tid, bool):
            raise ValueError(f"special id for {tok!r} must be an int, got {tid!r}")
        if not 0 <= tid < vocab_size:
            raise ValueError(
                f"special id {tid} for {tok!r} is outside the vocabulary [0, {vocab_size})"
            )
        if tid in owner:
            raise ValueError(f"special ids collide: {owner[tid]!r} and {tok!r} both map to {tid}")
        owner[tid] = tok
        placed[tok] = tid
    remaining = [t for t in specials if t not in placed]
    # Default placement: highest free ids, ascending, in declaration order (bos, eos, pad first).
    free_top: list[int] = []
    tid = vocab_size - 1
    while len(free_top) < len(remaining) and tid >= 0:
        if tid not in owner:
            free_top.append(tid)
        tid -= 1
    if len(free_top) < len(remaining):
        raise ValueError(f"vocab_size {vocab_size} cannot hold {len(specials)} special tokens")
    for tok, tid in zip(remaining, sorted(free_top)):
        placed[tok] = tid
    return placed


def build_synthetic_tokenizer(
    vocab_size: int,
    *,
    style: str = "pro",
    special_ids: dict[str, int] | None = None,
    seed_text: str | None = None,
) -> TextTokenizer:
    """Train a small byte-level BPE holding the real Janus special-token strings.

    Specials take the last ids below ``vocab_size`` (bos, eos, pad first) unless
    ``special_ids`` places them exactly; tokens in ``special_ids`` that the style
    does not define are added as extra specials. BPE tokens fill the lowest free
    ids; if the corpus runs out of merges, ids between BPE and specials stay unused.
    """
    specials = special_tokens_for_style(style)
    given = dict(special_ids or {})
    specials = specials + tuple(t for t in given if t not in specials)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    n_bpe = vocab_size - len(specials)
    if n_bpe < _BYTE_ALPHABET_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: need at least "
            f"{_BYTE_ALPHABET_SIZE + len(specials)} ({_BYTE_ALPHABET_SIZE} byte tokens + "
            f"{len(specials)} special tokens for style {style!r})"
        )
    placed = _place_special_ids(vocab_size, specials, given)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    # Mimic a checkpoint whose post-processor adds BOS; TextTokenizer.encode bypasses it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, placed[BOS_TOKEN])],
    )
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    corpus = _builtin_corpus()
    if seed_text:
        corpus += seed_text.splitlines()
    tok.train_from_iterator(corpus, trainer=trainer)

    data = json.loads(tok.to_str())
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    if len(trained) > n_bpe:  # cannot happen with n_bpe >= 256, guard anyway
        raise ValueError(f"BPE trainer produced {len(trained)} tokens for {n_bpe} free ids")
    # Remap BPE tokens onto the lowest ids not taken by specials; merges refer to
    # strings, not ids, so only the vocab needs rewriting.
    taken = set(placed.values())
    free_ids = (i for i in range(vocab_size) if i not in taken)
    vocab: dict[str, int] = {piece: next(free_ids) for piece, _ in trained}
    clash = [t for t in placed if t in vocab]
    if clash:
        raise ValueError(f"special tokens {clash} were also learned as BPE pieces")
    # `tokenizers` ignores the ids in "added_tokens" on load and renumbers them after
    # the model vocab; listing the specials in the model vocab too pins their ids.
    vocab.update(placed)
    data["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    data["added_tokens"] = [
        {
            "id": tid,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for t, tid in sorted(placed.items(), key=lambda kv: kv[1])
    ]
    result = TextTokenizer.from_json_str(json.dumps(data, ensure_ascii=False))
    _check_ids(result, placed)
    return result


def _check_ids(tok: TextTokenizer, placed: Mapping[str, int]) -> None:
    # Fail loudly if a tokenizers version renumbers tokens instead of honouring our ids.
    for t, tid in placed.items():
        got = tok.raw.token_to_id(t)
        enc = tok.encode(t, add_bos=False)
        if got != tid or enc != [tid]:
            raise RuntimeError(f"tokenizers placed {t!r} at {got} / encoded {enc}, expected {tid}")
