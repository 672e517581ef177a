"""Similarity search over a collection: text, image, id or vector queries, one or many at once."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import IndexerError
from ..index.exact import exact_search
from ..models import Embedder, load_embedder, query_runtime, respec
from ..models.device import Backend
from ..store import Collection
from ..threads import few_threads
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

    @staticmethod
    def pick(given: dict[str, Any], error: Callable[[str], Exception] = IndexerError) -> str:
        """The name of the one set value in `given`: the query's fields (or the caller's batch input),
        named the way the caller's user names them, in order. Else `error("give exactly one of A, B or
        C")`, prefixed "empty query: " when none is set.

        >>> Query.pick({"QUERY": None, "--image": "cat.jpg", "--id": None})
        '--image'
        """
        named = [name for name, value in given.items() if value is not None]
        if len(named) != 1:
            *first, last = given
            raise error(f"{'' if named else 'empty query: '}give exactly one of {', '.join(first)} or {last}")
        return named[0]

    @classmethod
    def from_json(cls, obj: Any, where: str = "query") -> Query:
        if not isinstance(obj, dict):
            raise IndexerError(f"{where}: expected an object like {{\"query\": \"...\"}}")
        key = cls.pick({k: obj.get(k) for k in ("query", "image", "id", "vector")},
                       lambda message: IndexerError(f"{where}: {message}"))
        value = obj[key]
        if key != "vector" and not isinstance(value, str):
            raise IndexerError(f"{where}: {key!r} must be a string, not {type(value).__name__}")
        if key == "vector":
            numbers = isinstance(value, list) and value and not any(isinstance(x, bool | str) for x in value)
            try:
                value = [float(x) for x in value] if numbers else None
            except (TypeError, OverflowError):  # a nested value, or an integer past float range
                value = None
            if value is None:
                raise IndexerError(f"{where}: 'vector' must be a non-empty list of numbers")
        return cls(**{"text" if key == "query" else key: value})

    def kind(self) -> str:
        return next(k for k in ("text", "image", "id", "vector") if getattr(self, k) is not None)

    def echo(self) -> dict[str, Any]:
        """How the query is shown next to its results (vectors are not echoed)."""
        kind = self.kind()
        return {"query": self.text} if kind == "text" else {kind: "<vector>" if kind == "vector" else getattr(self, kind)}


def search(collection: Collection | str, query: str | None = None, *, image: str | None = None,
           id: str | None = None, vector: Sequence[float] | None = None, k: int = 10, where: str | None = None,
           engine: Engine = "auto", device: str = "auto", nprobe: int | None = None,
           ef: int | None = None, mode: Mode = "vector", group_by_doc: bool = False,
           fields: Sequence[str] | str | None = None) -> list[dict[str, Any]]:
    """Nearest items to one query, best first: [{"id", "score", ...stored fields}] (score: cosine for
    mode vector, BM25 for text, fused reciprocal-rank score for hybrid). fields: the stored fields each
    hit carries (default: id, text or path, label, and a passage's place in its document; "all": every
    field); only those are read.

    >>> search("notes.idx", "how do plants make energy", k=3)      # doctest: +SKIP
    [{'id': 'bio/photosynthesis.md', 'score': 0.71, 'text': ...}, ...]
    """
    Query.pick({"a text query": query, "--image PATH": image, "--id ID": id, "a vector": vector})
    q = Query(text=query, image=image, id=id, vector=vector)
    return search_batch(collection, [q], k=k, where=where, engine=engine, device=device, nprobe=nprobe, ef=ef,
                        mode=mode, group_by_doc=group_by_doc, fields=fields)[0]


def search_batch(collection: Collection | str, queries: list[Query], *, k: int = 10, where: str | None = None,
                 engine: Engine = "auto", device: str = "auto", nprobe: int | None = None,
                 ef: int | None = None, mode: Mode = "vector", group_by_doc: bool = False,
                 fields: Sequence[str] | str | None = None,
                 query_backend: Backend = "torch") -> list[list[dict[str, Any]]]:
    """Results for many queries in input order; text and image queries are embedded in batches
    (`query_backend`: see query_embedder).

    engine: `exact` scans every vector; `faiss` uses the collection's ANN index (caught up with the
    store first); `auto` uses the index when there is one. `nprobe`/`ef` override the tuned knobs.
    mode: `vector` ranks by embedding similarity; `text` by BM25 over the stored text (full-text
    index); `hybrid` fuses both rankings by reciprocal rank fusion (tasks/hybrid.py: `vector_score`
    and `text_score` say what each contributed). group_by_doc: the k best documents, each as its best
    passage with `other_chunks`.
    """
    coll = collection if isinstance(collection, Collection) else Collection.open_for_reading(collection)
    with coll.one_version():
        return _search_batch(coll, queries, k, where, engine, device, nprobe, ef, mode, group_by_doc, fields,
                             query_backend)


def _search_batch(coll: Collection, queries: list[Query], k: int, where: str | None, engine: Engine, device: str,
                  nprobe: int | None, ef: int | None, mode: Mode, group_by_doc: bool,
                  fields: Sequence[str] | str | None, query_backend: Backend) -> list[list[dict[str, Any]]]:
    if k < 1:
        raise IndexerError("-k must be at least 1")
    if engine not in ENGINES:
        raise IndexerError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if mode not in MODES:
        raise IndexerError(f"--mode {mode}: choose one of {', '.join(MODES)}")
    if not queries:
        return []
    columns = coll.hit_columns(fields)
    if group_by_doc:  # grouping needs to know each passage's document
        columns += [c for c in ("doc_id", "chunk") if c in coll.result_columns() and c not in columns]
    if coll.count() == 0:  # one answer for every mode and engine (the text modes would miss the text column)
        raise coll.empty()
    if mode != "vector":
        _check_text_mode(coll, queries, mode)

    # Embedded once: a --group-by-doc search that looks deeper repeats only the ranking.
    vectors = _query_vectors(coll, queries, device, query_backend) if mode != "text" else None

    def ranked(depth: int) -> list[list[dict[str, Any]]]:
        return _ranked(coll, queries, vectors, depth, mode, where, engine, nprobe, ef, columns)

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
            where: str | None, engine: str, nprobe: int | None, ef: int | None,
            columns: list[str]) -> list[list[dict[str, Any]]]:
    """Up to `depth` hits per query, best first, ranked the way `mode` says."""
    from ..index.fulltext import fts_search

    if mode == "text":
        return [fts_search(coll, q.text, depth, where, columns) for q in queries]
    each = depth if mode == "vector" else max(depth, HYBRID_DEPTH)
    by_vector = _vector_hits(coll, queries, vectors, each, where, engine, nprobe, ef, columns)
    if mode == "vector":
        return by_vector
    return [reciprocal_rank_fusion(v, fts_search(coll, q.text, each, where, columns))[:depth]
            for q, v in zip(queries, by_vector)]


def _vector_hits(coll: Collection, queries: list[Query], vectors: np.ndarray, k: int, where: str | None,
                 engine: str, nprobe: int | None, ef: int | None, columns: list[str]) -> list[list[dict[str, Any]]]:
    # An --id query finds its own row first; ask for one more and drop it.
    extra = 1 if any(q.id is not None for q in queries) else 0
    if engine == "lance":
        return _lance(coll, queries, vectors, k, extra, where, nprobe, columns)
    index = index_for(coll, engine)
    if index is None:
        ranked, rows = _exact(coll, vectors, k + extra, where, columns)
    else:
        knobs = {key: v for key, v in (("nprobe", nprobe), ("ef", ef)) if v is not None}
        ranked, rows = _ann(coll, index, vectors, k + extra, where, knobs, columns)
    results = []
    for q, (ids, scores) in zip(queries, ranked):
        hits = [{"id": i, "score": float(s), **{c: v for c, v in rows[i].items() if c != "id"}}
                for i, s in zip(ids, scores) if i in rows and i != q.id]
        results.append(hits[:k])
    return results


def _lance(coll: Collection, queries: list[Query], vectors: np.ndarray, k: int, extra: int, where: str | None,
           nprobe: int | None, columns: list[str]) -> list[list[dict[str, Any]]]:
    from ..index import lance_meta, lance_search

    meta = lance_meta(coll)
    if meta is None:
        raise IndexerError(f"{coll.path} has no Lance index: build one with `indexer index {coll.path} --engine lance`")
    knobs = {**meta["params"], **({"nprobes": nprobe} if nprobe else {})}
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


def _exact(coll: Collection, vectors: np.ndarray, k: int, where: str | None,
           columns: list[str]) -> tuple[Ranked, dict[str, dict]]:
    row_ids, scores, version = exact_search(coll, vectors, k, where)
    by_row = coll.rows_by_row_id(sorted({r for ids in row_ids for r in ids}), columns, version)
    ranked = [([by_row[r]["id"] for r in ids], sc) for ids, sc in zip(row_ids, scores)]
    return ranked, {row["id"]: row for row in by_row.values()}


def _ann(coll: Collection, index, vectors: np.ndarray, k: int, where: str | None,
         knobs: dict[str, int], columns: list[str]) -> tuple[Ranked, dict[str, dict]]:
    allowed = None
    if where:
        allowed = index.mask_for(coll, where)
        # Few matches: exact search among them is both exact and faster than a filtered graph walk.
        if allowed.sum() <= max(EXACT_FILTER_ROWS, 0.05 * len(index.live)):
            return _exact(coll, vectors, k, where, columns)
    positions, scores = index.search(vectors, k, allowed=allowed, knobs=knobs)
    ranked = []
    for pos, sc in zip(positions, scores):
        valid = pos >= 0
        ranked.append((index.ids_at(pos[valid]), [float(s) for s in sc[valid]]))
    return ranked, index.rows_at(coll, positions[positions >= 0], columns)


def _query_vectors(coll: Collection, queries: list[Query], device: str, query_backend: Backend) -> np.ndarray:
    spec = coll.spec
    out = np.zeros((len(queries), spec.dim), dtype=np.float32)
    embed_idx = [i for i, q in enumerate(queries) if q.text is not None or q.image is not None]
    for q in queries:
        if q.text is not None and not spec.accepts("text"):
            raise IndexerError(f"{coll.path} holds {spec.modality} embeddings ({spec.name}): "
                               "search it with --image PATH, --id ID or a vector")
        if q.image is not None and not spec.accepts("image"):
            raise IndexerError(f"{coll.path} holds {spec.modality} embeddings ({spec.name}): "
                               "search it with a text query, --id ID or a vector")
    if embed_idx:
        embedder = query_embedder(coll, device, query_backend)
        min_size = embedder.spec.preprocessing.get("resize")
        items = [queries[i].text if queries[i].text is not None else _load_query_image(queries[i].image, min_size)
                 for i in embed_idx]
        with few_threads(len(items)):
            out[embed_idx] = embedder.embed(items)
    id_queries = {q.id for q in queries if q.id is not None}
    if id_queries:
        stored = coll.rows_by_id(id_queries, columns=["id", "vector"])
        missing = id_queries - stored.keys()
        if missing:
            raise IndexerError(f"id not found in {coll.path}: {', '.join(map(repr, sorted(map(str, missing))[:5]))}")
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
# An fp32 export standing in for torch must give torch's vectors (measured: cosine 0.9999999 for MiniLM).
SAME_VECTORS = 0.9999


def query_embedder(coll: Collection, device: str, query_backend: Backend = "torch") -> Embedder:
    """The collection's model, loaded once per process (loading takes seconds; queries take ms).
    `query_backend` (onnx, openvino) runs a torch fp32 collection's queries on a CPU through an fp32 export
    of the same weights instead, checked here to give the same vectors."""
    key = (json.dumps(coll.spec.identity(), sort_keys=True), coll.spec.path, device, query_backend)
    if key not in _EMBEDDERS:
        runtime = query_runtime(coll.spec.backend, coll.spec.precision, device, query_backend)
        embedder = load_embedder(respec(coll.spec), runtime)
        if runtime.backend != coll.spec.backend:
            _check_same_vectors(embedder, query_embedder(coll, device))
            embedder.spec = replace(embedder.spec, backend=coll.spec.backend)
        coll.check_compatible(embedder.spec)
        _EMBEDDERS[key] = embedder
    return _EMBEDDERS[key]


def _check_same_vectors(embedder: Embedder, reference: Embedder) -> None:
    from PIL import Image

    if reference.spec.accepts("text"):
        samples = ["warm up", "a longer query: which river runs through the old city, past the market?"]
    else:
        noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        samples = [Image.fromarray(noise), Image.new("RGB", (64, 64), "gray")]
    a, b = embedder.embed(samples), reference.embed(samples)
    cosine = float(((a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
    if cosine < SAME_VECTORS:
        raise IndexerError(f"the {embedder.spec.backend} export of {reference.spec.name} gives other vectors than "
                           f"torch (cosine {cosine:.6f}): embed queries with torch")


def _load_query_image(path: Any, min_size: int | None):
    """Decoded as ingest decodes (JPEG scaled in the DCT to `min_size`): a stored image found again
    scores 1.0, even through an int8 model that amplifies small pixel differences."""
    from ..sources.images import ImageDecodeError, decode_image

    if not isinstance(path, str | Path):  # decoded already (an upload the server checked)
        return path
    try:
        return decode_image(Path(path).read_bytes(), min_size)
    except FileNotFoundError as exc:
        raise IndexerError(f"query image not found: {path}") from exc
    except (ImageDecodeError, OSError) as exc:
        raise IndexerError(f"cannot read query image {path}: {exc}") from exc
