"""Text tokenizer for Janus / Janus-Pro / JanusFlow checkpoints.

The checkpoints ship a DeepSeek-LLM byte-level BPE ``tokenizer.json``. Special
token ids differ between checkpoints, so every id is looked up by its string at
run time; nothing here hard-codes an id except the documented presets used to
build synthetic test tokenizers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "IMAGE_TOKEN",
    "BOI_TOKEN",
    "EOI_TOKEN",
    "PATCH_TOKEN",
    "REF_START_TOKEN",
    "REF_END_TOKEN",
    "DET_START_TOKEN",
    "DET_END_TOKEN",
    "GROUNDING_TOKEN",
    "USER_TOKEN",
    "ASSISTANT_TOKEN",
    "BEGIN_OF_GENERATION_TOKEN",
    "TextTokenizer",
    "StreamDecoder",
    "build_synthetic_tokenizer",
    "real_special_ids",
    "special_tokens_for_style",
]

# DeepSeek strings use FULLWIDTH VERTICAL LINE (U+FF5C) and LOWER ONE EIGHTH BLOCK (U+2581).
BOS_TOKEN = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS_TOKEN = "<\uff5cend\u2581of\u2581sentence\uff5c>"
PAD_TOKEN = "<\uff5c\u2581pad\u2581\uff5c>"
IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
PATCH_TOKEN = "<patch_placeholder>"
REF_START_TOKEN = "<|ref|>"
REF_END_TOKEN = "<|/ref|>"
DET_START_TOKEN = "<|det|>"
DET_END_TOKEN = "<|/det|>"
GROUNDING_TOKEN = "<|grounding|>"
# Single tokens only in Janus-Pro tokenizers; Janus-1.3B / JanusFlow spell roles as plain text.
USER_TOKEN = "<|User|>"
ASSISTANT_TOKEN = "<|Assistant|>"
BEGIN_OF_GENERATION_TOKEN = "<\uff5cbegin\u2581of\u2581generation\uff5c>"  # JanusFlow

# Order matters: default placement puts bos, eos, pad first in the special block.
_COMMON_SPECIALS: tuple[str, ...] = (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    IMAGE_TOKEN,
    BOI_TOKEN,
    EOI_TOKEN,
    PATCH_TOKEN,
    REF_START_TOKEN,
    REF_END_TOKEN,
    DET_START_TOKEN,
    DET_END_TOKEN,
    GROUNDING_TOKEN,
    BEGIN_OF_GENERATION_TOKEN,
)
_PRO_SPECIALS: tuple[str, ...] = (USER_TOKEN, ASSISTANT_TOKEN)
_STYLES = ("pro", "janus")

_BYTE_ALPHABET_SIZE = 256  # byte-level BPE needs every byte symbol to encode arbitrary text
_REPLACEMENT_CHAR = "\ufffd"


class TextTokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with Janus-specific helpers."""

    def __init__(self, tokenizer: Tokenizer, path: str | Path | None = None) -> None:
        self._tok = tokenizer
        self._path = Path(path) if path is not None else None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load a ``tokenizer.json`` (or a directory containing one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read tokenizer file {p}: {e}") from e
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON/schema
            raise ValueError(f"invalid tokenizer file {p}: {e}") from e
        return cls(tok, p)

    @classmethod
    def from_json_str(cls, text: str, path: str | Path | None = None) -> TextTokenizer:
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:
            raise ValueError(f"invalid tokenizer JSON ({path or 'in-memory'}): {e}") from e
        return cls(tok, path)

    def to_json_str(self) -> str:
        # pretty=True so saved files are diffable; still deterministic.
        return self._tok.to_str(pretty=True)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (a directory gets ``tokenizer.json`` inside it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json_str(), encoding="utf-8")
        return p

    # ---------------------------------------------------------------- accessors
    @property
    def raw(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def path(self) -> Path | None:
        return self._path

    def _source(self) -> str:
        return str(self._path) if self._path is not None else "<in-memory tokenizer>"

    @cached_property
    def vocab_size(self) -> int:
        # get_vocab_size() counts entries, which under-reports when ids have gaps
        # (real checkpoints place specials at ~100000 with unused ids around them).
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1 if vocab else 0

    def has_token(self, token: str) -> bool:
        return self._tok.token_to_id(token) is not None

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} not found in tokenizer {self._source()}")
        return tid

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS_TOKEN)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS_TOKEN)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD_TOKEN)

    @property
    def image_id(self) -> int:
        return self.token_id(IMAGE_TOKEN)

    @property
    def boi_id(self) -> int:
        return self.token_id(BOI_TOKEN)

    @property
    def eoi_id(self) -> int:
        return self.token_id(EOI_TOKEN)

    @cached_property
    def is_pro_format(self) -> bool:
        """True when "<|User|>" encodes to one token (Janus-Pro role format)."""
        # Check encoding rather than vocab membership: what matters for prompts
        # is that the role string is not split into pieces.
        return len(self.encode(USER_TOKEN, add_bos=False)) == 1

    # ------------------------------------------------------------ encode/decode
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # The file's own post-processor may or may not add BOS; bypass it and add
        # BOS ourselves so position 0 is BOS exactly once either way.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # int() so tensors / numpy scalars work without importing torch here.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, pro={self.is_pro_format}, "
            f"source={self._source()!r})"
        )


class StreamDecoder:
    """Incremental detokenizer: ``push`` returns only newly completed text.

    Keeps a small window of ids after the last point where the decoded text was
    complete; text ending in U+FFFD (an unfinished multi-byte char) is held back.
    For byte-level decoders ``"".join(pushes) + flush() == tok.decode(ids)``.
    """

    def __init__(self, tok: TextTokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tok
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self._ids: list[int] = []
        # _ids[:_read] has been emitted; _ids[_prefix:_read] is re-decoded as context
        # so decoders that treat the first token specially stay consistent.
        self._prefix = 0
        self._read = 0

    def _new_text(self) -> tuple[str, str]:
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix :], self._skip)
        return prefix_text, full_text

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text, full_text = self._new_text()
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        new = full_text[len(prefix_text) :]
        # Drop ids that will never be needed as context again, bounding decode cost.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return new

    def flush(self) -> str:
        """Emit whatever is held back (possibly with U+FFFD) and reset."""
        prefix_text, full_text = self._new_text()
        new = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        self.reset()
        return new


# --------------------------------------------------------------------------- synthetic


def special_tokens_for_style(style: str) -> tuple[str, ...]:
    """Special-token strings present in a tokenizer of the given style."""
    if style not in _STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {_STYLES}")
    return _COMMON_SPECIALS + (_PRO_SPECIALS if style == "pro" else ())


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
