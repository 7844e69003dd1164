"""Images in and out, exactly as the reference's `VLMImageProcessor` and its post-processing.

In: RGB, long side to `size` with PIL bicubic (what torchvision's resize does on a PIL image), short
side max(int(short / long * size), 14), centred on a square of the background colour
(int(mean * 255) per channel = 127), then x / 255, (x - mean) / std.
Out: clip((x + 1) / 2 * 255, 0, 255) truncated to uint8 (the reference assigns into a uint8 array).
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# What any image may cost before it is decoded. Every model here resizes to at most 384 px, so 16.8M
# pixels (4096²) is a hundred times what it can use; the side limit bounds the bicubic resize, whose
# coefficient tables grow with the long side (a 16,000,000 x 1 strip of 31 KB costs most of a GB).
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_SIDE = 8192
# Formats whose header states the size that decoding produces. ICO is not one (an entry can wrap a PNG
# of any size), nor are the rarer formats whose decoders are less exercised.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_MIME_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "pjpeg": "JPEG", "webp": "WEBP", "gif": "GIF",
                 "bmp": "BMP", "x-ms-bmp": "BMP"}


class ImageError(ValueError):
    """An image that cannot be read, or may not be: the message names the source and the problem."""


class ImageTooLarge(ImageError):
    pass


def mime_format(mime: str) -> str | None:
    """'image/png' -> 'PNG'; None for a type that is not accepted."""
    kind, _, sub = mime.strip().lower().partition("/")
    return _MIME_FORMATS.get(sub) if kind == "image" else None


def _decode_data_uri(s: str) -> tuple[bytes, str]:
    """`data:image/<type>;base64,<payload>` -> (bytes, declared MIME type)."""
    header, sep, payload = s.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageError(f"image data URI: expected 'data:image/...;base64,<data>', got {s[:40]!r}...")
    try:  # line breaks and spaces inside the payload are common in pasted URIs
        return base64.b64decode("".join(payload.split()), validate=True), header[5:-7]
    except ValueError as e:
        raise ImageError(f"image data URI: not valid base64 ({e})") from e


def load_image(src: Image.Image | str | Path | bytes, *, max_pixels: int = MAX_IMAGE_PIXELS,
               max_side: int = MAX_IMAGE_SIDE, formats: tuple[str, ...] = IMAGE_FORMATS,
               declared: str | None = None) -> Image.Image:
    """PIL image, a path, raw bytes, or a `data:image/...;base64,` URI -> RGB PIL image.

    Bytes are checked before any pixel is decoded: the format must be one of `formats` (and match the
    `declared` MIME type, or a data URI's own), and the size read from the header must be within
    `max_pixels` and `max_side`. Every failure is an `ImageError` naming the source."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    name = "<bytes>"
    if isinstance(src, (str, Path)):
        s = str(src)
        if s.startswith("data:"):
            name = "data URI"
            data, declared = _decode_data_uri(s)
        else:
            name = s
            if "\0" in s:
                raise ImageError(f"image {s!r}: the path contains a NUL byte")
            p = Path(s)
            if p.is_dir():
                raise ImageError(f"image {s}: is a directory, not an image file")
            if not p.is_file():
                raise ImageError(f"image {s}: file not found")
            data = p.read_bytes()
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        raise TypeError(f"image: expected a PIL image, a path, bytes or a data URI, got {type(src).__name__}")
    if len(data) == 0:
        raise ImageError(f"image {name}: empty (0 bytes)")
    want = None
    if declared is not None:
        want = mime_format(declared)
        if want is None or want not in formats:
            raise ImageError(f"image {name}: type {declared!r} is not accepted (accepted: "
                             f"{', '.join('image/' + f.lower() for f in formats)})")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))  # reads the header only
    except UnidentifiedImageError:
        raise ImageError(f"image {name}: not a readable image in an accepted format ({', '.join(formats)})") from None
    except Image.DecompressionBombError:  # Pillow's own check, far above ours
        raise ImageTooLarge(f"image {name}: the header declares over {2 * Image.MAX_IMAGE_PIXELS} pixels, "
                            f"over the limit of {max_pixels}") from None
    except Exception as e:  # a malformed header surfaces as any of ValueError, OSError, SyntaxError, struct.error
        raise ImageError(f"image {name}: not a readable image ({type(e).__name__}: {e})") from None
    with img:
        if want is not None and img.format != want:
            raise ImageError(f"image {name}: declared {declared!r} but the bytes are {img.format}")
        w, h = img.size
        if w * h > max_pixels:
            raise ImageTooLarge(f"image {name}: {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
        if max(w, h) > max_side:
            raise ImageTooLarge(f"image {name}: {w}x{h} has a side of {max(w, h)} px, over the limit of {max_side}")
        try:
            img.load()
            return img.convert("RGB")
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(f"image {name}: {e}") from None
        except MemoryError:
            raise ImageTooLarge(f"image {name}: out of memory decoding {w}x{h}") from None
        except Exception as e:  # truncated data, bad chunks, unsupported modes
            raise ImageError(f"image {name}: not a readable image ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class ImageTransform:
    size: int = 384
    min_size: int = 14
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale: float = 1.0 / 255.0
    normalize: bool = True  # the first Janus-1.3B upload had do_normalize false

    @property
    def background(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.mean)  # (127, 127, 127)

    def resize_pad(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        long = max(w, h)
        nw = max(int(w / long * self.size), self.min_size)
        nh = max(int(h / long * self.size), self.min_size)
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (self.size, self.size), self.background)
        canvas.paste(img, ((self.size - nw) // 2, (self.size - nh) // 2))
        return canvas

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """Square RGB image -> (3, size, size) float32, normalised."""
        # Rescale in float64 and round once to float32, as the reference's rescale does; multiplying in
        # float32 by float32(1/255) is off by one ulp for about half of the byte values.
        a = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        x = torch.from_numpy((a.astype(np.float64) * self.rescale).astype(np.float32))
        if self.normalize:
            mean = torch.tensor(self.mean).view(3, 1, 1)
            std = torch.tensor(self.std).view(3, 1, 1)
            x = (x - mean) / std
        return x

    def __call__(self, src: Image.Image | str | Path | bytes) -> torch.Tensor:
        return self.to_tensor(self.resize_pad(load_image(src)))

    @classmethod
    def from_preprocessor_config(cls, cfg: dict, size: int) -> "ImageTransform":
        return cls(size=int(cfg.get("image_size", size)), min_size=int(cfg.get("min_size", 14)),
                   mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
                   rescale=float(cfg.get("rescale_factor", 1 / 255)), normalize=bool(cfg.get("do_normalize", True)))


def center_crop_square(img: Image.Image, size: int) -> Image.Image:
    """Generation-side preprocessing (Janus-Pro report): short side to `size`, centre crop."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_gen_pixels(img: Image.Image | str | Path | bytes, size: int) -> torch.Tensor:
    """Image -> (3, size, size) in [-1, 1], the VQ tokenizer's input."""
    img = center_crop_square(load_image(img), size)
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1).copy()) / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) decoder output in [-1, 1] -> (B, H, W, 3) uint8, truncating like the reference."""
    x = pixels.float().permute(0, 2, 3, 1).cpu().numpy()
    return np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(pixels)]
