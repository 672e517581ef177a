"""A collection directory: LanceDB table `items` + manifest.json + errors.jsonl.

The Lance table is the source of truth. Every write is one Lance commit (a new version), so a run
killed at any moment leaves the last committed state, never half a batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import IndexerError
from ..sources.records import SkippedInput
from ..spec import ModelSpec
from ..wording import one_line
from .arrow import conform, rows_to_table
from .location import Location, is_remote
from .manifest import MANIFEST, Manifest, now_iso
from .versions import damaged_table, is_lance_damage, latest_manifest, list_versions, restore_version

log = logging.getLogger(__name__)

TABLE = "items"
ERRORS = "errors.jsonl"
HIDDEN_COLUMNS = ("vector", "record_hash")
# What a search hit carries unless the caller names its fields: what the item is (text or path), its label,
# and where a passage sits in its document. Other fields are read only when asked for (`fields="all"`).
DEFAULT_FIELDS = ("id", "text", "path", "label", "doc_id", "chunk", "start", "end", "page", "heading")


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# Columns Lance adds to what a filter may name (row ids, addresses, versions, scores): not the user's fields.
_LANCE_COLUMN = re.compile(r"_(row\w*|distance|score|relevance_score)")


def lance_reason(exc: Exception) -> str:
    """Lance's error message for a user: without its prefix, the Rust source location, the SQL it
    wraps a filter in, and its own columns in a list of the valid fields."""
    reason = str(exc).split(", /")[0].removeprefix("Invalid user input: ")
    syntax = re.match(r"Error parsing statement: .* \(sql parser error: (.*)\)$", reason, re.S)
    if syntax:
        return f"SQL syntax error: {syntax[1]}"

    def user_fields(m: re.Match) -> str:
        names = [n for n in m[1].split(", ") if n not in HIDDEN_COLUMNS and not _LANCE_COLUMN.fullmatch(n)]
        return f"Valid fields are {', '.join(names)}."
    return re.sub(r"Valid fields are (.*?)\.?$", user_fields, reason, flags=re.S)


_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`")
_PLACEHOLDER = re.compile(r"(?<![\w$])\$[\w$]")


def check_where(where: str | None) -> None:
    """Refuse what Lance's planner would panic on (printing a Rust backtrace): a `$1` placeholder outside
    quotes. Everything else in a filter is Lance's to accept or refuse."""
    if where is not None and _PLACEHOLDER.search(_QUOTED.sub("''", where)):
        raise where_error(where, ValueError("placeholders such as $1 are not supported: write the value itself"))


def where_error(where: str, exc: Exception) -> IndexerError:
    """The user error for a `--where` filter Lance refused (it reports SQL and column errors as ValueError;
    a filter its planner does not implement, such as a `$1` placeholder, aborts its task: RuntimeError).
    A long filter is shown by its start: the message stays one readable line."""
    shown = repr(where) if len(where) <= 200 else f"{where[:200]!r}... ({len(where)} characters)"
    reason = "Lance cannot run this filter" if isinstance(exc, RuntimeError) else lance_reason(exc)
    # Lance quotes the filter back as it is: its line breaks and control characters are shown escaped.
    return IndexerError(f"invalid --where {shown}: {one_line(reason)}"[:1000])


CREATE_RACE_CHECKS = 20  # looks for another writer's new manifest, 0.1 s apart, before calling a directory foreign
_OPENED: dict[str, tuple[tuple, Collection]] = {}  # Collection.open_for_reading's: identity -> (manifest stat, coll)


