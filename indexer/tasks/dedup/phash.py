"""The perceptual-hash signal: a flip-invariant DCT hash of an image, and pairs rescored by it.

`combined` scores a pair by the mean of its cosine and its pHash similarity (`dedup --signal combined`).
"""

from __future__ import annotations

import numpy as np

from ...store import Collection
from .records import Pairs, Vectors
from .stored import load_item


def phash(img, flipped: bool = False) -> np.ndarray:
    """64-bit DCT perceptual hash as a bool array: grayscale 32x32, 2-D DCT-II, the 8x8 lowest frequencies
    (DC left out: it only encodes brightness), each bit = coefficient above their median."""
    from PIL import Image, ImageOps
    from scipy.fft import dctn

    g = img.convert("L")
    if flipped:
        g = ImageOps.mirror(g)
    a = np.asarray(g.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    coeffs = dctn(a, type=2, norm="ortho")[:8, :8].ravel()[1:]
    return coeffs > np.median(coeffs)


def phash_pair(img) -> np.ndarray:
    """The hash of an image and of its mirror image, (2, 63): comparing against both makes it flip-invariant."""
    return np.stack([phash(img), phash(img, flipped=True)])


def phash_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """1 - normalised Hamming distance, the best over a's unmirrored hash against b's two."""
    a0 = a[0] if a.ndim == 2 else a
    bs = b if b.ndim == 2 else b[None]
    return float(max(1 - np.count_nonzero(a0 != bb) / a0.size for bb in bs))


def rescore_combined(coll: Collection, vecs: Vectors, pairs: Pairs, threshold: float) -> Pairs:
    """Score = (cosine + pHash similarity) / 2; keep pairs at or above the threshold (identical files always).
    Each image involved is decoded once."""
    i, j, s, e = pairs
    involved = np.unique(np.concatenate([i, j])).tolist()
    rows = coll.rows_by_id([vecs.ids[p] for p in involved], columns=["id", "path"])
    hashes = {}
    for p in involved:
        img = load_item(rows.get(vecs.ids[p], {}).get("path"), "image")
        hashes[p] = None if img is None else phash_pair(img)
    score = np.array([(sc + (phash_similarity(hashes[a], hashes[b]) if hashes[a] is not None and hashes[b] is not None
                             else sc)) / 2 for a, b, sc in zip(i.tolist(), j.tolist(), s.tolist())], dtype=np.float32)
    keep = (score >= threshold) | e
    return i[keep], j[keep], np.where(e, s, score)[keep], e[keep]
