"""Exact and near duplicates in a collection (or against another one), grouped, with one item kept per group.

Pairs come from `content_hash` (exact copies) and from all pairs with cosine >= threshold, found without
ever forming an n x n matrix:
- `exact`: FAISS range search over a flat index, query block by query block (exact, for small collections);
- `knn`: k-means lists of ~1000 vectors (an IVF partition built for the job); each vector joins its
  `spread` nearest lists and each list is self-joined exactly with one matrix product (BLAS speed, memory
  bounded by the largest list). `spread` is tuned until the pair recall measured on sampled queries'
  exact neighbours reaches `target_recall`;
- `semdedup`: the same with one list per vector (SemDeDup's scheme): fastest, misses pairs split
  across lists;
- `auto`: exact up to EXACT_BELOW items, knn up to SEMDEDUP_ABOVE, semdedup past that.
Groups are the connected components of the pair graph (transitive: a~b and b~c put a, b, c together).

>>> r = dedup("photos.idx")                                          # doctest: +SKIP
>>> r.groups[:1], r.drop[:2], r.threshold                           # doctest: +SKIP
([['cat.jpg', 'cat-small.png']], ['cat-small.png', ...], 0.9)
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import IndexerError
from ..store import Collection

log = logging.getLogger(__name__)

Method = Literal["auto", "exact", "knn", "semdedup"]
Signal = Literal["embedding", "combined"]
Keep = Literal["first", "oldest", "longest", "largest", "central"]
METHODS = ("auto", "exact", "knn", "semdedup")
KEEPS = ("first", "oldest", "longest", "largest", "central")

# Default thresholds per modality of the embeddings, chosen on the generated near-duplicate sets
# (README "Deduplication" gives the measurements): MiniLM texts and EfficientNet-Lite0 photos.
DEFAULT_THRESHOLDS = {"text": 0.85, "image": 0.85, "vector": 0.90}
EXACT_BELOW = 50_000  # a flat range search over this many vectors takes seconds
SEMDEDUP_ABOVE = 5_000_000  # past this, a spread of m costs ~m^2 the work of semdedup: hours on a few cores
TARGET_PAIR_RECALL = 0.995
MAX_SPREAD = 16  # lists a vector may join as a base (knn)
TUNING_QUERIES = 20_000
THIN_EVIDENCE = 200  # fewer sampled pairs than this: measure lower, keep a wider margin
QUERY_BLOCK = 16_384
# signal="combined" scores a pair by the mean of the embedding cosine and the pHash similarity; its
# candidates come from the embedding at this much below the threshold.
COMBINED_MARGIN = 0.15


@dataclass
class Vectors:
    """A collection's rows in stored order: ids, content hashes and L2-normalised vectors."""

    ids: list[str]
    hashes: list[str]
    x: np.ndarray


@dataclass
class DedupReport:
    collection: str
    method: str
    threshold: float
    threshold_source: str  # "given" or "default for <modality> embeddings"
    modality: str
    keep: str
    items: int
    pairs: list[dict[str, Any]]  # {"a", "b", "score", "exact"}; a < b in stored order (a: this collection)
    groups: list[list[str]]  # the kept id first
    drop: list[str]
    dropped: list[dict[str, Any]]  # {"id", "kept", "score" (cosine to the kept item), "via", "via_score"}
    against: str | None = None
    applied: bool = False
    version_before: int | None = None
    version_after: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        what = f"against {self.against}" if self.against else f"{len(self.groups)} groups"
        done = (f"; deleted as Lance version {self.version_after} (restore with "
                f"`indexer dedup {self.collection} --restore {self.version_before}`)" if self.applied
                else "; nothing deleted (use --apply)")
        return (f"{self.items} items, {len(self.pairs)} pairs >= {self.threshold:g} ({self.method}), {what}, "
                f"{len(self.drop)} to drop (keep {self.keep}){done}")


# ---- entry points --------------------------------------------------------------------------------------

