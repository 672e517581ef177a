"""Rows + vectors -> an Arrow table that fits the collection's schema (user fields included)."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

BASE_COLUMNS = ("id", "vector", "content_hash", "record_hash", "source")
# A field that is null in a whole first batch still needs its real type (a passage's page is an
# integer, null for documents without pages).
NULL_TYPES = {"page": pa.int64(), "chunk": pa.int64(), "start": pa.int64(), "end": pa.int64()}


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def _column(values: list[Any], name: str = "") -> pa.Array:
    """Infer one user field's type; mixed or nested values are kept as JSON text."""
    try:
        arr = pa.array(values)
        if pa.types.is_null(arr.type):
            return pa.array(values, type=NULL_TYPES.get(name, pa.string()))
        if not (pa.types.is_struct(arr.type) or pa.types.is_list(arr.type) or pa.types.is_map(arr.type)):
            return arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, default=str)
                     for v in values], type=pa.string())


def rows_to_table(rows: list[dict[str, Any]], vectors: np.ndarray) -> pa.Table:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {"id": pa.array([r["id"] for r in rows], type=pa.string()), "vector": vector_array(vectors)}
    for name in names:
        if name != "id":
            columns[name] = _column([r.get(name) for r in rows], name)
    return pa.table(columns)


def conform(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table, list[pa.Field]]:
    """Cast `table` to `schema`; returns it plus the fields the schema lacks (to add as columns).
    A value that cannot take the column's type becomes null, with a warning, rather than failing the run."""
    new_fields = [table.schema.field(n) for n in table.column_names if n not in schema.names]
    out = {}
    n = table.num_rows
    for fld in list(schema) + new_fields:
        if fld.name not in table.column_names:
            out[fld.name] = pa.nulls(n, type=fld.type)
            continue
        col = table[fld.name]
        if col.type != fld.type:
            try:
                col = col.cast(fld.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                if pa.types.is_string(fld.type):
                    col = pa.array([None if v is None else str(v) for v in col.to_pylist()], type=pa.string())
                else:
                    log.warning("field %r: values of type %s do not fit the column's %s; stored as null",
                                fld.name, col.type, fld.type)
                    col = pa.nulls(n, type=fld.type)
        out[fld.name] = col
    return pa.table(out), new_fields
