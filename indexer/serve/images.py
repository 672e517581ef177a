"""Images in and out: uploaded query images decoded under this server's limits, and the image files a
collection recorded, served whole or as cached thumbnails."""

from __future__ import annotations

import functools
import io
from pathlib import Path

from ..sources.images import IMAGE_EXTENSIONS, ImageDecodeError, ImageTooLarge, decode_image
from .service import NotFound, Served, ServeError, Service, TooLarge, UnsupportedMedia

MAX_PIXELS = 40_000_000  # a 40-megapixel photo; the ingest guard (decode_image) allows more


def check_upload(data: bytes, max_pixels: int):
    """Decode an upload with the ingest guard (pixel bombs, corrupt and non-image files) and this
    server's tighter pixel limit."""
    from PIL import Image

    if not data:
        raise ServeError("the uploaded image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:  # PIL's own guard (twice its warning size) on the header
        raise TooLarge(f"image too large: {exc}") from None
    except Image.UnidentifiedImageError:
        raise UnsupportedMedia("the upload is not an image in a known format (JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds on broken headers
        raise ServeError(f"corrupt image: {exc}") from None
    if width * height > max_pixels:
        raise TooLarge(f"image too large: {width}x{height} pixels (limit {max_pixels})")
    try:
        return decode_image(data)
    except ImageTooLarge as exc:
        raise TooLarge(str(exc)) from None
    except ImageDecodeError as exc:
        raise ServeError(str(exc)) from None


def recorded_image(service: Service, served: Served, item_id: str) -> Path:
    """The image file the collection recorded for this item, and nothing else: the id is only a key
    into the table, never part of a file path."""
    if served.modality != "image" or "path" not in served.coll.result_columns():
        raise NotFound(f"collection {served.name!r} records no image files")
    recorded = service.row(served, item_id, ["id", "path"]).get("path")
    if not recorded or Path(recorded).suffix.lower() not in IMAGE_EXTENSIONS:
        raise NotFound(f"item {item_id!r} has no image file recorded")
    path = Path(recorded)
    if not path.is_file():
        raise NotFound(f"the image recorded for {item_id!r} is no longer on disk")
    return path


@functools.lru_cache(maxsize=512)
def thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
    """A JPEG at most `size` pixels on a side (cached per file version: mtime_ns is part of the key)."""
    img = decode_image(Path(path).read_bytes(), min_size=size)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()
