"""Decoding untrusted image files into RGB: EXIF orientation, every PIL mode, a pixel-count guard."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Larger than any camera photo; a decompression bomb claims billions of pixels in a few KB.
MAX_PIXELS = 150_000_000


class ImageDecodeError(ValueError):
    pass


class ImageTooLarge(ImageDecodeError):
    """More pixels than the guard allows (a decompression bomb, or just too big to decode)."""


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
    """Bytes -> RGB image, oriented as the camera meant it.

    `min_size` lets JPEG decoding scale down by 2/4/8 in the DCT while keeping both sides at least
    that large: much less work for big photos that will be resized to ~256 anyway.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ImageTooLarge(f"image too large: {img.width}x{img.height} pixels (limit {MAX_PIXELS})")
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image too large (decompression bomb guard): {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image (unrecognised format)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc


def plain_jpeg(data: bytes) -> bool:
    """Whether a JPEG decoder alone (nvjpeg on a GPU) decodes `data` to what `decode_image` gives: a
    complete JPEG (it ends with its end-of-image marker: a truncated one goes to PIL, which reports it),
    RGB or greyscale, upright (no EXIF rotation), within the pixel guard. Reads the header only."""
    if data[:3] != b"\xff\xd8\xff" or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return False
    try:
        img = Image.open(io.BytesIO(data))
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - anything odd is decode_image's to report
        return False
    return img.format == "JPEG" and img.mode in ("RGB", "L") and img.width * img.height <= MAX_PIXELS \
        and orientation == 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparency is composited on white; 16-bit and float images are
    rescaled rather than clipped (a plain convert() saturates them to white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
