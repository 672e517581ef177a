"""Reading a collection back for dedup: its vectors in stored order, and a stored item (text or image).

>>> vecs = load_vectors(Collection.open("photos.idx"))              # doctest: +SKIP
>>> vecs.x.shape, vecs.ids[:1]                                      # doctest: +SKIP
((1000, 1280), ['cat.jpg'])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...store import Collection
from .records import Vectors


def load_vectors(coll: Collection) -> Vectors:
    from ...index.exact import normalized

    ids: list[str] = []
    hashes: list[str] = []
    n = coll.count()
    if n == 0:
        raise coll.empty()
    x = np.empty((n, coll.spec.dim), dtype=np.float32)  # filled in place: one copy of GBs, not two
    for batch in coll.scan(["id", "content_hash", "vector"], batch_size=65536):
        block = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
        if len(ids) + batch.num_rows > len(x):  # a writer appended since count(): make room
            x = np.concatenate([x, np.empty((len(ids) + batch.num_rows - len(x), x.shape[1]), np.float32)])
        x[len(ids) : len(ids) + batch.num_rows] = normalized(block)  # per batch: no full-size temporary
        ids.extend(batch.column("id").to_pylist())
        hashes.extend(batch.column("content_hash").to_pylist())
    return Vectors(ids, hashes, x[: len(ids)])


def load_item(value, modality: str):
    """A stored text, or the image file at `value` decoded as ingest decodes it (EXIF orientation, the
    decompression-bomb guard); None when it is gone or unreadable."""
    if value is None:
        return None
    if modality == "text":
        return value
    from ...sources.images import ImageDecodeError, decode_image

    try:
        return decode_image(Path(value).read_bytes())
    except (ImageDecodeError, OSError):
        return None
