"""Self-calibration for dedup: known edits applied to a sample of the collection's own items.

Each sampled item is transformed (images: resize, JPEG re-compression, 90% crop, brightness, flip,
grayscale, format change; text: typos, reordered sentences, added boilerplate) and embedded with the
collection's model. The transformed copies are the positives (7 or 3 per item); each sampled item's 15
nearest *other* stored items are its negatives (so the estimate is not tilted towards precision by counting
many positives against one negative each). Both compare the sampled item's stored vector: with a copy's
embedding (positives) or a neighbour's stored vector (negatives). For every threshold we count the positives kept (recall) and the negatives
let through (precision = kept positives / everything kept), per signal:
- `embedding`: cosine of the embeddings;
- `phash`: a DCT perceptual hash (phash.py), flip-invariant, as 1 - Hamming distance / 64 (images);
- `combined`: the mean of the two (images).
The best threshold per signal is the one with the highest F1; the best signal is reported too.

>>> calibrate("photos.idx", sample=100).best                      # doctest: +SKIP
{'signal': 'combined', 'threshold': 0.84, 'precision': 0.99, 'recall': 0.97, 'f1': 0.98}
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ...errors import IndexerError
from ...store import Collection
from .phash import phash_pair, phash_similarity
from .stored import load_item, load_vectors
from .transforms import IMAGE_TRANSFORMS, TEXT_TRANSFORMS

THRESHOLDS = np.round(np.arange(0.50, 0.995, 0.01), 2)


@dataclass
class Calibration:
    collection: str
    modality: str
    sample: int
    transforms: list[str]
    best: dict[str, Any]
    signals: dict[str, dict[str, Any]]  # signal -> {"best": {...}, "curve": [{threshold, precision, recall, f1}]}
    per_transform: dict[str, dict[str, float]] = field(default_factory=dict)  # recall at the best threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"calibration on {self.sample} items of {self.collection} ({self.modality}); "
                 f"transforms: {', '.join(self.transforms)}",
                 f"{'signal':10} {'threshold':>9} {'precision':>9} {'recall':>7} {'f1':>6}"]
        for name, sig in self.signals.items():
            b = sig["best"]
            lines.append(f"{name:10} {b['threshold']:>9.2f} {b['precision']:>9.3f} {b['recall']:>7.3f} {b['f1']:>6.3f}")
        b = self.best
        lines.append(f"best: {b['signal']} at {b['threshold']:.2f} (use `--threshold {b['threshold']:.2f}"
                     + (" --signal combined" if b["signal"] == "combined" else "") + "`)")
        lines.append("recall per transform at that threshold: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in self.per_transform.items()))
        return "\n".join(lines)


def curve(pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> list[dict[str, float]]:
    """Precision and recall at each threshold: positives are transformed copies, negatives the nearest
    distinct items (up to 15 per sampled item)."""
    out = []
    for t in thresholds:
        tp, fp = int((pos >= t).sum()), int((neg >= t).sum())
        recall = tp / max(len(pos), 1)
        precision = tp / (tp + fp) if tp + fp else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"threshold": float(t), "precision": round(precision, 4), "recall": round(recall, 4),
                    "f1": round(f1, 4)})
    return out


def best_of(points: list[dict[str, float]]) -> dict[str, float]:
    """Highest F1; among equals, the highest threshold (fewest surprises on unseen data)."""
    return max(points, key=lambda p: (p["f1"], p["threshold"]))


def calibrate(collection: Collection | str, sample: int = 200, seed: int = 0, device: str = "auto") -> Calibration:
    from ...models import load_embedder, query_runtime, respec

    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    modality = coll.spec.modality
    if modality not in ("text", "image"):
        raise IndexerError(f"{coll.path} holds precomputed vectors without their inputs: --calibrate needs "
                           "texts or images to transform")
    vecs = load_vectors(coll)
    if len(vecs.ids) < 2:
        raise IndexerError(f"{coll.path} has {len(vecs.ids)} item(s): calibration needs at least 2")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(vecs.ids), min(sample, len(vecs.ids)), replace=False))
    embedder = load_embedder(respec(coll.spec), query_runtime(coll.spec.backend, coll.spec.precision, device))
    coll.check_compatible(embedder.spec)
    column = "text" if modality == "text" else "path"
    rows = coll.rows_by_id([vecs.ids[p] for p in picked], columns=["id", column])
    originals, kept = [], []
    for p in picked:
        item = load_item(rows.get(vecs.ids[p], {}).get(column), modality)
        if item is not None:
            originals.append(item)
            kept.append(p)
    if not originals:
        raise IndexerError(f"none of the sampled items of {coll.path} could be read back (files moved?)")
    kept = np.array(kept)
    transforms = IMAGE_TRANSFORMS if modality == "image" else TEXT_TRANSFORMS
    trng = random.Random(seed)
    copies = {name: [fn(o) if modality == "image" else fn(o, trng) for o in originals] for name, fn in transforms.items()}
    # Positives and negatives both start from the sampled item's stored vector (what dedup compares).
    from ...index.exact import normalized

    base = vecs.x[kept]
    pos_emb = {name: np.einsum("ij,ij->i", base, normalized(embedder.embed(items))) for name, items in copies.items()}
    # Negatives: each sampled item's nearest stored neighbours that are distinct items. A collection
    # holds duplicates already; a neighbour an independent signal recognises as the same content (word
    # shingles for text, a colour thumbnail for images) is not counted as distinct. Copies it misses count
    # as false positives: the precision estimate errs low.
    import faiss

    _, nbrs = faiss.knn(np.ascontiguousarray(vecs.x[kept]), vecs.x, 16, metric=faiss.METRIC_INNER_PRODUCT)
    cand = sorted({int(b) for row in nbrs for b in row if b >= 0} - set(kept.tolist()))
    cand_rows = coll.rows_by_id([vecs.ids[b] for b in cand], columns=["id", column])
    loaded = {int(p): o for p, o in zip(kept, originals)}
    for b in cand:
        item = load_item(cand_rows.get(vecs.ids[b], {}).get(column), modality)
        if item is not None:
            loaded[b] = item
    sig = {b: _copy_signature(item, modality) for b, item in loaded.items()}
    neg_pairs = []
    for k, p in enumerate(kept):
        for b in nbrs[k]:
            b = int(b)
            if b < 0 or b == p or b not in sig or vecs.hashes[b] == vecs.hashes[p]:
                continue
            if not _same_content(sig[int(p)], sig[b], modality):
                neg_pairs.append((k, b))
    neg_emb = np.array([float(vecs.x[kept[k]] @ vecs.x[b]) for k, b in neg_pairs])
    signals = {"embedding": (np.concatenate(list(pos_emb.values())), neg_emb)}
    names = [n for n, v in pos_emb.items() for _ in v]
    if modality == "image":
        hashes = [phash_pair(o) for o in originals]
        pos_ph = np.array([phash_similarity(phash_pair(c), hashes[k]) for items in copies.values()
                           for k, c in enumerate(items)])
        neg_ph = np.array([phash_similarity(hashes[k], phash_pair(loaded[b])) for k, b in neg_pairs])
        signals["phash"] = (pos_ph, neg_ph)
        signals["combined"] = ((signals["embedding"][0] + pos_ph) / 2, (neg_emb + neg_ph) / 2)
    out: dict[str, dict[str, Any]] = {}
    for name, (pos, neg) in signals.items():
        pts = curve(pos, neg)
        out[name] = {"best": best_of(pts), "curve": pts}
    # phash alone is measured for comparison; dedup scores by the embedding or the combination.
    best_name = max((s for s in out if s != "phash"), key=lambda s: (out[s]["best"]["f1"], s == "embedding"))
    best = {"signal": best_name, **out[best_name]["best"]}
    pos_best = signals[best_name][0]
    per = {t: round(float(np.mean([s >= best["threshold"] for s, n in zip(pos_best, names) if n == t])), 4)
           for t in transforms}
    return Calibration(str(coll.path), modality, len(originals), list(transforms), best, out, per)


def _copy_signature(item, modality: str):
    """What `_same_content` compares: word 3-shingles of a text; an 8x8 colour thumbnail of an image
    and of its mirror image (no DCT, no embedding: independent of the signals being calibrated)."""
    if modality == "text":
        words = re.findall(r"\w+", item.lower())
        return {tuple(words[k : k + 3]) for k in range(max(1, len(words) - 2))}
    from PIL import Image, ImageOps

    def thumb(img):
        a = np.asarray(img.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float64).ravel()
        a -= a.mean()
        return a / max(np.linalg.norm(a), 1e-9)

    return np.stack([thumb(item), thumb(ImageOps.mirror(item))])


def _same_content(a, b, modality: str) -> bool:
    if modality == "text":
        small = min(len(a), len(b))
        return small > 0 and len(a & b) / small >= 0.5  # half the shingles of the shorter text shared
    return float(np.max(b @ a[0])) >= 0.9
