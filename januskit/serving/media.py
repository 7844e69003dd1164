"""Images over the wire: data: URLs (or bare base64) and uploaded files in, PNG base64 out.

A server must not fetch what a client points at: remote URLs and local paths are refused, so a
request can neither make the server reach the network nor read its disk. The format and pixel count
are checked from the header before any decoding, so a small file that inflates to gigapixels is refused
cheaply, and a declared type must match the bytes.
"""
from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from ..processing.image import ImageError, ImageTooLarge, load_image
from .errors import APIError


def decode_image_url(url: str, param: str, max_pixels: int) -> Image.Image:
    """`data:image/...;base64,...` or bare base64 -> RGB image; anything else is a 400 naming `param`.
    The declared type must match the bytes; size limits are checked from the header (load_image)."""
    s = url.strip()
    if s.startswith(("http://", "https://", "ftp://", "file:", "/", "./", "~")):
        raise APIError(400, f"{param}: only data: URLs (base64) are accepted; remote URLs and file paths are "
                       "refused by design", param=param, code="invalid_image_url")
    declared = None
    if s.startswith("data:"):
        header, sep, s = s.partition(",")
        if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise APIError(400, f"{param}: expected 'data:image/<type>;base64,<data>', got {header[:40]!r}",
                           param=param, code="invalid_image_url")
        declared = header[5:-7]
    try:
        data = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param}: not valid base64 ({e})", param=param, code="invalid_image") from None
    return decode_image_bytes(data, param, max_pixels, declared)


def decode_image_bytes(data: bytes, param: str, max_pixels: int, declared: str | None = None) -> Image.Image:
    """Image bytes (a data: URL's, an uploaded file's) -> RGB image; a 400 naming `param` if they are not
    an accepted image, or one over the limits (checked from the header, by load_image)."""
    try:
        return load_image(data, max_pixels=max_pixels, declared=declared)
    except ImageTooLarge as e:
        raise APIError(400, f"{param}: {_strip(e)}", param=param, code="image_too_large") from None
    except ImageError as e:
        raise APIError(400, f"{param}: {_strip(e)}", param=param, code="invalid_image") from None


def _strip(e: Exception) -> str:
    return str(e).removeprefix("image <bytes>: ")


def png_base64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