def dedup(collection: Collection | str, *, threshold: float | None = None, method: Method = "auto",
          keep: Keep = "first", against: Collection | str | None = None, apply: bool = False,
          signal: Signal = "embedding", target_recall: float = TARGET_PAIR_RECALL, seed: int = 0) -> DedupReport:
    """Find exact and near duplicates; with `apply`, delete the ones to drop as a new Lance version.

    signal: `embedding` scores pairs by cosine; `combined` (images) by the mean of the cosine and a
      flip-invariant perceptual-hash similarity, which `--calibrate` often finds separates better.

    keep (which item of a group stays; ties go to `first`):
      first    the smallest id (ids sort the same on every run)
      oldest   the one stored earliest (ingest appends; an item re-ingested with changes counts as new)
      longest  the longest text (characters)
      largest  images: most pixels, then most bytes; text: most UTF-8 bytes
      central  the medoid: highest summed cosine to the rest of its group
    against: find the items of `collection` that duplicate something in `against` (leakage between
      train and test, or "have we seen this before?"); those are the ones to drop.
    """
    started = time.perf_counter()
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    if method not in METHODS:
        raise IndexerError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if keep not in KEEPS:
        raise IndexerError(f"--keep {keep}: choose one of {', '.join(KEEPS)}")
    modality = coll.spec.modality
    source = "given"
    if threshold is None:
        threshold, source = DEFAULT_THRESHOLDS.get(modality, DEFAULT_THRESHOLDS["vector"]), \
            f"default for {modality} embeddings"
    if not -1.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise IndexerError(f"--threshold {threshold}: cosine similarity lies in [-1, 1] (0.9 is a typical start)")
    if signal not in ("embedding", "combined"):
        raise IndexerError(f"--signal {signal}: choose embedding or combined")
    if signal == "combined" and (modality != "image" or "path" not in coll.result_columns()):
        raise IndexerError("--signal combined compares image files; "
                           f"{coll.path} holds {modality} embeddings without them")
    other = None
    if against is not None:
        if signal == "combined":
            raise IndexerError("--signal combined works within one collection; use the embedding with --against")
        other = against if isinstance(against, Collection) else Collection.open(against)
        if other.path.resolve() == coll.path.resolve():
            raise IndexerError("--against names the same collection: run dedup without --against")
        coll.check_compatible(other.spec)
    with coll.write_lock() if apply else contextlib.nullcontext():
        version = coll.version()
        vecs = load_vectors(coll)
        if other is None:
            search_t = threshold - COMBINED_MARGIN if signal == "combined" else threshold
            pairs, used, stats = find_pairs(vecs, search_t, method, target_recall, seed)
            if signal == "combined":
                pairs = _rescore_combined(coll, vecs, pairs, threshold)
            groups, drop, dropped = _groups(coll, vecs, pairs, keep)
        else:
            ref = load_vectors(other)
            pairs, used, stats = find_pairs_against(vecs, ref, threshold, method, target_recall, seed)
            groups, drop, dropped = _against_groups(vecs, ref, pairs)
        report = DedupReport(
            collection=str(coll.path), method=used, threshold=float(threshold), threshold_source=source,
            modality=modality, keep=keep, items=len(vecs.ids), groups=groups, drop=drop, dropped=dropped,
            pairs=[{"a": a, "b": b, "score": round(s, 6), "exact": e} for a, b, s, e in _named(vecs, other and ref, pairs)],
            against=None if other is None else str(other.path), version_before=version, version_after=version,
            stats={"signal": signal, **stats})
        if apply and drop:
            report.version_after = _delete(coll, drop)
            report.applied = True
    report.stats["seconds"] = round(time.perf_counter() - started, 3)
    log.debug("%s", report.line())
    return report


def restore(collection: Collection | str, version: int) -> dict[str, Any]:
    """Bring back the rows of an earlier Lance version (e.g. the one before `dedup --apply`) as a new
    version, and bring the index along."""
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    table = coll.table
    if table is None:
        raise IndexerError(f"{coll.path} is empty: nothing to restore")
    known = [v["version"] for v in table.list_versions()]
    if version not in known:
        raise IndexerError(f"{coll.path} has no Lance version {version} (it has {known[0]}..{known[-1]})")
    with coll.write_lock():
        before = coll.version()
        table.restore(version)
        _after_write(coll)
        return {"collection": str(coll.path), "restored": version, "version_before": before,
                "version_after": coll.version(), "rows": coll.count()}


