"""Full-text (BM25) search over the stored `text` column, through Lance's native inverted index.

The index is derived like the ANN ones: ingest builds it for text collections and folds new rows into
it; a collection made before it existed gets it on its first text search. Rows added since the last
refresh are still found (Lance scans them), and deleted rows never are.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import IndexerError
from ..store import Collection
from ..store.collection import check_where, lance_reason, where_error

log = logging.getLogger(__name__)

TEXT_COLUMN = "text"
MAX_SEGMENTS = 8
FTS_INDEX = "text_fts"
# English stemming and stop words, accents folded; positions kept so "quoted phrases" work.
FTS_PARAMS = {"with_position": True, "stem": True, "remove_stop_words": True, "ascii_folding": True,
              "lower_case": True, "language": "English"}


def has_text(coll: Collection) -> bool:
    table = coll.table
    return table is not None and TEXT_COLUMN in table.schema.names


def require_text(coll: Collection, mode: str = "text") -> None:
    if not has_text(coll):
        raise IndexerError(f"{coll.path} stores no text ({coll.spec.modality} collection): --mode {mode} "
                           "searches stored text; use --mode vector")


def has_fts_index(coll: Collection) -> bool:
    ds = coll.dataset()
    return ds is not None and any(ix["name"] == FTS_INDEX for ix in ds.list_indices())


def update_fts_index(coll: Collection) -> None:
    """Build the index if the collection has text and none yet, else fold unindexed rows into it.
    The caller holds the write lock."""
    if not has_text(coll):
        return
    ds = coll.dataset()
    if not has_fts_index(coll):
        log.info("building the full-text index over %d rows", ds.count_rows())
        ds.create_scalar_index(TEXT_COLUMN, index_type="INVERTED", name=FTS_INDEX, replace=True, **FTS_PARAMS)
    else:
        stats = ds.stats.index_stats(FTS_INDEX)
        if stats.get("num_unindexed_rows", 0):
            # New rows go into a new segment (a few % of a full build; merging every segment costs a
            # third of one); segments are merged once there are enough to slow queries.
            segments = stats.get("num_indices", 1)
            ds.optimize.optimize_indices(index_names=[FTS_INDEX],
                                         num_indices_to_merge=segments if segments >= MAX_SEGMENTS else 0)


def ensure_fts_index(coll: Collection) -> None:
    """Collections from before full-text search get their index on the first text query."""
    if not has_fts_index(coll):
        with coll.write_lock("full-text index"):
            update_fts_index(coll)


def fts_search(coll: Collection, query: str, k: int, where: str | None = None,
               columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The k rows that best match `query` by BM25, best first: [{"id", "score" (BM25), ...fields}].
    Terms are OR-ed; "a quoted phrase" must appear as written."""
    require_text(coll)
    if not query or not query.strip():
        raise IndexerError("the text query is empty")
    columns = columns or coll.result_columns()
    check_where(where)
    try:
        table = coll.dataset().scanner(columns=[*columns, "_score"], full_text_query=query, filter=where,
                                       prefilter=where is not None, limit=k).to_table()
    except RuntimeError as exc:  # a filter Lance's planner does not implement (see where_error)
        if not where:
            raise
        raise where_error(where, exc) from exc
    except ValueError as exc:  # lance reports SQL, column and query-syntax errors as ValueError
        reason = lance_reason(exc)
        if where and ("Schema error" in reason or "SQL syntax error" in reason):
            raise where_error(where, exc) from exc
        raise IndexerError(f"invalid text query {query!r}: {reason}") from exc
    hits = [{"id": r.pop("id"), "score": float(r.pop("_score")), **r} for r in table.to_pylist()]
    return sorted(hits, key=lambda h: -h["score"])
