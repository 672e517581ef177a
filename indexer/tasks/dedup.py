"""Exact and near duplicates in a collection (or against another one), grouped, with one item kept per group.

Pairs come from `content_hash` (exact copies) and from all pairs with cosine >= threshold, found without
ever forming an n x n matrix. Exact copies are searched once: one representative per content hash takes
part in the search and its copies are linked to it afterwards (k copies: k - 1 links, not k(k-1)/2 pairs).
- `exact`: every query against every vector in blocked matrix products (exact, for small collections);
- `knn`: k-means lists of ~500 vectors (an IVF partition built for the job); each vector joins its
  `spread` nearest lists and each list is self-joined exactly with matrix products (BLAS speed, memory
  bounded by the block size). `spread` is tuned until the pair recall measured on sampled queries'
  exact neighbours reaches `target_recall`;
- `semdedup`: the same with one list per vector (SemDeDup's scheme): fastest, misses pairs split
  across lists;
- `auto`: exact up to EXACT_BELOW items, knn up to SEMDEDUP_ABOVE, semdedup past that. With `--against`,
  exact while queries x reference stays within the products of an exact search over EXACT_BELOW items.
Every method keeps the pairs with score >= threshold (the same comparison everywhere). A threshold so low
that more than MAX_PAIRS pairs would come back is refused with advice (estimated from the tuning sample,
or counted while searching) rather than filling the machine's memory.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
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
EXACT_BELOW = 50_000  # an exact search over this many vectors takes seconds
# --against, method auto: exact while queries x reference <= the vector products of an exact search over
# EXACT_BELOW items (one new item against millions stays exact; a big test set against a big train set
# goes through the lists join).
EXACT_PRODUCTS = EXACT_BELOW * EXACT_BELOW // 2
SEMDEDUP_ABOVE = 5_000_000  # past this, a spread of m costs ~m^2 the work of semdedup: hours on a few cores
TARGET_PAIR_RECALL = 0.995
MAX_SPREAD = 16  # lists a vector may join as a base (knn)
TUNING_QUERIES = 20_000
THIN_EVIDENCE = 200  # fewer sampled pairs than this: measure lower, keep a wider margin
JOIN_ROWS, JOIN_COLS = 2048, 16384  # block of one matrix product: 128 MB of float32 similarities
# More pairs than this (~21 bytes each as arrays, far more as output) means the threshold is too low for
# dedup: refused with advice instead of exhausting memory.
MAX_PAIRS = 50_000_000


@dataclass
class Vectors:
    """A collection's rows in stored order: ids, content hashes and L2-normalised vectors."""

    ids: list[str]
    hashes: list[str]
    x: np.ndarray


# Pairs are arrays (i, j, score, exact) over positions; i < j within one collection.
Pairs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def no_pairs() -> Pairs:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool)


@dataclass
class DedupReport:
    """`pairs` ({"a", "b", "score", "exact"}; a < b in stored order, a from this collection) are kept as
    arrays and turned into dicts only when asked for (`pairs`, `iter_pairs`, `to_dict`)."""

    collection: str
    method: str
    threshold: float
    threshold_source: str  # "given" or "default for <modality> embeddings"
    modality: str
    keep: str
    items: int
    groups: list[list[str]]  # the kept id first
    drop: list[str]
    dropped: list[dict[str, Any]]  # {"id", "kept", "score" (cosine to the kept item), "via", "via_score"}
    against: str | None = None
    applied: bool = False
    version_before: int | None = None
    version_after: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    pair_arrays: Pairs = field(default_factory=no_pairs, repr=False)
    pair_ids: tuple[list[str], list[str]] = field(default=([], []), repr=False)  # names of i and of j

    @property
    def pair_count(self) -> int:
        return len(self.pair_arrays[0])

    def iter_pairs(self) -> Iterator[dict[str, Any]]:
        ids_a, ids_b = self.pair_ids
        i, j, s, e = self.pair_arrays
        for a, b, sc, ex in zip(i.tolist(), j.tolist(), s.tolist(), e.tolist()):
            yield {"a": ids_a[a], "b": ids_b[b], "score": round(sc, 6), "exact": ex}

    @property
    def pairs(self) -> list[dict[str, Any]]:
        return list(self.iter_pairs())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("pair_arrays", "pair_ids"):
                continue
            if f.name == "groups":
                out["pairs"] = self.pairs
            out[f.name] = getattr(self, f.name)
        return out

    def line(self) -> str:
        what = f"against {self.against}" if self.against else f"{len(self.groups)} groups"
        done = (f"; deleted as Lance version {self.version_after} (undo with "
                f"`indexer dedup {self.collection} --restore {self.version_before}`)" if self.applied
                else "; nothing deleted (use --apply)")
        return (f"{self.items} items, {self.pair_count} pairs >= {self.threshold:g} ({self.method}), {what}, "
                f"{len(self.drop)} to drop (keep {self.keep}){done}")


