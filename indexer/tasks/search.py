"""Similarity search over a collection: text, image, id or vector queries, one or many at once."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import IndexerError
from ..models import Embedder, load_embedder, resolve_runtime, respec
from ..store import Collection
from .hybrid import HYBRID_DEPTH, group_by_document, reciprocal_rank_fusion

Engine = Literal["auto", "exact", "faiss", "lance"]
ENGINES = ("auto", "exact", "faiss", "lance")
Mode = Literal["vector", "text", "hybrid"]
MODES = ("vector", "text", "hybrid")
EXACT_FILTER_ROWS = 20_000  # a --where matching fewer rows than this is searched exactly

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """One query: exactly one of text, image (a file path, or an image already decoded to RGB),
    id (a stored item) or vector."""

    text: str | None = None
    image: Any = None
    id: str | None = None
    vector: Sequence[float] | None = None

    @classmethod
    def from_json(cls, obj: Any, where: str = "query") -> Query:
        if not isinstance(obj, dict):
            raise IndexerError(f"{where}: expected an object like {{\"query\": \"...\"}}")
        keys = [k for k in ("query", "image", "id", "vector") if obj.get(k) is not None]
        if len(keys) != 1:
            raise IndexerError(f"{where}: give exactly one of query, image, id, vector")
        key = keys[0]
        return cls(**{"text" if key == "query" else key: obj[key]})

    def kind(self) -> str:
        return next(k for k in ("text", "image", "id", "vector") if getattr(self, k) is not None)

    def echo(self) -> dict[str, Any]:
        """How the query is shown next to its results (vectors are not echoed)."""
        kind = self.kind()
        return {"query": self.text} if kind == "text" else {kind: "<vector>" if kind == "vector" else getattr(self, kind)}


def search(collection: Collection | str, query: str | None = None, *, image: str | None = None,
           id: str | None = None, vector: Sequence[float] | None = None, k: int = 10, where: str | None = None,
           engine: Engine = "auto", device: str = "auto", nprobe: int | None = None,
           ef: int | None = None, mode: Mode = "vector", group_by_doc: bool = False) -> list[dict[str, Any]]:
    """Nearest items to one query, best first: [{"id", "score", ...stored fields}] (score: cosine for
    mode vector, BM25 for text, fused reciprocal-rank score for hybrid).

    >>> search("notes.idx", "how do plants make energy", k=3)      # doctest: +SKIP
    [{'id': 'bio/photosynthesis.md', 'score': 0.71, 'text': ...}, ...]
    """
    q = Query(text=query, image=image, id=id, vector=vector)
    if sum(v is not None for v in (query, image, id, vector)) != 1:
        raise IndexerError("give exactly one query: text, --image PATH, --id ID or a vector")
    return search_batch(collection, [q], k=k, where=where, engine=engine, device=device, nprobe=nprobe, ef=ef,
                        mode=mode, group_by_doc=group_by_doc)[0]


def search_batch(collection: Collection | str, queries: list[Query], *, k: int = 10, where: str | None = None,
                 engine: Engine = "auto", device: str = "auto", nprobe: int | None = None,
                 ef: int | None = None, mode: Mode = "vector",
                 group_by_doc: bool = False) -> list[list[dict[str, Any]]]:
    """Results for many queries in input order; text and image queries are embedded in batches.

    engine: `exact` scans every vector; `faiss` uses the collection's ANN index (caught up with the
    store first); `auto` uses the index when there is one. `nprobe`/`ef` override the tuned knobs.
    mode: `vector` ranks by embedding similarity; `text` by BM25 over the stored text (full-text
    index); `hybrid` fuses both rankings by reciprocal rank fusion (tasks/hybrid.py: `vector_score`
    and `text_score` say what each contributed). group_by_doc: the k best documents, each as its best
    passage with `other_chunks`.
    """
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    if k < 1:
        raise IndexerError("-k must be at least 1")
    if engine not in ENGINES:
        raise IndexerError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if mode not in MODES:
        raise IndexerError(f"--mode {mode}: choose one of {', '.join(MODES)}")
    if not queries:
        return []
    if coll.count() == 0:  # one answer for every mode and engine (the text modes would miss the text column)
        raise IndexerError(f"{coll.path} is empty: ingest something first")
    if mode != "vector":
        _check_text_mode(coll, queries, mode)

    # Embedded once: a --group-by-doc search that looks deeper repeats only the ranking.
    vectors = _query_vectors(coll, queries, device) if mode != "text" else None

    def ranked(depth: int) -> list[list[dict[str, Any]]]:
        return _ranked(coll, queries, vectors, depth, mode, where, engine, nprobe, ef)

    if not group_by_doc:
        return [hits[:k] for hits in ranked(k)]
    # Several passages of one document can fill the top: look deeper until k documents are found.
    depth, total = max(4 * k, HYBRID_DEPTH), coll.count()
    while True:
        results = ranked(depth)
        groups = [group_by_document(hits, k) for hits in results]
        if depth >= total or all(len(g) >= k or len(h) < depth - 1 for g, h in zip(groups, results)):
            return groups
        depth *= 4


def _check_text_mode(coll: Collection, queries: list[Query], mode: str) -> None:
    from ..index.fulltext import ensure_fts_index, require_text

    require_text(coll, mode)
    if any(q.text is None for q in queries):
        raise IndexerError(f"--mode {mode} needs a text query (not --image, --id or a vector)")
    ensure_fts_index(coll)


def _ranked(coll: Collection, queries: list[Query], vectors: np.ndarray | None, depth: int, mode: str,
            where: str | None, engine: str, nprobe: int | None, ef: int | None) -> list[list[dict[str, Any]]]:
    """Up to `depth` hits per query, best first, ranked the way `mode` says."""
    from ..index.fulltext import fts_search

    if mode == "text":
        return [fts_search(coll, q.text, depth, where) for q in queries]
    each = depth if mode == "vector" else max(depth, HYBRID_DEPTH)
    by_vector = _vector_hits(coll, queries, vectors, each, where, engine, nprobe, ef)
    if mode == "vector":
        return by_vector
    return [reciprocal_rank_fusion(v, fts_search(coll, q.text, each, where))[:depth]
            for q, v in zip(queries, by_vector)]


def _vector_hits(coll: Collection, queries: list[Query], vectors: np.ndarray, k: int, where: str | None,
                 engine: str, nprobe: int | None, ef: int | None) -> list[list[dict[str, Any]]]:
    # An --id query finds its own row first; ask for one more and drop it.
    extra = 1 if any(q.id is not None for q in queries) else 0
    if engine == "lance":
        return _lance(coll, queries, vectors, k, extra, where, nprobe)
    index = index_for(coll, engine)
    if index is None:
        ranked, rows = _exact(coll, vectors, k + extra, where)
    else:
        knobs = {key: v for key, v in (("nprobe", nprobe), ("ef", ef)) if v is not None}
        ranked, rows = _ann(coll, index, vectors, k + extra, where, knobs)
    results = []
    for q, (ids, scores) in zip(queries, ranked):
        hits = [{"id": i, "score": float(s), **{c: v for c, v in rows[i].items() if c != "id"}}
                for i, s in zip(ids, scores) if i in rows and i != q.id]
        results.append(hits[:k])
    return results


def _lance(coll: Collection, queries: list[Query], vectors: np.ndarray, k: int, extra: int, where: str | None,
           nprobe: int | None) -> list[list[dict[str, Any]]]:
    from ..index import lance_meta, lance_search

    meta = lance_meta(coll)
    if meta is None:
        raise IndexerError(f"{coll.path} has no Lance index: build one with `indexer index {coll.path} --engine lance`")
    knobs = {**meta["params"], **({"nprobes": nprobe} if nprobe else {})}
    columns = coll.result_columns()
    return [[h for h in lance_search(coll, v, k + extra, knobs, where, columns) if h["id"] != q.id][:k]
            for q, v in zip(queries, vectors)]


def index_for(coll: Collection, engine: str):
    """The FAISS index `engine` asks for (None: search exactly), caught up with the store."""
    if engine == "exact":
        return None
    from ..index import current_index

    try:
        index = current_index(coll)
    except IndexerError as exc:
        if engine == "faiss" or "being written" not in str(exc):
            raise
        log.info("the collection is being written; searching exactly until its index can catch up")
        return None
    if index is None and engine == "faiss":
        raise IndexerError(f"{coll.path} has no index: build one with `indexer index {coll.path}`")
    return index


Ranked = list[tuple[list[str], list[float]]]  # per query: ids and scores, best first


def _exact(coll: Collection, vectors: np.ndarray, k: int, where: str | None) -> tuple[Ranked, dict[str, dict]]:
    row_ids, scores = exact_search(coll, vectors, k, where)
    by_row = coll.rows_by_row_id(sorted({r for ids in row_ids for r in ids}))
    ranked = [([by_row[r]["id"] for r in ids], sc) for ids, sc in zip(row_ids, scores)]
    return ranked, {row["id"]: row for row in by_row.values()}


def _ann(coll: Collection, index, vectors: np.ndarray, k: int, where: str | None,
         knobs: dict[str, int]) -> tuple[Ranked, dict[str, dict]]:
    allowed = None
    if where:
        import pyarrow as pa

        matching = [b.column("id") for b in coll.scan(["id"], where)]
        ids = pa.concat_arrays(matching) if matching else pa.array([], pa.string())
        # Few matches: exact search among them is both exact and faster than a filtered graph walk.
        if len(ids) <= max(EXACT_FILTER_ROWS, 0.05 * len(index.live)):
            return _exact(coll, vectors, k, where)
        allowed = index.mask_for_ids(ids)
    positions, scores = index.search(vectors, k, allowed=allowed, knobs=knobs)
    ranked = []
    for pos, sc in zip(positions, scores):
        valid = pos >= 0
        ranked.append((index.ids_at(pos[valid]), [float(s) for s in sc[valid]]))
    return ranked, coll.rows_by_id({i for ids, _ in ranked for i in ids})


def exact_search(coll: Collection, queries: np.ndarray, k: int, where: str | None = None,
                 ) -> tuple[list[list[int]], list[list[float]]]:
    """Brute-force cosine top-k, streaming the vectors in blocks (memory stays bounded).
    Returns Lance row ids and scores per query, best first."""
    m = queries.shape[0]
    best_s = np.full((m, 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((m, 0), dtype=np.uint64)
    for batch in coll.scan(["vector"], where=where, with_row_id=True, batch_size=65536):
        if batch.num_rows == 0:
            continue
        block = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
        if not coll.spec.normalize:
            block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        s = queries @ block.T
        rid = np.broadcast_to(batch.column("_rowid").to_numpy(), s.shape)
        s = np.concatenate([best_s, s], axis=1)
        rid = np.concatenate([best_r, rid], axis=1)
        if s.shape[1] > k:
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, rid = np.take_along_axis(s, top, 1), np.take_along_axis(rid, top, 1)
        best_s, best_r = s, rid
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s, best_r = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)
    return [list(map(int, r)) for r in best_r], [list(s) for s in best_s]


def _query_vectors(coll: Collection, queries: list[Query], device: str) -> np.ndarray:
    spec = coll.spec
    out = np.zeros((len(queries), spec.dim), dtype=np.float32)
    embed_idx = [i for i, q in enumerate(queries) if q.text is not None or q.image is not None]
    for q in queries:
        if q.text is not None and spec.modality != "text":
            raise IndexerError(f"{coll.path} holds {spec.modality} embeddings ({spec.name}): "
                               "search it with --image PATH, --id ID or a vector")
        if q.image is not None and spec.modality != "image":
            raise IndexerError(f"{coll.path} holds {spec.modality} embeddings ({spec.name}): "
                               "search it with a text query, --id ID or a vector")
    if embed_idx:
        embedder = query_embedder(coll, device)
        items = [queries[i].text if queries[i].text is not None else _load_query_image(queries[i].image)
                 for i in embed_idx]
        out[embed_idx] = embedder.embed(items)
    id_queries = {q.id for q in queries if q.id is not None}
    if id_queries:
        stored = coll.rows_by_id(id_queries, columns=["id", "vector"])
        missing = id_queries - stored.keys()
        if missing:
            raise IndexerError(f"id not found in {coll.path}: {', '.join(sorted(map(str, missing))[:5])}")
    for i, q in enumerate(queries):
        if q.id is not None:
            out[i] = stored[q.id]["vector"]
        elif q.vector is not None:
            vec = np.asarray(q.vector, dtype=np.float32).reshape(-1)
            if vec.shape[0] != spec.dim:
                raise IndexerError(f"query vector has {vec.shape[0]} dimensions; {coll.path} has {spec.dim}")
            out[i] = vec
    if not np.isfinite(out).all():  # NaN scores would rank nothing and are not valid JSON
        raise IndexerError("a query vector has NaN or infinite values")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if (norms == 0).any():
        raise IndexerError("a query vector is all zeros: cosine similarity is undefined")
    return out / norms


_EMBEDDERS: dict[tuple, Embedder] = {}


def query_embedder(coll: Collection, device: str) -> Embedder:
    """The collection's model, loaded once per process (loading takes seconds; queries take ms)."""
    key = (json.dumps(coll.spec.identity(), sort_keys=True), coll.spec.path, device)
    if key not in _EMBEDDERS:
        embedder = load_embedder(respec(coll.spec), resolve_runtime(device))
        coll.check_compatible(embedder.spec)
        _EMBEDDERS[key] = embedder
    return _EMBEDDERS[key]


def _load_query_image(path: Any):
    from ..sources.images import ImageDecodeError, decode_image

    if not isinstance(path, str | Path):  # decoded already (an upload the server checked)
        return path
    try:
        return decode_image(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise IndexerError(f"query image not found: {path}") from exc
    except (ImageDecodeError, OSError) as exc:
        raise IndexerError(f"cannot read query image {path}: {exc}") from exc
