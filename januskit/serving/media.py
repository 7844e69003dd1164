"""Images over the wire: data: URLs (or bare base64) in, PNG base64 out.

A server must not fetch what a client points at: remote URLs and local paths are refused, so a
request can neither make the server reach the network nor read its disk. The pixel count is checked
from the header before any decoding, so a small file that inflates to gigapixels is refused cheaply.
"""
from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from ..processing.image import load_image
from .errors import APIError


def decode_image_url(url: str, param: str, max_pixels: int) -> Image.Image:
    """`data:image/...;base64,...` or bare base64 -> RGB image; anything else is a 400 naming `param`."""
    s = url.strip()
    if s.startswith(("http://", "https://", "ftp://", "file:", "/", "./", "~")):
        raise APIError(400, f"{param}: only data: URLs (base64) are accepted; remote URLs and file paths are "
                       "refused by design", param=param, code="invalid_image_url")
    if s.startswith("data:"):
        header, sep, s = s.partition(",")
        if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise APIError(400, f"{param}: expected 'data:image/<type>;base64,<data>', got {header[:40]!r}",
                           param=param, code="invalid_image_url")
    try:
        data = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param}: not valid base64 ({e})", param=param, code="invalid_image") from e
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only: no pixels decoded yet
            w, h = probe.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise APIError(400, f"{param}: not a readable image ({e})", param=param, code="invalid_image") from e
    if w * h > max_pixels:
        raise APIError(400, f"{param}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}",
                       param=param, code="image_too_large")
    try:
        return load_image(data)
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_image") from e


def png_base64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