def too_many_pairs(threshold: float, count: float) -> IndexerError:
    return IndexerError(
        f"cosine >= {threshold:.4g} pairs about {count:,.0f} items or more (the limit is {MAX_PAIRS:,}): "
        "this threshold is too low to mean 'duplicate'. Raise --threshold (an --out report.html of a "
        "higher threshold shows the nearest-neighbour similarities) or run --calibrate.")


# ---- entry points --------------------------------------------------------------------------------------

def dedup(collection: Collection | str, *, threshold: float | None = None, method: Method = "auto",
          keep: Keep = "first", against: Collection | str | None = None, apply: bool = False,
          signal: Signal = "embedding", out: str | Path | None = None, target_recall: float = TARGET_PAIR_RECALL,
          seed: int = 0) -> DedupReport:
    """Find exact and near duplicates; with `apply`, delete the ones to drop as a new Lance version.

    signal: `embedding` scores pairs by cosine; `combined` (images) by the mean of the cosine and a
      flip-invariant perceptual-hash similarity, which `--calibrate` often finds separates better.
      Since the pHash similarity is at most 1, a pair reaches T with a cosine as low as 2T - 1: the
      candidates are searched at that bound.

    keep (which item of a group stays; ties go to `first`):
      first    the smallest id (ids sort the same on every run)
      oldest   the one stored earliest (ingest appends; an item re-ingested with changes counts as new)
      longest  the longest text (characters)
      largest  images: most pixels, then most bytes; text: most UTF-8 bytes
      central  the medoid: highest summed cosine to the rest of its group
    against: find the items of `collection` that duplicate something in `against` (leakage between
      train and test, or "have we seen this before?"); those are the ones to drop.
    out: also write the result (.json, .csv or .html). Every argument is checked before anything is
      searched or deleted; the HTML page's sample is taken before `apply` deletes.
    """
    from .dedup_report import check_out, html_sample, write_output

    started = time.perf_counter()
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    if method not in METHODS:
        raise IndexerError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if keep not in KEEPS:
        raise IndexerError(f"--keep {keep}: choose one of {', '.join(KEEPS)}")
    out = None if out is None else check_out(out)
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
        if method == "semdedup":
            raise IndexerError("--against compares two collections; use --method exact or knn")
        other = against if isinstance(against, Collection) else Collection.open(against)
        if other.path.resolve() == coll.path.resolve():
            raise IndexerError("--against names the same collection: run dedup without --against")
        coll.check_compatible(other.spec)
    else:
        _check_keep(coll, keep)
    with coll.write_lock() if apply else contextlib.nullcontext():
        version = coll.version()
        vecs = load_vectors(coll)
        if other is None:
            search_t = max(-1.0, 2 * threshold - 1) if signal == "combined" else threshold
            pairs, used, stats = find_pairs(vecs, search_t, method, target_recall, seed)
            if signal == "combined":
                pairs = _rescore_combined(coll, vecs, pairs, threshold)
            groups, drop, dropped = _groups(coll, vecs, pairs, keep)
            names = (vecs.ids, vecs.ids)
        else:
            ref = load_vectors(other)
            pairs, used, stats = find_pairs_against(vecs, ref, threshold, method, target_recall, seed)
            groups, drop, dropped = _against_groups(vecs, ref, pairs)
            names = (vecs.ids, ref.ids)
        report = DedupReport(
            collection=str(coll.path), method=used, threshold=float(threshold), threshold_source=source,
            modality=modality, keep=keep, items=len(vecs.ids), groups=groups, drop=drop, dropped=dropped,
            against=None if other is None else str(other.path), version_before=version, version_after=version,
            stats={"signal": signal, **stats}, pair_arrays=pairs, pair_ids=names)
        # The page shows the items it samples: take them while the ones to drop are still stored.
        sample = html_sample(report) if out is not None and out.suffix.lower() in (".html", ".htm") else None
        if apply and drop:
            coll.delete(drop)  # one Lance commit: one version to restore from
            _after_write(coll)
            report.version_after = coll.version()
            report.applied = True
    report.stats["seconds"] = round(time.perf_counter() - started, 3)
    if out is not None:
        write_output(report, out, sample)
    log.debug("%s", report.line())
    return report


