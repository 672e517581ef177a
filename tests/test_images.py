"""Decoding untrusted image files: modes, orientation, and every kind of broken input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from indexer.sources import images
from indexer.sources.images import ImageDecodeError, decode_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    base = Image.radial_gradient("L").resize((64, 48))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base, dtype=np.uint16) * 257)
        assert img.mode == "I;16"
    else:
        img = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I", "F") else "PNG"
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (64, 48)
    arr = np.asarray(out, dtype=np.float64)
    if mode not in ("1", "CMYK"):
        # Gradients survive (16-bit is rescaled, not clipped to white).
        assert arr.std() > 20


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert decode_image(_encode(img, "PNG")).getpixel((5, 5)) == (255, 255, 255)
    pal = Image.new("P", (10, 10), 0)
    pal.info["transparency"] = 0
    assert decode_image(_encode(pal, "PNG")).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(_encode(img, "JPEG", exif=exif))
    assert out.size == (20, 40)


def test_jpeg_draft_keeps_at_least_min_size():
    big = Image.radial_gradient("L").resize((2000, 1500)).convert("RGB")
    out = decode_image(_encode(big, "JPEG"), min_size=256)
    assert min(out.size) >= 256 and out.size[0] < 2000


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "image"),
])
def test_broken_bytes(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_jpeg():
    data = _encode(Image.radial_gradient("L").resize((300, 300)).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_encode(Image.new("L", (100, 100)), "PNG"))


def test_real_bomb_header_is_refused_without_decoding():
    """A PNG that claims 100k x 100k pixels: refused from its header, memory untouched."""
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    with pytest.raises(ImageDecodeError, match="too large|bomb"):
        decode_image(data)
