"""Hit fields kept in memory for a process that searches an index again and again (a server, a notebook).

A hit's fields read from Lance by address cost about a millisecond at 1M rows, most of a query's budget;
read from memory, tens of microseconds. After an index has answered WARM_QUERIES searches with one set of
columns, those columns of every row (at the Lance version the index reflects) are read once, in a
background thread, if they fit in RESIDENT_BYTES; searches read by address until they are ready, and
always for columns too large to keep (long texts). A one-off search never starts the read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ..store import Collection
from .addresses import AddressMap

log = logging.getLogger(__name__)

RESIDENT_BYTES = 256 << 20  # per index, for all its resident column sets
WARM_QUERIES = 8


class ResidentFields:
    """Column sets of one index's rows at one Lance version, each a table in index-position order."""

    def __init__(self, version: int | None, row_ids: np.ndarray, live: np.ndarray):
        self.version, self.row_ids, self.live = version, row_ids, live
        self.tables: dict[tuple[str, ...], pa.Table] = {}
        self.too_large: set[tuple[str, ...]] = set()
        self.uses: dict[tuple[str, ...], int] = {}
        self.loading: dict[tuple[str, ...], threading.Thread] = {}
        self.lock = threading.Lock()

    def take(self, coll: Collection, positions: np.ndarray, columns: list[str]) -> pa.Table | None:
        """The rows at these index positions, or None when `columns` are not (yet) in memory."""
        key = tuple(columns)
        table = self.tables.get(key)
        if table is not None:
            return table.take(pa.array(positions, pa.int64()))
        with self.lock:
            self.uses[key] = self.uses.get(key, 0) + 1
            if self.uses[key] >= WARM_QUERIES and key not in self.loading and key not in self.too_large:
                self.loading[key] = threading.Thread(target=self._load, args=(coll, key), daemon=True,
                                                     name="indexer-resident-fields")
                self.loading[key].start()
        return None

    def wait(self) -> None:
        """Until every read started has finished (tests, benchmarks)."""
        for thread in list(self.loading.values()):
            thread.join()

    def _load(self, coll: Collection, key: tuple[str, ...]) -> None:
        try:
            table = _read_within(coll, list(key), self.version, self._budget_left)
        except Exception as exc:  # noqa: BLE001 - a failed read only means reading by address, as before
            log.warning("keeping hit fields in memory failed (%s); reading them by address", exc)
            table = None
        if table is None:
            self.too_large.add(key)
            return
        # In index-position order: a hit's fields are then one take by position.
        where = AddressMap(table.column("_rowid").to_numpy()).positions(self.row_ids)
        table = table.drop_columns(["_rowid"])
        if not (where[self.live] >= 0).all():  # the index does not reflect this version: never serve from it
            log.warning("the index's row addresses do not match version %s; reading hit fields by address",
                        self.version)
            self.too_large.add(key)
            return
        self.tables[key] = table.take(pa.array(np.maximum(where, 0), pa.int64())).combine_chunks()
        log.info("hit fields %s kept in memory (%.1f MB)", ", ".join(key), self.tables[key].nbytes / 2**20)

    def _budget_left(self) -> int:
        return RESIDENT_BYTES - sum(t.nbytes for t in self.tables.values())


def _read_within(coll: Collection, columns: list[str], version: int | None,
                 budget: Callable[[], int]) -> pa.Table | None:
    """`columns` and row addresses of every row at `version`, or None once they pass the budget."""
    batches, size = [], 0
    for batch in coll.scan(columns, batch_size=65536, with_row_id=True, version=version):
        size += batch.nbytes
        if size > budget():
            return None
        batches.append(batch)
    return pa.Table.from_batches(batches) if batches else None
