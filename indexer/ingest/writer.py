"""Commits embedded rows in a background thread so storage I/O hides behind model compute."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np

from ..store import Collection
from ..timing import Stages


class BatchWriter:
    """Buffer rows and commit them to the collection every `commit_rows` rows or `commit_seconds`.

    Each commit is one Lance version: a killed run loses at most the uncommitted buffer, which the
    next run embeds again (it compares record hashes, so nothing is duplicated).
    """

    def __init__(self, collection: Collection, commit_rows: int = 512, commit_seconds: float = 20.0,
                 stages: Stages | None = None):
        self.collection = collection
        self.stages = stages or Stages()
        self.commit_rows = commit_rows
        self.commit_seconds = commit_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="indexer-writer", daemon=True)
        self._thread.start()

    def put(self, rows: list[dict[str, Any]], vectors: np.ndarray, upsert: bool) -> None:
        self._raise_if_failed()
        self._queue.put((rows, vectors, upsert))

    def close(self) -> None:
        """Commit what is buffered and wait for the thread."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        buffers: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
        last = time.monotonic()
        item: Any = ...
        try:
            while True:
                try:
                    item = self._queue.get(timeout=1.0)
                except queue.Empty:
                    item = ...
                if item is not None and item is not ...:
                    rows, vectors, upsert = item
                    buffers[upsert][0].extend(rows)
                    buffers[upsert][1].append(vectors)
                pending = sum(len(b[0]) for b in buffers.values())
                due = time.monotonic() - last > self.commit_seconds
                if item is None or pending >= self.commit_rows or (pending and due):
                    for upsert, (rows, vecs) in buffers.items():
                        if rows:
                            with self.stages.time("write", len(rows)):
                                self.collection.write(rows, np.concatenate(vecs), upsert=upsert)
                            rows.clear()
                            vecs.clear()
                    last = time.monotonic()
                if item is None:
                    return
        except BaseException as exc:  # surfaced to the caller on its next put/close
            self._error = exc
            # Keep draining so the producer never blocks on a full queue, up to close()'s sentinel (unless
            # the failed commit was the final one: then the sentinel is taken and close() is already waiting).
            while item is not None:
                item = self._queue.get()
