"""Self-calibration for dedup: known edits applied to a sample of the collection's own items.

Each sampled item is transformed (images: resize, JPEG re-compression, 90% crop, brightness, flip,
grayscale, format change; text: typos, reordered sentences, added boilerplate) and embedded with the
collection's model. The transformed copies are the positives (7 or 3 per item); each sampled item's 15
nearest *other* stored items are its negatives (so the estimate is not tilted towards precision by counting
many positives against one negative each). Both compare the sampled item's stored vector: with a copy's
embedding (positives) or a neighbour's stored vector (negatives). For every threshold we count the positives kept (recall) and the negatives
let through (precision = kept positives / everything kept), per signal:
- `embedding`: cosine of the embeddings;
- `phash`: a DCT perceptual hash (ours, below), flip-invariant, as 1 - Hamming distance / 64 (images);
- `combined`: the mean of the two (images).
The best threshold per signal is the one with the highest F1; the best signal is reported too.

>>> calibrate("photos.idx", sample=100).best                      # doctest: +SKIP
{'signal': 'combined', 'threshold': 0.84, 'precision': 0.99, 'recall': 0.97, 'f1': 0.98}
"""

from __future__ import annotations

import io
import logging
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import IndexerError
from ..store import Collection

log = logging.getLogger(__name__)


# ---- known transformations ------------------------------------------------------------------------------

def _jpeg(img, quality: int = 35):
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    from PIL import Image

    return Image.open(buf).convert("RGB")


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    buf.seek(0)
    from PIL import Image

    return Image.open(buf).convert("RGB")


def _crop(img, keep: float = 0.9):
    w, h = img.size
    dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return img.crop((dx, dy, w - dx, h - dy))


def _brightness(img, factor: float = 1.3):
    from PIL import ImageEnhance

    return ImageEnhance.Brightness(img).enhance(factor)


def _resize(img, scale: float = 0.5):
    return img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))


def _flip(img):
    from PIL import ImageOps

    return ImageOps.mirror(img)


def _grayscale(img):
    return img.convert("L").convert("RGB")


IMAGE_TRANSFORMS: dict[str, Callable] = {
    "resize": _resize, "jpeg": _jpeg, "crop90": _crop, "brightness": _brightness, "flip": _flip,
    "grayscale": _grayscale, "png": _png,
}

BOILERPLATE = ("Posted by the editorial team. All rights reserved.", "Click here to subscribe to our newsletter.",
               "This article was originally published on our website.")


def typos(text: str, rng: random.Random, rate: float = 0.03) -> str:
    """Swap, drop or double about `rate` of the letters (at least one edit)."""
    chars = list(text)
    letters = [k for k, c in enumerate(chars) if c.isalpha()]
    if not letters:  # "2023", "": nothing to misspell
        return text
    for k in sorted(rng.sample(letters, max(1, int(len(letters) * rate))), reverse=True):
        op = rng.choice(("swap", "drop", "double"))
        if op == "swap" and k + 1 < len(chars):
            chars[k], chars[k + 1] = chars[k + 1], chars[k]
        elif op == "drop":
            del chars[k]
        else:
            chars.insert(k, chars[k])
    return "".join(chars)


def reorder(text: str, rng: random.Random) -> str:
    """Sentences in another order (a single sentence: its clauses rotated at a comma, if any)."""
    parts = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    if len(parts) > 1:
        rotated = parts[1:] + parts[:1]
        return " ".join(rotated)
    clauses = text.split(", ")
    return ", ".join(clauses[1:] + clauses[:1]) if len(clauses) > 1 else text


def boilerplate(text: str, rng: random.Random) -> str:
    return f"{text.strip()} {rng.choice(BOILERPLATE)}"


TEXT_TRANSFORMS: dict[str, Callable[[str, random.Random], str]] = {
    "typos": typos, "reorder": reorder, "boilerplate": boilerplate,
}


# ---- perceptual hash ----------------------------------------------------------------------------------------

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


# ---- calibration --------------------------------------------------------------------------------------------

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
    from ..models import load_embedder, resolve_runtime, respec
    from .dedup import load_vectors

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
    embedder = load_embedder(respec(coll.spec), resolve_runtime(device))
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
    from .features import normalized

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


def load_item(value, modality: str):
    """A stored text, or the image file at `value` decoded as ingest decodes it (EXIF orientation, the
    decompression-bomb guard); None when it is gone or unreadable."""
    if value is None:
        return None
    if modality == "text":
        return value
    from pathlib import Path

    from ..sources.images import ImageDecodeError, decode_image

    try:
        return decode_image(Path(value).read_bytes())
    except (ImageDecodeError, OSError):
        return None


# ---- generated near-duplicate sets (tests, README evidence) ---------------------------------------------------

SET_IMAGE_TRANSFORMS = ("resize", "jpeg", "crop90", "brightness", "flip", "png")


def write_near_duplicate_sets(directory, seed: int = 0) -> dict[str, Any]:
    """Real photos (installed packages) under SET_IMAGE_TRANSFORMS, and two-sentence texts with typos,
    reordering and boilerplate, next to their distinct siblings. Ids are `<original>--<transform>`.
    Returns {"images": dir, "texts": jsonl path, "image_groups": [[id, ...]], "text_groups": [[id, ...]]}."""
    import json
    from importlib import resources
    from pathlib import Path

    from PIL import Image

    from ..sample import photo_paths

    root = Path(directory)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    image_groups = []
    for name, path in sorted(photo_paths().items()):
        with Image.open(path) as src:
            img = src.convert("RGB")
        img.thumbnail((512, 512))  # photo-sized, and quick to embed in tests
        img.save(images / f"{name}.jpg", quality=92)
        group = [f"{name}.jpg"]
        for t in SET_IMAGE_TRANSFORMS:
            ext = "png" if t == "png" else "jpg"
            IMAGE_TRANSFORMS[t](img).convert("RGB").save(images / f"{name}--{t}.{ext}", quality=90)
            group.append(f"{name}--{t}.{ext}")
        image_groups.append(group)
    with resources.as_file(resources.files("indexer") / "data" / "sample_texts.jsonl") as src:
        sentences = [json.loads(line) for line in Path(src).read_text().splitlines() if line.strip()]
    by_label: dict[str, list[str]] = {}
    for s in sentences:
        by_label.setdefault(s["label"], []).append(s["text"])
    rng = random.Random(seed)
    rows, text_groups = [], []
    for label, texts in sorted(by_label.items()):
        for k in range(0, len(texts) - 1, 2):
            doc_id, doc = f"{label}-{k // 2}", f"{texts[k]} {texts[k + 1]}"
            rows.append({"id": doc_id, "text": doc, "label": label})
            group = [doc_id]
            for t, fn in TEXT_TRANSFORMS.items():
                rows.append({"id": f"{doc_id}--{t}", "text": fn(doc, rng), "label": label})
                group.append(f"{doc_id}--{t}")
            text_groups.append(group)
    texts_path = root / "texts.jsonl"
    texts_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"images": images, "texts": texts_path, "image_groups": image_groups, "text_groups": text_groups}


def pair_scores(found: set[tuple[str, str]], groups: list[list[str]]) -> dict[str, float]:
    """Pair precision and recall of `found` (unordered id pairs) against ground-truth groups."""
    truth = {tuple(sorted((a, b))) for g in groups for k, a in enumerate(g) for b in g[k + 1:]}
    found = {tuple(sorted(p)) for p in found}
    tp = len(found & truth)
    return {"precision": tp / len(found) if found else 1.0, "recall": tp / len(truth) if truth else 1.0,
            "found": len(found), "true": len(truth)}