def restore(collection: Collection | str, version: int) -> dict[str, Any]:
    """Undo a `dedup --apply`: the rows of `version` (the one before the apply) that are no longer stored
    come back, as a new version; rows written since stay. The index catches up with the new rows."""
    from ..store.arrow import conform

    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    table = coll.table
    if table is None:
        raise IndexerError(f"{coll.path} is empty: nothing to restore")
    known = [v["version"] for v in table.list_versions()]
    if version not in known:
        raise IndexerError(f"{coll.path} has no Lance version {version} (it has {known[0]}..{known[-1]})")
    with coll.write_lock():
        before = coll.version()
        present = {i for b in coll.scan(["id"], batch_size=65536) for i in b.column("id").to_pylist()}
        old = coll.dataset().checkout_version(version)
        back = [b.filter(np.array([i not in present for i in b.column("id").to_pylist()], dtype=bool))
                for b in old.to_batches(batch_size=65536)]
        back = [b for b in back if b.num_rows]
        restored = sum(b.num_rows for b in back)
        if restored:
            import pyarrow as pa

            data, new_fields = conform(pa.Table.from_batches(back), table.schema)
            if new_fields:  # columns dropped since that version: bring them back too
                table.add_columns(new_fields)
            table.add(data)
            _after_write(coll)
        return {"collection": str(coll.path), "restored": version, "rows_restored": restored,
                "version_before": before, "version_after": coll.version(), "rows": coll.count()}


# ---- loading ----------------------------------------------------------------------------------------------

def load_vectors(coll: Collection) -> Vectors:
    from .features import normalized

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
        x[len(ids) : len(ids) + batch.num_rows] = normalized(block)  # per batch: no full-size temporary
        ids.extend(batch.column("id").to_pylist())
        hashes.extend(batch.column("content_hash").to_pylist())
    return Vectors(ids, hashes, x[: len(ids)])


# ---- pair finding -------------------------------------------------------------------------------------------

def find_pairs(vecs: Vectors, threshold: float, method: Method = "auto", target_recall: float = TARGET_PAIR_RECALL,
               seed: int = 0) -> tuple[Pairs, str, dict[str, Any]]:
    """All pairs of one collection with cosine >= threshold, plus identical content. Returns the pairs,
    the method used and what it measured. One representative per content hash is searched; its copies
    are linked to it (the groups come out the same, the pairs stay linear in the copies)."""
    reps, ci, cj = _representatives(vecs.hashes)
    x = vecs.x if len(reps) == len(vecs.x) else vecs.x[reps]
    n = len(x)
    if method == "auto":
        method = "exact" if n <= EXACT_BELOW else "knn" if n <= SEMDEDUP_ABOVE else "semdedup"
    stats: dict[str, Any] = {"searched": n}
    t0 = time.perf_counter()
    if method == "exact" or n < 2:
        i, j, s = range_pairs_exact(x, threshold)
    else:  # knn: spread tuned to the recall target; semdedup: one list each
        i, j, s, tuned = range_pairs_partitioned(x, threshold, target_recall=target_recall, seed=seed,
                                                 spread=1 if method == "semdedup" else None)
        stats.update(tuned)
    stats["search_seconds"] = round(time.perf_counter() - t0, 3)
    if n < len(vecs.x):  # back to positions in the collection (reps ascend: i < j still holds)
        i, j = reps[i], reps[j]
    return _merge(vecs.x, vecs.x, (i, j, s), (ci, cj)), method, stats


