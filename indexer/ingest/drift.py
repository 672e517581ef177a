"""The drift check: vectors from another backend or int8 against the torch fp32 ones they stand for.

The first time a collection is embedded another way than torch fp32, a sample of what was just stored
(texts, or images read again from their paths) is embedded again in torch fp32; the mean cosine between the two and how many of each item's 10
nearest neighbours (within the sample) they share are recorded in the manifest. A low overlap is a
warning with the figures: the fast path changes what search returns."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..models import Embedder, load_embedder, resolve_runtime, respec
from ..sources.images import ImageDecodeError, decode_image
from ..store import Collection

log = logging.getLogger(__name__)

SAMPLE = 256
IMAGE_SAMPLE = 128  # torch fp32 runs a CNN at a few images/s on a busy CPU: the check stays under a minute
K = 10
MIN_OVERLAP = 0.95  # below this a user would see other results than fp32's: warn


def needs_check(coll: Collection, embedder: Embedder) -> bool:
    spec = embedder.spec
    if spec.modality not in ("text", "image") or (spec.backend == "torch" and spec.precision != "int8"):
        return False  # the float precisions are fp32 up to rounding
    drift = coll.manifest.drift
    return drift is None or (drift["backend"], drift["precision"]) != (spec.backend, spec.precision)


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = K) -> float:
    """Mean share of each row's k nearest other rows (by inner product) that `a` and `b` agree on."""
    k = min(k, len(a) - 1)
    if k < 1:
        return 1.0
    overlap = []
    for vectors in (a, b):
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        overlap.append(np.argpartition(-sims, k - 1, axis=1)[:, :k])
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(*overlap)]))


def measure(fast: np.ndarray, fp32: np.ndarray) -> dict[str, float]:
    """Figures for stored vectors `fast` against fp32 ones of the same items (both L2-normalised)."""
    return {"mean_cosine": round(float((fast * fp32).sum(1).mean()), 4),
            "overlap_at_10": round(neighbour_overlap(fast, fp32), 4)}


def check_drift(coll: Collection, embedder: Embedder, sample: int | None = None) -> dict | None:
    """Measure and record the drift of `embedder`'s way against torch fp32 on up to `sample` stored
    texts or images (read again from their paths); warn past the threshold. Returns what was recorded
    (None when there was nothing to sample)."""
    started = time.perf_counter()
    spec = embedder.spec
    field = "text" if spec.modality == "text" else "path"
    sample = sample or (SAMPLE if field == "text" else IMAGE_SAMPLE)
    rows = [r for batch in coll.scan([field, "vector"]) for r in batch.to_pylist() if r[field]]
    if len(rows) < 2:
        return None
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in sorted(rng.choice(len(rows), min(sample, len(rows)), replace=False))]
    reference = load_embedder(respec(spec), resolve_runtime("cpu", "fp32"))
    if field == "text":
        items = [r["text"] for r in rows]
    else:  # decoded as ingest decodes them; an image gone since is left out
        items, kept = [], []
        for r in rows:
            try:
                items.append(decode_image(Path(r["path"]).read_bytes(), spec.preprocessing.get("resize")))
                kept.append(r)
            except (OSError, ImageDecodeError):
                continue
        rows = kept
        if len(rows) < 2:
            return None
    fast = np.array([r["vector"] for r in rows], dtype=np.float32)
    fast /= np.linalg.norm(fast, axis=1, keepdims=True).clip(min=1e-12)
    fp32 = reference.embed(items)
    drift = {"backend": spec.backend, "precision": spec.precision, "sample": len(rows), **measure(fast, fp32),
             "min_overlap": MIN_OVERLAP, "seconds": round(time.perf_counter() - started, 2)}
    coll.manifest.drift = drift
    coll.save_manifest()
    if drift["overlap_at_10"] < MIN_OVERLAP:
        log.warning("%s %s drifts from torch fp32: neighbour overlap@10 %.3f (under %.2f), mean cosine %.4f "
                    "on %d stored items; search results will differ from fp32's", spec.backend, spec.precision,
                    drift["overlap_at_10"], MIN_OVERLAP, drift["mean_cosine"], len(rows))
    else:
        log.info("%s %s vs torch fp32: neighbour overlap@10 %.3f, mean cosine %.4f (%d items)", spec.backend,
                 spec.precision, drift["overlap_at_10"], drift["mean_cosine"], len(rows))
    return drift