class Collection:
    """Open with `Collection.open(path_or_uri)`; ingest creates one with `Collection.create(path, spec)`.

    A collection is a local directory or a prefix on object storage (`s3://bucket/coll`): `location`
    reads and writes the files beside the Lance table wherever they live. `path` is what the user named
    (a Path for a local directory, the URI otherwise), for messages and reports.
    """

    def __init__(self, location: Location, manifest: Manifest):
        self.location = location
        self.path: Path | str = location.uri if location.remote else location.local_path
        self.manifest = manifest
        self._db = None
        self._table = None
        self._latest = None  # the Lance dataset at the newest version seen (snapshot() keeps it current)
        self._pinned = None  # (version, Lance dataset): what take_rows reads, opened once per version
        self._columns: tuple[int, list[str]] | None = None  # (version, result_columns())
        self._reading = threading.local()  # this thread's one_version() dataset, if any

    # ---- lifecycle ------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, storage_options: dict[str, str] | None = None) -> Collection:
        coll = cls.find(path, storage_options)
        if coll is not None:
            return coll
        loc = Location(path, storage_options)
        if loc.exists():
            raise IndexerError(f"{loc} is not an indexer collection (no {MANIFEST})")
        raise IndexerError(f"collection not found: {loc} (create it with `indexer ingest {loc} SOURCE`)")

    @classmethod
    def open_for_reading(cls, path: str | os.PathLike) -> Collection:
        """The collection at a local `path`, opened once per process and shared by the read paths (search),
        while its manifest is unchanged: opening costs about a millisecond, a query's budget. Reads stay
        current: `snapshot()` follows every commit. Remote collections are opened afresh."""
        if is_remote(path):
            return cls.open(path)
        where = os.path.abspath(path)  # string work only: pathlib and resolve() cost a query's tenth of a ms
        try:
            st = os.stat(os.path.join(where, MANIFEST))
        except OSError:
            return cls.open(path)  # says what is missing
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        hit = _OPENED.get(where)
        if hit is None or hit[0] != key:
            hit = _OPENED[where] = (key, cls.open(path))
        return hit[1]

    @classmethod
    def find(cls, path: str | os.PathLike, storage_options: dict[str, str] | None = None) -> Collection | None:
        """The collection at `path`, or None where there is none (one read of its manifest)."""
        loc = Location(path, storage_options)
        data = loc.read_bytes(MANIFEST)
        if data is None:
            return None
        try:
            return cls(loc, Manifest.from_json(data))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise IndexerError(f"{loc}/{MANIFEST} is damaged ({exc}); restore it or re-ingest") from exc

    @classmethod
    def create(cls, path: str | os.PathLike, spec: ModelSpec,
               storage_options: dict[str, str] | None = None) -> Collection:
        loc = Location(path, storage_options)
        if not loc.is_empty():
            raise IndexerError(f"{loc} exists and is not an empty directory or a collection")
        manifest = Manifest(model=spec)
        coll = cls(loc, manifest)
        coll.save_manifest()
        return coll

    @classmethod
    def find_or_create(cls, path: str | os.PathLike, spec: ModelSpec,
                       storage_options: dict[str, str] | None = None) -> tuple[Collection, bool]:
        """The collection at `path` and False, or a new one for vectors of `spec` and True. Two ingests
        started together both find nothing; the second to create sees the first's files, and its
        manifest lands within moments: that collection is returned (the caller checks that it fits)."""
        for _ in range(CREATE_RACE_CHECKS):
            found = cls.find(path, storage_options)
            if found is not None:
                return found, False
            if Location(path, storage_options).is_empty():
                return cls.create(path, spec, storage_options), True
            time.sleep(0.1)
        return cls.create(path, spec, storage_options), True  # says why the directory cannot be one

    @staticmethod
    def exists(path: str | os.PathLike, storage_options: dict[str, str] | None = None) -> bool:
        return Location(path, storage_options).exists(MANIFEST)

    @property
    def name(self) -> str:
        """The collection's folder name, for titles."""
        return self.location.name

    @property
    def spec(self) -> ModelSpec:
        return self.manifest.model

    def check_compatible(self, spec: ModelSpec) -> None:
        """Refuse vectors from another model: they would be silently wrong next to these."""
        mine, theirs = self.spec.identity(), spec.identity()
        if mine != theirs:
            diff = ", ".join(f"{k}: {mine[k]} here vs {theirs[k]}" for k in mine if mine[k] != theirs.get(k))
            raise IndexerError(f"{self.path} was built with {self.spec.describe()}; refusing "
                               f"{spec.describe()} ({diff}). Use a new collection for another model.")

    def save_manifest(self) -> None:
        self.location.write_bytes(MANIFEST, self.manifest.to_json())

    def touch(self, spec: ModelSpec | None = None) -> None:
        """Record an update (and the spec's current local path, which can move between machines)."""
        self.manifest.updated = now_iso()
        if spec is not None and spec.path != self.spec.path:
            self.manifest.model = replace(self.spec, path=spec.path)
        self.save_manifest()

    def empty(self) -> IndexerError:
        """The one answer every command gives about a collection without rows."""
        return IndexerError(f"{self.path} is empty: ingest something first")

    def reopen(self) -> None:
        """Forget the open table and datasets: the next read opens the latest version afresh."""
        self._table = self._latest = self._pinned = None

    def versions(self) -> list[dict[str, Any]]:
        """The Lance table's versions, newest first, each readable or not (store/versions.py)."""
        return list_versions(self.location)

    def restore(self, version: int) -> dict[str, Any]:
        """Make `version`'s rows the newest version, a new commit (`indexer restore COLL --version N`)."""
        moved = restore_version(self.location, version)
        self.reopen()
        new = self.version()
        log.info("restored version %d of %s as version %d", version, self.path, new)
        return {"restored": version, "version": new, "rows": self.count(), "moved": moved}

    def write_lock(self, purpose: str, wait: bool = True):
        """One writer at a time: a second one waits, or with `wait=False` is refused (see Location.lock)."""
        return self.location.lock(purpose, wait)

    # ---- the Lance table ------------------------------------------------------------------------------

    @property
    def db(self):
        if self._db is None:
            import lancedb

            self._db = lancedb.connect(self.location.lance_uri(), storage_options=self.location.storage_options or None)
        return self._db

    @property
    def table(self):
        """The LanceDB table, or None before the first commit."""
        if self._table is None:
            try:
                self._table = self.db.open_table(TABLE)
            except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
                if not is_lance_damage(exc):
                    return None  # no table yet
                raise damaged_table(self.location, exc, latest_manifest(self.location)) from exc
        return self._table

    def dataset(self):
        """The underlying Lance dataset (latest version), or None."""
        table = self.table
        if table is None:
            return None
        table.checkout_latest()
        return table.to_lance()

    @contextlib.contextmanager
    def one_version(self) -> Iterator[None]:
        """Reads in this block (this thread's) see one version, the latest when it began: a query's steps
        agree on what they read while writers commit, and the latest is looked up once, not per step."""
        if getattr(self._reading, "dataset", None) is not None:  # nested: the outer block's version
            yield
            return
        self._reading.dataset = self.snapshot()
        try:
            yield
        finally:
            self._reading.dataset = None

    def snapshot(self):
        """The Lance dataset at the latest version any process committed (None before the first commit),
        or inside one_version() the version it began with. Checking for a newer version reads one small
        hint file, where going through the LanceDB table costs a round trip through its event loop."""
        pinned = getattr(self._reading, "dataset", None)
        if pinned is not None:
            return pinned
        if self._latest is None:
            table = self.table
            if table is None:
                return None
            self._latest = table.to_lance()
        latest = self._latest.latest_version
        if latest != self._latest.version:
            self._latest = self._latest.checkout_version(latest)
        return self._latest

    def count(self) -> int:
        ds = self.snapshot()
        return 0 if ds is None else ds.count_rows()

    def version(self) -> int | None:
        ds = self.snapshot()
        return None if ds is None else ds.version

    def record_hashes(self) -> dict[str, str]:
        """id -> record_hash of every stored row: what incremental ingest compares against."""
        ds = self.dataset()
        out: dict[str, str] = {}
        if ds is None:
            return out
        for batch in ds.to_batches(columns=["id", "record_hash"], batch_size=65536):
            out.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
        return out

    def write(self, rows: list[dict[str, Any]], vectors: np.ndarray, upsert: bool) -> None:
        """Commit rows in one Lance version. `upsert` replaces rows whose id already exists."""
        if not rows:
            return
        data = rows_to_table(rows, vectors)
        table = self.table
        if table is None:
            self._table = self.db.create_table(TABLE, data=data)
            return
        data, new_fields = conform(data, table.schema)
        if new_fields:
            table.add_columns(new_fields)
        if upsert:
            table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        else:
            table.add(data)

    def delete(self, ids: Iterable[str]) -> int:
        """Delete the rows with these ids in one Lance commit; returns how many ids were given."""
        ids = list(ids)
        if ids and self.table is not None:
            self.table.delete(f"id IN ({', '.join(_sql_str(i) for i in ids)})")
        return len(ids)

    def compact(self) -> None:
        """Merge the small fragments many batch commits leave behind (old versions stay restorable)."""
        table = self.table
        if table is not None and len(table.to_lance().get_fragments()) > 16:
            table.compact_files()

    def scan(self, columns: list[str], where: str | None = None, batch_size: int = 16384,
             with_row_id: bool = False, version: int | None = None) -> Iterator[pa.RecordBatch]:
        """The rows matching `where` (the user's SQL), at `version` (default: the latest)."""
        ds = self.at_version(version)
        if ds is None:
            return
        check_where(where)
        try:
            scanner = ds.scanner(columns=columns, filter=where, batch_size=batch_size, with_row_id=with_row_id)
            yield from scanner.to_batches()
        except (ValueError, OSError, RuntimeError) as exc:  # lance reports SQL and column errors as ValueError
            if is_lance_damage(exc):
                raise damaged_table(self.location, exc, self.damaged_data_file(columns)) from exc
            if where is None:
                raise
            raise where_error(where, exc) from exc

    def keys(self) -> tuple[pa.Table, int | None]:
        """id, record_hash and row_id (the Lance row address) of every stored row, and the version read."""
        ds = self.dataset()
        if ds is None:
            return pa.table({"id": pa.array([], pa.string()), "record_hash": pa.array([], pa.string()),
                             "row_id": pa.array([], pa.uint64())}), None
        tbl = ds.to_table(columns=["id", "record_hash"], with_row_id=True)
        return tbl.rename_columns(["id", "record_hash", "row_id"]), ds.version

    def take_rows(self, row_ids: list[int] | np.ndarray, columns: list[str], version: int | None = None) -> pa.Table:
        """The rows at these Lance row addresses, in the order given, as they were at `version` (default:
        the latest): a direct read of those rows, where a filter on id would scan. Addresses belong to a
        version (compaction moves rows), so callers pass the version their addresses were read at."""
        ds = self.at_version(version)
        try:  # the dataset's own take: lancedb's take_row_ids goes through its event loop, twice the latency
            return ds._take_rows(pa.array(np.asarray(row_ids, dtype=np.uint64)), columns=columns)
        except (ValueError, OSError) as exc:
            if is_lance_damage(exc):
                raise damaged_table(self.location, exc, self.damaged_data_file(columns)) from exc
            raise

    def at_version(self, version: int | None):
        """The Lance dataset at `version` (None: the latest), opened once per version."""
        latest = self.snapshot()
        if latest is None or version is None or latest.version == version:
            return latest
        pinned = self._pinned  # read once: server threads may swap it for another version meanwhile
        if pinned is None or pinned[0] != version:
            pinned = self._pinned = (version, latest.checkout_version(version))
        return pinned[1]

    def matching_row_ids(self, where: str, version: int | None = None) -> np.ndarray:
        """The Lance row addresses of the rows matching `where` at `version`: a scan that reads only the
        filter's columns (ids would be read and compared too: 10x the time for a broad filter at 1M rows)."""
        batches = [b.column("_rowid").to_numpy() for b in
                   self.scan([], where, batch_size=65536, with_row_id=True, version=version)]
        return np.concatenate(batches) if batches else np.zeros(0, dtype=np.uint64)

    def damaged_data_file(self, columns: list[str]) -> str | None:
        """The data file a failed scan could not read (each fragment read on its own: the error path only)."""
        ds = self.dataset()
        for fragment in ds.get_fragments():
            try:
                fragment.to_table(columns=columns)
            except (ValueError, OSError):
                return f"lance/{TABLE}.lance/data/{fragment.data_files()[0].path}"
        return None

    def rows_by_row_id(self, row_ids: list[int], columns: list[str] | None = None,
                       version: int | None = None) -> dict[int, dict[str, Any]]:
        """Rows by their addresses at `version`: the one the addresses were read at (default: the latest)."""
        if not row_ids:
            return {}
        columns = columns or self.result_columns()
        tbl = self.take_rows(row_ids, [c for c in columns if c != "_rowid"], version)
        return dict(zip(map(int, row_ids), tbl.to_pylist()))

    def rows_by_id(self, ids: Iterable[str], columns: list[str] | None = None) -> dict[str, dict[str, Any]]:
        ids = list(ids)
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            where = f"id IN ({', '.join(_sql_str(i) for i in chunk)})"
            for batch in self.scan(columns or self.result_columns(), where):
                out.update((r["id"], r) for r in batch.to_pylist())
        return out

    def result_columns(self) -> list[str]:
        ds = self.snapshot()
        if ds is None:
            return []
        if self._columns is None or self._columns[0] != ds.version:  # reading the schema costs ~0.1 ms
            self._columns = (ds.version, [n for n in ds.schema.names if n not in HIDDEN_COLUMNS])
        return list(self._columns[1])

    def hit_columns(self, fields: Sequence[str] | str | None = None) -> list[str]:
        """The stored columns a search hit carries: `fields` (names, "a,b", or "all"), default DEFAULT_FIELDS;
        `id` always. An unknown name is an error that lists the known ones."""
        known = self.result_columns()
        if fields is None:
            return [c for c in known if c in DEFAULT_FIELDS]
        names = [n.strip() for n in fields.split(",")] if isinstance(fields, str) else list(fields)
        if names == ["all"]:
            return known
        unknown = [n for n in names if n not in known and n != "score"]
        if unknown:
            raise IndexerError(f"unknown field {', '.join(map(repr, unknown))}: {self.path} has "
                               f"{', '.join(known)} (or all)")
        return ["id", *[n for n in dict.fromkeys(names) if n not in ("id", "score")]]

    def index_info(self, name: str = "index.json") -> dict[str, Any] | None:
        """index/index.json (FAISS) or index/lance.json without the sweep; a FAISS index also says
        whether it reflects the current Lance version (Lance's own index always does)."""
        data = self.location.read_bytes(f"index/{name}")
        if data is None:
            return None
        meta = json.loads(data)
        meta = {k: v for k, v in meta.items() if k not in ("sweep", "files")}
        if meta.get("engine") == "faiss":
            meta["current"] = meta.get("lance_version") == self.version()
        return meta

    # ---- errors.jsonl -----------------------------------------------------------------------------------

    def log_skipped(self, items: list[SkippedInput]) -> None:
        if not items:
            return
        t = now_iso()
        self.location.append_lines(ERRORS, [json.dumps({"source": item.source, "id": item.id, "reason": item.reason,
                                                        "time": t}) for item in items])

    def errors(self) -> list[dict[str, Any]]:
        data = self.location.read_bytes(ERRORS)
        if not data:
            return []
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]

    # ---- summary ------------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        table = self.table
        return {
            "path": str(self.path),
            "rows": self.count(),
            "model": self.spec.to_dict(),
            "metric": self.manifest.metric,
            "dim": self.spec.dim,
            "lance_version": self.version(),
            "fields": [] if table is None else [n for n in table.schema.names if n not in HIDDEN_COLUMNS],
            "errors": len(self.errors()),
            "index": self.index_info(),
            "lance_index": self.index_info("lance.json"),
            "size_bytes": self.location.size(),
            "created": self.manifest.created,
            "updated": self.manifest.updated,
            "packages": self.manifest.packages,
            "chunking": self.manifest.chunking,
            "label_field": self.manifest.label_field,
            "drift": self.manifest.drift,
            "auto_precision": self.manifest.auto_precision,
        }