# ---- loading ----------------------------------------------------------------------------------------------

def load_vectors(coll: Collection) -> Vectors:
    ids: list[str] = []
    hashes: list[str] = []
    n = coll.count()
    if n == 0:
        raise IndexerError(f"{coll.path} is empty: ingest something first")
    x = np.empty((n, coll.spec.dim), dtype=np.float32)  # filled in place: one copy of GBs, not two
    for batch in coll.scan(["id", "content_hash", "vector"], batch_size=65536):
        block = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
        if len(ids) + batch.num_rows > len(x):  # a writer appended since count(): make room
            x = np.concatenate([x, np.empty((len(ids) + batch.num_rows - len(x), x.shape[1]), np.float32)])
        x[len(ids) : len(ids) + batch.num_rows] = block
        ids.extend(batch.column("id").to_pylist())
        hashes.extend(batch.column("content_hash").to_pylist())
    x = x[: len(ids)]
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return Vectors(ids, hashes, x)


# ---- pair finding -------------------------------------------------------------------------------------------
# Pairs are arrays (i, j, score, exact) over positions; i < j within one collection.

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def find_pairs(vecs: Vectors, threshold: float, method: Method = "auto", target_recall: float = TARGET_PAIR_RECALL,
               seed: int = 0) -> tuple[Pairs, str, dict[str, Any]]:
    """All pairs of one collection with cosine >= threshold, plus identical content. Returns the pairs,
    the method used and what it measured."""
    x = vecs.x
    n = len(x)
    if method == "auto":
        method = "exact" if n <= EXACT_BELOW else "knn" if n <= SEMDEDUP_ABOVE else "semdedup"
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    if method == "exact" or n < 2:
        i, j, s = range_pairs_exact(x, threshold)
    else:  # knn: spread tuned to the recall target; semdedup: one list each
        i, j, s, stats = range_pairs_partitioned(x, threshold, target_recall=target_recall, seed=seed,
                                                 spread=1 if method == "semdedup" else None)
    stats["search_seconds"] = round(time.perf_counter() - t0, 3)
    hi, hj = _hash_pairs(vecs.hashes)
    return _merge(x, x, (i, j, s), (hi, hj)), method, stats


def find_pairs_against(vecs: Vectors, ref: Vectors, threshold: float, method: Method = "auto",
                       target_recall: float = TARGET_PAIR_RECALL, seed: int = 0) -> tuple[Pairs, str, dict[str, Any]]:
    """Pairs (i in vecs, j in ref) with cosine >= threshold or identical content."""
    if method == "semdedup":
        raise IndexerError("--against compares two collections; use --method exact or knn")
    if method == "auto":
        method = "exact" if len(ref.x) <= EXACT_BELOW else "knn"
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    if method == "exact":
        i, j, s = range_pairs_exact(ref.x, threshold, queries=vecs.x)
    else:
        i, j, s, stats = range_pairs_partitioned(ref.x, threshold, queries=vecs.x, target_recall=target_recall,
                                                 seed=seed)
    stats["search_seconds"] = round(time.perf_counter() - t0, 3)
    where: dict[str, list[int]] = {}
    for p, h in enumerate(ref.hashes):
        where.setdefault(h, []).append(p)
    hp = [(a, b) for a, h in enumerate(vecs.hashes) for b in where.get(h, ())]
    hi, hj = (np.array([p[0] for p in hp], dtype=np.int64), np.array([p[1] for p in hp], dtype=np.int64))
    return _merge(vecs.x, ref.x, (i, j, s), (hi, hj), ordered=False), method, stats


