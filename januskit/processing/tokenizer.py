"""Text tokenizer for Janus / Janus-Pro / JanusFlow checkpoints.

The checkpoints ship a DeepSeek-LLM byte-level BPE ``tokenizer.json``. Special
token ids differ between checkpoints, so every id is looked up by its string at
run time; nothing here hard-codes an id except the documented presets used to
build synthetic test tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

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
    For byte-level decoders ``"".join(pushes) + flush() == tok.decode(ids)``, or its
    ``.lstrip()`` with ``lstrip=True``.

    ``lstrip``: drop the text's leading whitespace (pieces that are only whitespace come
    out empty). A chat answer needs it: the prompt ends with ``Assistant:`` and the
    first answer token carries the space that follows the colon (" 4").
    """

    def __init__(self, tok: TextTokenizer, skip_special_tokens: bool = True, lstrip: bool = False) -> None:
        self._tok = tok
        self._skip = skip_special_tokens
        self._lstrip = lstrip
        self.reset()

    def reset(self) -> None:
        self._ids: list[int] = []
        # _ids[:_read] has been emitted; _ids[_prefix:_read] is re-decoded as context
        # so decoders that treat the first token specially stay consistent.
        self._prefix = 0
        self._read = 0
        self._at_start = self._lstrip  # nothing but whitespace emitted yet

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
        return self._strip_start(new)

    def flush(self) -> str:
        """Emit whatever is held back (possibly with U+FFFD) and reset."""
        prefix_text, full_text = self._new_text()
        new = self._strip_start(full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else "")
        self.reset()
        return new

    def _strip_start(self, text: str) -> str:
        if self._at_start:
            text = text.lstrip()
            self._at_start = not text
        return text


def special_tokens_for_style(style: str) -> tuple[str, ...]:
    """Special-token strings present in a tokenizer of the given style."""
    if style not in _STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {_STYLES}")
    return _COMMON_SPECIALS + (_PRO_SPECIALS if style == "pro" else ())