def find_pairs_against(vecs: Vectors, ref: Vectors, threshold: float, method: Method = "auto",
                       target_recall: float = TARGET_PAIR_RECALL, seed: int = 0) -> tuple[Pairs, str, dict[str, Any]]:
    """Pairs (i in vecs, j in ref) with cosine >= threshold or identical content."""
    if method == "semdedup":
        raise IndexerError("--against compares two collections; use --method exact or knn")
    if method == "auto":
        method = "exact" if len(vecs.x) * len(ref.x) <= EXACT_PRODUCTS else "knn"
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
    return _merge(vecs.x, ref.x, (i, j, s), (hi, hj)), method, stats


def range_pairs_exact(base: np.ndarray, threshold: float, queries: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact: every query against every base vector, in blocked matrix products (the lists join with one
    list holding everything), so the base is never copied into an index and memory stays bounded. Within
    one collection each block of rows meets only the rows from its own start on: half the products."""
    if queries is not None:
        return _join(queries, [np.arange(len(queries))], base, [np.arange(len(base))], threshold, False)
    n = len(base)
    starts = range(0, n, JOIN_ROWS)
    return _join(base, (np.arange(s, min(s + JOIN_ROWS, n)) for s in starts), base, (np.arange(s, n) for s in starts),
                 threshold, True)


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


def _join(xq: np.ndarray, q_members: Iterable[np.ndarray], xb: np.ndarray, b_members: Iterable[np.ndarray],
          threshold: float, same: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact pairs >= threshold inside each list, queries against bases: matrix products in blocks of
    JOIN_ROWS x JOIN_COLS, so memory stays bounded whatever the list sizes, never n x n. With `same`,
    pairs come back once each as (smaller, larger) position. Past MAX_PAIRS found: IndexerError."""
    parts_i, parts_j, parts_s = [], [], []
    found = 0
    for qm, bm in zip(q_members, b_members):
        if len(qm) == 0 or len(bm) == 0:
            continue
        for bstart in range(0, len(bm), JOIN_COLS):
            bcols = bm[bstart : bstart + JOIN_COLS]
            xbm = xb[bcols]
            for start in range(0, len(qm), JOIN_ROWS):
                rows = qm[start : start + JOIN_ROWS]
                sims = xq[rows] @ xbm.T
                qi, qj = np.nonzero(sims >= threshold)
                a, b, sc = rows[qi], bcols[qj], sims[qi, qj]
                if same:
                    a, b = np.minimum(a, b), np.maximum(a, b)
                    keep = a != b
                    a, b, sc = a[keep], b[keep], sc[keep]
                parts_i.append(a)
                parts_j.append(b)
                parts_s.append(sc)
                found += len(a)
                if found > (2 if same else 1) * MAX_PAIRS:  # `same` finds most pairs from both ends
                    raise too_many_pairs(threshold, found // (2 if same else 1))
    if not parts_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return _unique(np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s))


def range_pairs_partitioned(base: np.ndarray, threshold: float, queries: np.ndarray | None = None,
                            target_recall: float = TARGET_PAIR_RECALL, seed: int = 0, spread: int | None = None,
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """All pairs >= threshold through k-means lists (an IVF partition of ~500 vectors per list). Each
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
        if tuned["estimated_pairs"] is not None and tuned["estimated_pairs"] > MAX_PAIRS:
            raise too_many_pairs(threshold, tuned["estimated_pairs"])
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
    # Pairs in the whole search, from the sample's share (a pair within one collection has two ends).
    at_t = int((s >= threshold).sum())
    estimate = at_t * len(queries) / len(sample) / (2 if same else 1)
    result: dict[str, Any] = {"spread": b_assign.shape[1], "tuned_at": round(t, 4), "tuning_pairs": int(len(i)),
                              "estimated_recall": None, "estimated_pairs": int(estimate)}
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


def _representatives(hashes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first position of each content hash (ascending), and each later copy linked to it (first, copy)."""
    first: dict[str, int] = {}
    reps, ii, jj = [], [], []
    for p, h in enumerate(hashes):
        q = first.setdefault(h, p)
        if q == p:
            reps.append(p)
        else:
            ii.append(q)
            jj.append(p)
    return (np.array(reps, dtype=np.int64), np.array(ii, dtype=np.int64), np.array(jj, dtype=np.int64))


def _merge(xa: np.ndarray, xb: np.ndarray, near: tuple, same: tuple) -> Pairs:
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
    """Score = (cosine + pHash similarity) / 2; keep pairs at or above the threshold (identical files always).
    Each image involved is decoded once."""
    from .dedup_calibrate import load_item, phash_pair, phash_similarity

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


# ---- groups and the keep policy ----------------------------------------------------------------------------

def components(n: int, i: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
    """Connected components with more than one member, as sorted positions, ordered by their first member."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(i):
        return []
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    members = np.flatnonzero(np.bincount(labels)[labels] > 1)  # ascending positions
    order = np.argsort(labels[members], kind="stable")
    members, labs = members[order], labels[members][order]
    groups = np.split(members, np.flatnonzero(np.diff(labs)) + 1)
    return sorted(groups, key=lambda g: int(g[0]))


def _groups(coll: Collection, vecs: Vectors, pairs: Pairs, keep: str):
    i, j, s, _ = pairs
    groups = components(len(vecs.ids), i, j)
    kept = _choose(coll, vecs, groups, keep)
    # The strongest edge that ties each dropped item into its group ("via"): per item, its best-scored pair.
    u, v, sc = np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([s, s])
    order = np.lexsort((-sc, u))
    u, v, sc = u[order], v[order], sc[order]
    top = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    best = dict(zip(u[top].tolist(), zip(sc[top].tolist(), v[top].tolist())))
    out_groups, drop, dropped = [], [], []
    for g, k in zip(groups, kept):
        rest = [int(m) for m in g if m != k]
        out_groups.append([vecs.ids[k]] + [vecs.ids[m] for m in rest])
        cos = vecs.x[rest] @ vecs.x[k]
        for m, c in zip(rest, cos.tolist()):
            score, via = best[m]
            drop.append(vecs.ids[m])
            dropped.append({"id": vecs.ids[m], "kept": vecs.ids[k], "score": round(c, 6),
                            "via": vecs.ids[via], "via_score": round(score, 6)})
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


def _check_keep(coll: Collection, keep: str) -> None:
    """Refuse a keep policy the collection cannot answer, before anything is searched or deleted."""
    names = coll.result_columns()
    if keep == "longest" and "text" not in names:
        raise IndexerError(f"--keep longest compares texts; {coll.path} has none (use largest for images)")
    if keep == "largest" and "text" not in names and "path" not in names:
        raise IndexerError(f"--keep largest needs texts or image files; {coll.path} has neither "
                           "(use first, oldest or central)")


def _sizes(coll: Collection, ids: list[str], keep: str) -> dict[str, float]:
    if "text" in coll.result_columns():
        rows = coll.rows_by_id(ids, columns=["id", "text"])
        if keep == "longest":
            return {i: len(r["text"] or "") for i, r in rows.items()}
        return {i: len((r["text"] or "").encode()) for i, r in rows.items()}
    from ..sources.images import ImageDecodeError, decode_image

    out: dict[str, float] = {}
    for i, r in coll.rows_by_id(ids, columns=["id", "path"]).items():
        try:
            data = Path(r["path"]).read_bytes()
            img = decode_image(data)  # oriented, bomb-guarded: the size a viewer shows
            out[i] = img.size[0] * img.size[1] + len(data) / 1e12  # bytes break ties among equal sizes
        except (ImageDecodeError, OSError, TypeError):
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

def _after_write(coll: Collection) -> None:
    from ..index import update_after_ingest

    coll.table.checkout_latest()
    update_after_ingest(coll)  # FAISS: tombstones the deleted rows (or adds restored ones) and saves
    coll.touch()
