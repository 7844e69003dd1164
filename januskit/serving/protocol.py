"""The OpenAI wire format: request bodies, error bodies, and chat messages -> januskit Messages.

Requests are pydantic models with `extra="forbid"`, so a misspelt or unsupported field is refused by
name instead of being silently ignored. Every refusal is an `APIError`, rendered as OpenAI's
`{"error": {"message", "type", "param", "code"}}` body. Image edits come as multipart/form-data: the
text fields are checked by the same kind of model (form values are strings, which pydantic converts),
the files are the source images.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import FormData, UploadFile

from ..processing.chat import Message
from ..processing.tokenizer import IMAGE_TOKEN
from .errors import APIError
from .media import decode_image_url


_TYPE_TAGS = ("str", "int", "float", "bool", "none", "list", "dict")
_PART_TYPES = ("text", "image_url")


def field_path(loc: tuple) -> str:
    """pydantic's error location -> the field path a client wrote: ('body', 'messages', 0, 'content')
    -> 'messages[0].content'. Union-branch tags (a type name, or a content part's `type` value after its
    index) are not fields and are dropped."""
    out = ""
    for i, part in enumerate(loc):
        if part in ("body", "query"):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif any(c in str(part) for c in "[(,") or part in _TYPE_TAGS:
            continue
        elif part in _PART_TYPES and i and isinstance(loc[i - 1], int) and i + 1 < len(loc):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _unicode(cls, v: object) -> object:
        # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer (or UTF-8 response) takes.
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"text is not valid Unicode (a lone surrogate at character {e.start})") from None
        return v


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted, meaningless here (one fixed resolution)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # default 0: the reference's greedy decoding
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None


class ImageGenerationRequest(_Strict):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    # The CFG weight; None = the architecture's default. `guidance` is its older name, still accepted
    # (one of the two: given both, `guidance` is refused as an unknown field).
    cfg_weight: float | None = Field(None, ge=0.0, le=100.0, validation_alias=AliasChoices("cfg_weight", "guidance"))
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # Janus token sampling (default 1); not JanusFlow
    steps: int | None = Field(None, ge=1, le=200)  # JanusFlow's Euler steps; None = 30
    response_format: Literal["b64_json"] = "b64_json"
    size: str | None = None  # only the model's own side, e.g. "384x384"
    user: str | None = None


class ImageEditRequest(_Strict):
    """The text fields of POST /v1/images/edits (the images are the form's files: see edit_form)."""
    prompt: str = Field(min_length=1)  # the instruction (with strength: the prompt of the new image)
    model: str | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    # The text guidance weight (generations' cfg_weight; `cfg_text` is pipe.edit_image's name for it, one
    # of the two) and the image guidance weight (default 1.5); None = the defaults.
    cfg_weight: float | None = Field(None, ge=0.0, le=100.0, validation_alias=AliasChoices("cfg_weight", "cfg_text"))
    cfg_image: float | None = Field(None, ge=0.0, le=100.0)
    # Training-free image-to-image instead of an edit by instruction: how much of the one source is replaced.
    strength: float | None = Field(None, gt=0.0, le=1.0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # Janus token sampling (default 1); not JanusFlow
    steps: int | None = Field(None, ge=1, le=200)  # JanusFlow's Euler steps; None = 30
    response_format: Literal["b64_json"] = "b64_json"
    size: str | None = None  # only the model's own side, e.g. "384x384"
    user: str | None = None


IMAGE_FIELDS = ("image", "image[]")  # one source, or several as repeated fields (the openai client's image[])


def edit_form(form: FormData) -> tuple[dict[str, str], list[tuple[str, UploadFile]]]:
    """A multipart form -> (its text fields, for ImageEditRequest; its source images as (param, file), in
    order). Refused by name: a text value where an image file belongs, a file in any other field (OpenAI's
    inpainting `mask` among them), a text field given twice."""
    fields: dict[str, str] = {}
    files: list[UploadFile] = []
    for key, value in form.multi_items():
        if key in IMAGE_FIELDS:
            if not isinstance(value, UploadFile):
                raise APIError(400, f"{key}: expected an image file (a multipart file part), got a text value",
                               param=key, code="invalid_image")
            files.append(value)
        elif isinstance(value, UploadFile):
            why = ("inpainting masks are not supported (the instruction says what to change)" if key == "mask"
                   else "unknown or unsupported field (the source images go in `image`)")
            raise APIError(400, f"{key}: {why}", param=key)
        elif key in fields:
            raise APIError(400, f"{key}: given more than once", param=key)
        else:
            fields[key] = value
    params = ["image"] if len(files) == 1 else [f"image[{i}]" for i in range(len(files))]
    return fields, list(zip(params, files))


def to_messages(req: ChatCompletionRequest, *, max_images: int, max_pixels: int) -> tuple[list[Message], str | None]:
    """OpenAI messages -> (januskit Messages, system prompt or None for the model's default). Text parts
    are joined; each image part becomes an image marker at its place in the text."""
    system: list[str] = []
    out: list[Message] = []
    n_images = 0
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role == "system":
            if out:
                raise APIError(400, f"{where}: a system message must come before the conversation", param=f"{where}.role")
            if not isinstance(m.content, str) and any(p.type == "image_url" for p in m.content):
                raise APIError(400, f"{where}: a system message cannot hold images", param=f"{where}.content")
            system.append(m.content if isinstance(m.content, str) else "".join(p.text for p in m.content))
            continue
        if IMAGE_TOKEN in (m.content if isinstance(m.content, str) else "".join(
                p.text for p in m.content if p.type == "text")):
            raise APIError(400, f"{where}: the text may not contain the reserved string {IMAGE_TOKEN!r}; send images "
                           "as image_url parts", param=f"{where}.content")
        if isinstance(m.content, str):
            out.append(Message(m.role, m.content))
            continue
        text, images = "", []
        for j, part in enumerate(m.content):
            if part.type == "text":
                text += part.text
                continue
            if m.role != "user":
                raise APIError(400, f"{where}: only user messages can hold images", param=f"{where}.content[{j}]")
            n_images += 1
            if n_images > max_images:
                raise APIError(400, f"at most {max_images} images per request", param=f"{where}.content[{j}]")
            images.append(decode_image_url(part.image_url.url, f"{where}.content[{j}].image_url.url", max_pixels))
            text += ("" if not text or text.endswith("\n") else "\n") + IMAGE_TOKEN + "\n"
        out.append(Message(m.role, text, images))
    if not out or out[-1].role != "user":
        raise APIError(400, "the last message must be the user's", param=f"messages[{len(req.messages) - 1}].role")
    for i, m in enumerate(out):
        if (m.role == "user") != (i % 2 == 0):
            raise APIError(400, "user and assistant messages must alternate, starting with user", param="messages")
    return out, ("\n".join(system) if system else None)