def _range_result(lims: np.ndarray, dist: np.ndarray, labels: np.ndarray, offset: int,
                  ordered: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    qi = np.repeat(np.arange(offset, offset + len(lims) - 1, dtype=np.int64), np.diff(lims.astype(np.int64)))
    labels = labels.astype(np.int64)
    if ordered:  # one collection: keep each unordered pair once, never an item with itself
        lo, hi = np.minimum(qi, labels), np.maximum(qi, labels)
        keep = lo != hi
        return lo[keep], hi[keep], dist[keep]
    return qi, labels, dist


def range_pairs_exact(base: np.ndarray, threshold: float, queries: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact range search, QUERY_BLOCK queries at a time (FAISS blocks the products inside)."""
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return _range_blocks(index, base if queries is None else queries, threshold, queries is None, None)


def _range_blocks(index, queries: np.ndarray, threshold: float, ordered: bool, params) -> tuple:
    parts = []
    for start in range(0, len(queries), QUERY_BLOCK):
        lims, dist, labels = index.range_search(queries[start : start + QUERY_BLOCK], float(threshold), params=params)
        parts.append(_range_result(lims, dist, labels, start, ordered))
    i, j, s = (np.concatenate([p[k] for p in parts]) for k in range(3))
    return _unique(i, j, s)


def _unique(i: np.ndarray, j: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(i) == 0:
        return i, j, s
    key = i * (int(j.max()) + 1) + j
    _, first = np.unique(key, return_index=True)
    return i[first], j[first], s[first]


def _nlist(n: int, per_list: int = 500) -> int:
    # Small lists and a wider spread find a given share of the pairs with less work than big lists and a
    # narrow spread (measured on clustered 384-d data: 500 x 6 beat 1000 x 5 and 2000 x 4).
    return int(max(1, min(16384, n // per_list)))


def _train_partitions(base: np.ndarray, nlist: int, seed: int):
    """Spherical k-means centroids (FAISS) in a flat inner-product index."""
    import faiss

    rng = np.random.default_rng(seed)
    sample = base[np.sort(rng.choice(len(base), min(len(base), 40 * nlist), replace=False))]
    km = faiss.Kmeans(base.shape[1], nlist, niter=10, spherical=True, seed=seed, verbose=False)
    km.train(sample)
    return km.index


def _assign(quantizer, x: np.ndarray, m: int) -> np.ndarray:
    """Each vector's m nearest lists, (n, m), in blocks."""
    out = np.empty((len(x), m), dtype=np.int64)
    for start in range(0, len(x), 65536):
        _, out[start : start + 65536] = quantizer.search(x[start : start + 65536], m)
    return out


def _members(assign: np.ndarray, nlist: int) -> list[np.ndarray]:
    flat = assign.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(nlist + 1))
    owners = order // assign.shape[1]
    return [owners[bounds[c] : bounds[c + 1]] for c in range(nlist)]


def _join(xq: np.ndarray, q_members: list[np.ndarray], xb: np.ndarray, b_members: list[np.ndarray],
          threshold: float, same: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact pairs >= threshold inside each list, queries against bases: one matrix product per list
    (blocked by 4096 rows), so memory stays bounded by the largest list, never n x n. With `same`, pairs
    come back once each as (smaller, larger) position."""
    parts_i, parts_j, parts_s = [], [], []
    for qm, bm in zip(q_members, b_members):
        if len(qm) == 0 or len(bm) == 0:
            continue
        xbm = xb[bm]
        for start in range(0, len(qm), 4096):
            rows = qm[start : start + 4096]
            sims = xq[rows] @ xbm.T
            qi, qj = np.nonzero(sims >= threshold)
            a, b, sc = rows[qi], bm[qj], sims[qi, qj]
            if same:
                a, b = np.minimum(a, b), np.maximum(a, b)
                keep = a != b
                a, b, sc = a[keep], b[keep], sc[keep]
            parts_i.append(a)
            parts_j.append(b)
            parts_s.append(sc)
    if not parts_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return _unique(np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s))


def range_pairs_partitioned(base: np.ndarray, threshold: float, queries: np.ndarray | None = None,
                            target_recall: float = TARGET_PAIR_RECALL, seed: int = 0, spread: int | None = None,
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """All pairs >= threshold through k-means lists (an IVF partition of ~1000 vectors per list). Each
    vector is a query in its nearest list and a base in its `spread` nearest lists; each list joins its
    queries with its bases exactly, in one matrix product. A pair is found when either one's nearest list
    is among the other's `spread` nearest. `spread` (None: tuned) is the smallest whose pair recall,
    measured on sampled queries' exact neighbours, reaches target_recall; 1 is SemDeDup's scheme."""
    nlist = _nlist(len(base))
    t0 = time.perf_counter()
    quantizer = _train_partitions(base, nlist, seed)
    train_s = time.perf_counter() - t0
    same = queries is None
    qx = base if same else queries
    t0 = time.perf_counter()
    width = min(nlist, MAX_SPREAD) if spread is None else spread
    b_assign = _assign(quantizer, base, width)
    q_assign = b_assign if same else _assign(quantizer, qx, width)
    assign_s = time.perf_counter() - t0
    tuned: dict[str, Any] = {"spread": spread}
    if spread is None:
        tuned = _tune_spread(base, qx, q_assign, b_assign, threshold, target_recall, seed, same)
    m = tuned["spread"]
    t0 = time.perf_counter()
    i, j, s = _join(qx, _members(q_assign[:, :1], nlist), base, _members(b_assign[:, :m], nlist), threshold, same)
    if not same and m > 1:  # the other direction: a base's nearest list among a query's `spread` nearest
        j2, i2, s2 = _join(base, _members(b_assign[:, :1], nlist), qx, _members(q_assign[:, :m], nlist), threshold,
                           False)
        i, j, s = _unique(np.concatenate([i, i2]), np.concatenate([j, j2]), np.concatenate([s, s2]))
    sizes = np.bincount(b_assign[:, :m].ravel(), minlength=nlist)
    return i, j, s, {"lists": nlist, **tuned, "largest_list": int(sizes.max()), "train_seconds": round(train_s, 3),
                     "assign_seconds": round(assign_s, 3), "join_seconds": round(time.perf_counter() - t0, 3)}


def _tune_spread(base: np.ndarray, queries: np.ndarray, q_assign: np.ndarray, b_assign: np.ndarray,
                 threshold: float, target: float, seed: int, same: bool) -> dict[str, Any]:
    """Up to TUNING_QUERIES sampled queries, each joined with the vectors whose nearest list is among its
    widest spread (the reference pairs: cheap, so the sample can be large enough to hold hundreds of pairs
    even when duplicates are rare). A reference pair is found at spread m when one vector's nearest list is
    among the other's m nearest. With fewer than THIN_EVIDENCE pairs at the threshold, measure a little
    lower (0.05: more pairs, a bit harder ones)."""
    nlist = int(max(b_assign.max(), q_assign.max())) + 1
    rng = np.random.default_rng(seed + 1)
    sample = np.sort(rng.choice(len(queries), min(len(queries), TUNING_QUERIES), replace=False))
    low = threshold - 0.05
    i, j, s = _join(np.ascontiguousarray(queries[sample]), _members(q_assign[sample], nlist), base,
                    _members(b_assign[:, :1], nlist), low, same=False)
    if same:
        keep = sample[i] != j
        i, j, s = i[keep], j[keep], s[keep]
    t = threshold if (s >= threshold).sum() >= THIN_EVIDENCE else low
    i, j = i[s >= t], j[s >= t]
    result: dict[str, Any] = {"spread": b_assign.shape[1], "tuned_at": round(t, 4), "tuning_pairs": int(len(i)),
                              "estimated_recall": None}
    if not len(i):
        return result
    qa, ba = q_assign[sample[i]], b_assign[j]
    for m in range(1, b_assign.shape[1] + 1):
        hit = (qa[:, :1] == ba[:, :m]).any(axis=1) | (ba[:, :1] == qa[:, :m]).any(axis=1)
        result.update(spread=m, estimated_recall=round(float(hit.mean()), 4))
        if hit.mean() >= target:
            break
    # A margin for sampling error: one list more than measured (on 1M clustered vectors the measured
    # spread found 98.7% of the exact pairs against 99.8% estimated), two when the sample held few pairs.
    margin = 1 if len(i) >= THIN_EVIDENCE else 2
    result["spread"] = min(result["spread"] + margin, b_assign.shape[1])
    log.info("partitioned range search: each vector a base in %d of its %d nearest lists, pair recall %.3f "
             "(relative to all %d) on %d sampled pairs at %.3f", result["spread"], b_assign.shape[1],
             result["estimated_recall"], b_assign.shape[1], len(i), t)
    return result


def _hash_pairs(hashes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Identical content: each copy paired with the first one stored (the group is the same)."""
    first: dict[str, int] = {}
    ii, jj = [], []
    for p, h in enumerate(hashes):
        if h is None:
            continue
        q = first.setdefault(h, p)
        if q != p:
            ii.append(q)
            jj.append(p)
    return np.array(ii, dtype=np.int64), np.array(jj, dtype=np.int64)


def _merge(xa: np.ndarray, xb: np.ndarray, near: tuple, same: tuple, ordered: bool = True) -> Pairs:
    i, j, s = near
    hi, hj = same
    exact_flags = np.zeros(len(i), dtype=bool)
    if len(hi):
        hs = np.einsum("ij,ij->i", xa[hi], xb[hj])
        i, j, s = np.concatenate([hi, i]), np.concatenate([hj, j]), np.concatenate([hs, s])
        exact_flags = np.concatenate([np.ones(len(hi), dtype=bool), exact_flags])
        # _unique keeps the first occurrence: the content-hash flag wins over the same pair found by search
        key = i * (max(int(j.max()), len(xb)) + 1) + j
        _, first = np.unique(key, return_index=True)
        i, j, s, exact_flags = i[first], j[first], s[first], exact_flags[first]
    order = np.lexsort((j, i)) if len(i) else np.zeros(0, dtype=np.int64)
    return (i[order].astype(np.int64), j[order].astype(np.int64), np.asarray(s, dtype=np.float32)[order],
            exact_flags[order])


def _rescore_combined(coll: Collection, vecs: Vectors, pairs: Pairs, threshold: float) -> Pairs:
    """Score = (cosine + pHash similarity) / 2; keep pairs at or above the threshold (identical files always)."""
    from .dedup_calibrate import _load, phash_pair, phash_similarity

    i, j, s, e = pairs
    involved = sorted(set(i.tolist()) | set(j.tolist()))
    rows = coll.rows_by_id([vecs.ids[p] for p in involved], columns=["id", "path"])
    hashes = {}
    for p in involved:
        img = _load(rows.get(vecs.ids[p], {}).get("path"), "image")
        hashes[p] = None if img is None else phash_pair(img)
    score = np.array([(sc + (phash_similarity(hashes[a], hashes[b]) if hashes[a] is not None and hashes[b] is not None
                             else sc)) / 2 for a, b, sc in zip(i.tolist(), j.tolist(), s.tolist())], dtype=np.float32)
    keep = (score >= threshold) | e
    return i[keep], j[keep], np.where(e, s, score)[keep], e[keep]


def _named(vecs: Vectors, ref: Vectors | None, pairs: Pairs):
    other = vecs if ref is None else ref
    i, j, s, e = pairs
    for a, b, sc, ex in zip(i.tolist(), j.tolist(), s.tolist(), e.tolist()):
        yield vecs.ids[a], other.ids[b], float(sc), bool(ex)


# ---- groups and the keep policy ----------------------------------------------------------------------------

def components(n: int, i: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
    """Connected components with more than one member (union-find, path halving), as sorted positions."""
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members = np.unique(np.concatenate([i, j])) if len(i) else np.zeros(0, dtype=np.int64)
    roots = np.array([find(int(m)) for m in members], dtype=np.int64)
    order = np.argsort(roots, kind="stable")
    members, roots = members[order], roots[order]
    cuts = np.flatnonzero(np.diff(roots)) + 1
    return [g for g in np.split(members, cuts) if len(g) > 1]


def _groups(coll: Collection, vecs: Vectors, pairs: Pairs, keep: str):
    i, j, s, _ = pairs
    groups = components(len(vecs.ids), i, j)
    kept = _choose(coll, vecs, groups, keep)
    # The strongest edge that ties each dropped item into its group ("via").
    best: dict[int, tuple[float, int]] = {}
    for a, b, sc in zip(i.tolist(), j.tolist(), s.tolist()):
        for u, v in ((a, b), (b, a)):
            if sc > best.get(u, (-2.0, -1))[0]:
                best[u] = (sc, v)
    out_groups, drop, dropped = [], [], []
    for g, k in zip(groups, kept):
        rest = [int(m) for m in g if m != k]
        out_groups.append([vecs.ids[k]] + [vecs.ids[m] for m in rest])
        for m in rest:
            sc, v = best[m]
            drop.append(vecs.ids[m])
            dropped.append({"id": vecs.ids[m], "kept": vecs.ids[k], "score": round(float(vecs.x[m] @ vecs.x[k]), 6),
                            "via": vecs.ids[v], "via_score": round(sc, 6)})
    return out_groups, drop, dropped


def _choose(coll: Collection, vecs: Vectors, groups: list[np.ndarray], keep: str) -> list[int]:
    """The position kept in each group. Ties go to the smallest id."""
    if not groups:
        return []
    first = lambda g, score=None: min(g.tolist(), key=lambda m: (  # noqa: E731
        -score[m] if score is not None else 0, vecs.ids[m]))
    if keep == "first":
        return [first(g) for g in groups]
    if keep == "oldest":  # positions are in stored order
        return [int(g.min()) for g in groups]
    if keep == "central":
        out = []
        for g in groups:
            xg = vecs.x[g]
            summed = xg @ xg.sum(axis=0)  # sum of cosines to every member (itself included, a constant)
            out.append(first(g, dict(zip(g.tolist(), summed.tolist()))))
        return out
    sizes = _sizes(coll, [vecs.ids[m] for g in groups for m in g], keep)
    return [first(g, {m: sizes[vecs.ids[m]] for m in g.tolist()}) for g in groups]


def _sizes(coll: Collection, ids: list[str], keep: str) -> dict[str, tuple | float]:
    names = coll.result_columns()
    if "text" in names:
        rows = coll.rows_by_id(ids, columns=["id", "text"])
        if keep == "longest":
            return {i: len(r["text"] or "") for i, r in rows.items()}
        return {i: len((r["text"] or "").encode()) for i, r in rows.items()}
    if keep == "longest":
        raise IndexerError(f"--keep longest compares texts; {coll.path} has none (use largest for images)")
    if "path" not in names:
        raise IndexerError(f"--keep largest needs texts or image files; {coll.path} has neither "
                           "(use first, oldest or central)")
    from PIL import Image

    out: dict[str, float] = {}
    for i, r in coll.rows_by_id(ids, columns=["id", "path"]).items():
        try:
            with Image.open(r["path"]) as img:  # reads the header only
                pixels = img.size[0] * img.size[1]
            out[i] = pixels + Path(r["path"]).stat().st_size / 1e12  # bytes break ties among equal sizes
        except OSError:
            out[i] = -1.0  # gone or unreadable: never the one kept
    return out


def _against_groups(vecs: Vectors, ref: Vectors, pairs: Pairs):
    """Each item of this collection with its matches in the other; all such items are dropped."""
    i, j, s, _ = pairs
    matches: dict[int, list[tuple[float, int]]] = {}
    for a, b, sc in zip(i.tolist(), j.tolist(), s.tolist()):
        matches.setdefault(a, []).append((sc, b))
    groups, drop, dropped = [], [], []
    for a in sorted(matches):
        ms = sorted(matches[a], key=lambda t: -t[0])
        groups.append([vecs.ids[a]] + [ref.ids[b] for _, b in ms])
        drop.append(vecs.ids[a])
        dropped.append({"id": vecs.ids[a], "kept": ref.ids[ms[0][1]], "score": round(ms[0][0], 6),
                        "via": ref.ids[ms[0][1]], "via_score": round(ms[0][0], 6)})
    return groups, drop, dropped


# ---- applying ------------------------------------------------------------------------------------------------

def _delete(coll: Collection, ids: list[str]) -> int:
    """One Lance commit deletes them all (one version to restore from), then the index follows."""
    quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
    coll.table.delete(f"id IN ({quoted})")
    _after_write(coll)
    return coll.version()


def _after_write(coll: Collection) -> None:
    from ..index import update_after_ingest

    coll.table.checkout_latest()
    update_after_ingest(coll)  # FAISS: tombstones the deleted rows (or adds restored ones) and saves
    coll.touch()
