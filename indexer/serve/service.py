"""What the HTTP service serves, without any HTTP: the collections opened once, their query models
loaded once, and a micro-batcher that folds concurrent queries into one `search_batch` call.

All model and index work runs on ONE compute thread: on a few cores, parallel forward passes only
fight over them, while one batched pass embeds 8 short texts in about the time of 2 single ones. That
thread's torch runs on few threads (`threads`): a parallel region waits for all of its threads, and on a
busy machine one of them is often descheduled; measured on 2 shared cores, one MiniLM query took 25 ms
on 1 thread and 130-580 ms (median) on 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexerError
from ..store import Collection
from ..store.location import is_remote
from ..tasks.search import MODES, Query, query_embedder, search_batch
from .metrics import Histogram

log = logging.getLogger(__name__)

MAX_K = 1000


class ServeError(IndexerError):
    """A user error with the HTTP status that says what kind it is (and the `code` OpenAI's error
    shape gives it on the /v1 routes, if any)."""

    status = 400
    code: str | None = None


class NotFound(ServeError):
    status = 404


class UnknownModel(NotFound):
    code = "model_not_found"


class TooLarge(ServeError):
    status = 413


class UnsupportedMedia(ServeError):
    status = 415


@dataclass(frozen=True)
class SearchParams:
    """Everything but the query itself: queries with equal params can share one search_batch call."""

    k: int = 10
    where: str | None = None
    engine: str = "auto"
    mode: str = "vector"
    group_by_doc: bool = False
    fields: tuple[str, ...] | None = None


@dataclass
class Served:
    name: str
    coll: Collection

    @property
    def modality(self) -> str:
        return self.coll.spec.modality

    def describe(self) -> dict[str, Any]:
        spec = self.coll.spec
        index = self.coll.index_info()
        return {"name": self.name, "rows": self.coll.count(),
                "model": spec.name, "modality": spec.modality, "dim": spec.dim,
                "queries": [k for k in ("text", "image") if spec.accepts(k)],
                "fields": self.coll.result_columns(),
                "index": None if index is None else {"engine": index["engine"], "kind": index["kind"],
                                                     "recall_at_10": index.get("recall_at_10")}}


@dataclass
class _Job:
    name: str
    params: SearchParams
    query: Query
    future: asyncio.Future = field(repr=False)


def _batcher_ended(task: asyncio.Task) -> None:
    """Every /search waits on the batcher: if it ever stops other than at shutdown, say so loudly."""
    if not task.cancelled():
        log.critical("the search batcher stopped: searches will not be answered", exc_info=task.exception())


def default_threads() -> int:
    """Half the cores, at most 4: room for the event loop and the clients, and short parallel regions."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def collection_names(paths: Sequence[str | os.PathLike]) -> dict[str, Path | str]:
    """name -> path or object-store URI; a collection is named after its directory (or last URI part),
    without a trailing `.idx`."""
    out: dict[str, Path | str] = {}
    for given in paths:
        p = str(given).rstrip("/") if is_remote(str(given)) else Path(given)
        name = (p.rsplit("/", 1)[-1] if isinstance(p, str) else p.resolve().name).removesuffix(".idx")
        if name in out:
            raise IndexerError(f"two collections are both named {name!r} ({out[name]} and {p}): "
                               "rename one directory")
        out[name] = p
    return out


def as_failure(exc: BaseException) -> Exception:
    """What a request that failed with `exc` gets. A Rust panic in Lance or another native library reaches
    Python as pyo3's PanicException, a BaseException: raised on, it would end the search loop and leave
    every later request waiting. Only the process's own signals (Ctrl-C, exit, cancellation) go on up."""
    if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit | asyncio.CancelledError):
        raise exc
    return exc if isinstance(exc, Exception) else RuntimeError(f"internal error ({type(exc).__name__}: {exc})")


class Service:
    """Opened collections plus the compute thread and its micro-batcher.

    `max_batch=1` turns batching off (one search_batch call per query). Batching is adaptive: a query
    arriving while the compute thread is idle runs at once; queries arriving while it is busy queue
    up and run together next. `batch_wait` (seconds) additionally holds the first query of a batch
    that long for others to join.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, device: str = "auto", max_batch: int = 32,
                 batch_wait: float = 0.0, threads: int | None = None):
        if not paths:
            raise IndexerError("name at least one collection to serve")
        self.collections = {name: Served(name, Collection.open(p)) for name, p in collection_names(paths).items()}
        self.device = device
        self.max_batch = max(1, max_batch)
        self.batch_wait = batch_wait
        self.threads = threads or default_threads()
        self.batch_sizes = Histogram((1, 2, 4, 8, 16, 32, 64, 128))
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="indexer-compute", initializer=self._init_thread)
        self._queue: asyncio.Queue[_Job] | None = None
        self._batcher: asyncio.Task | None = None
        self._warm = False

    # ---- lifecycle ------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Load every query model and index now, so the first request does not pay for it (and a model
        that cannot load is a one-line error before the server starts, not a failed startup)."""
        if not self._warm:
            self._executor.submit(self._warm_up).result()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._batcher = asyncio.create_task(self._run_batches())
        self._batcher.add_done_callback(_batcher_ended)
        if not self._warm:
            await self.compute(self._warm_up)

    async def stop(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _init_thread(self) -> None:
        import faiss
        import torch

        torch.set_num_threads(self.threads)
        faiss.omp_set_num_threads(self.threads)

    def _warm_up(self) -> None:
        from PIL import Image

        for s in self.collections.values():
            if s.coll.count() == 0:
                continue
            if s.modality in ("text", "image"):
                sample = "warm up" if s.modality == "text" else Image.new("RGB", (64, 64), "gray")
                query_embedder(s.coll, self.device).embed([sample])
            search_batch(s.coll, [Query(vector=np.ones(s.coll.spec.dim, np.float32))], k=1, device=self.device)
            log.info("serving %s: %d rows, %s", s.name, s.coll.count(), s.coll.spec.describe())
        self._warm = True

    async def compute(self, fn, *args):
        """Run fn on the compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- lookups ----------------------------------------------------------------------------------------

    def collection(self, name: str | None) -> Served:
        if name is None:
            if len(self.collections) == 1:
                return next(iter(self.collections.values()))
            raise ServeError(f"several collections are served: name one of {', '.join(self.collections)}")
        if name not in self.collections:
            raise NotFound(f"unknown collection {name!r}: served are {', '.join(self.collections)}")
        return self.collections[name]

    def row(self, served: Served, item_id: str, columns: list[str] | None = None) -> dict[str, Any]:
        rows = served.coll.rows_by_id([item_id], columns=columns)
        if item_id not in rows:
            raise NotFound(f"no item with id {item_id!r} in collection {served.name!r}")
        return rows[item_id]

    # ---- search -------------------------------------------------------------------------------------------

    def check(self, served: Served, query: Query, params: SearchParams) -> None:
        """Refuse what would fail inside a batch, with the reason, before it joins one."""
        kind = query.kind()
        if kind == "text" and not query.text.strip():
            raise ServeError("empty query: type some text")
        if kind in ("text", "image") and not served.coll.spec.accepts(kind):
            fits = {"text": "a text query, ", "image": "an image upload, "}.get(served.modality, "")
            raise ServeError(f"collection {served.name!r} holds {served.modality} embeddings "
                             f"({served.coll.spec.name}): search it with {fits}an id or a vector")
        if kind == "vector" and len(query.vector) != served.coll.spec.dim:
            raise ServeError(f"vector has {len(query.vector)} dimensions; collection {served.name!r} "
                             f"has {served.coll.spec.dim}")
        if not 1 <= params.k <= MAX_K:
            raise ServeError(f"k must be between 1 and {MAX_K}")
        if params.mode not in MODES:
            raise ServeError(f"mode {params.mode!r}: choose one of {', '.join(MODES)}")
        if params.mode != "vector" and kind != "text":
            raise ServeError(f"mode {params.mode!r} needs a text query: search by {kind} with mode 'vector'")

    async def search(self, name: str | None, query: Query, params: SearchParams) -> list[dict[str, Any]]:
        served = self.collection(name)
        self.check(served, query, params)
        if query.id is not None:  # a clean 404 now, rather than failing the batch it would join
            await asyncio.to_thread(self.row, served, query.id, ["id"])
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(served.name, params, query, future))
        return await future

    async def _run_batches(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            if self.batch_wait and self.max_batch > 1:
                await asyncio.sleep(self.batch_wait)
            while len(jobs) < self.max_batch and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            groups: dict[tuple[str, SearchParams], list[_Job]] = defaultdict(list)
            for job in jobs:
                groups[job.name, job.params].append(job)
            for (name, params), group in groups.items():
                self.batch_sizes.observe(len(group))
                try:
                    answers = await self.compute(self._answer, name, params, [j.query for j in group])
                except BaseException as exc:  # noqa: BLE001 - a bug: fail these requests, keep serving others
                    log.error("search batch failed", exc_info=exc)
                    answers = [as_failure(exc)] * len(group)
                for job, answer in zip(group, answers):
                    if job.future.done():  # the client went away
                        continue
                    if isinstance(answer, BaseException):
                        job.future.set_exception(answer)
                    else:
                        job.future.set_result(answer)

    def _answer(self, name: str, params: SearchParams, queries: list[Query]) -> list:
        """Results (or the exception) per query. One bad query must not fail the others in its batch:
        when the batch fails, each query runs alone to find whose error it was."""
        try:
            return self._search(name, params, queries)
        except BaseException as exc:  # noqa: BLE001 - handed to the request that caused it
            if len(queries) == 1:
                return [as_failure(exc)]
        out = []
        for q in queries:
            try:
                out.append(self._search(name, params, [q])[0])
            except BaseException as exc:  # noqa: BLE001
                out.append(as_failure(exc))
        return out

    def _search(self, name: str, params: SearchParams, queries: list[Query]) -> list[list[dict[str, Any]]]:
        served = self.collections[name]
        return search_batch(served.coll, queries, k=params.k, where=params.where, engine=params.engine,
                            device=self.device, mode=params.mode, group_by_doc=params.group_by_doc,
                            fields=params.fields)

    # ---- embeddings -----------------------------------------------------------------------------------------

    async def embed(self, name: str | None, items: list[Any]) -> tuple[Served, np.ndarray]:
        served = self.collection(name)
        if served.modality not in ("text", "image"):
            raise ServeError(f"collection {served.name!r} was ingested with --model none: it has no model to embed with")
        return served, await self.compute(self._embed, served, items)

    def _embed(self, served: Served, items: list[Any]) -> np.ndarray:
        return query_embedder(served.coll, self.device).embed(items)

    async def count_tokens(self, served: Served, texts: list[str]) -> int:
        """Tokens the model saw (after truncation to its limit), for the OpenAI `usage` field."""
        def count() -> int:
            embedder = query_embedder(served.coll, self.device)
            enc = embedder.tokenizer(texts, truncation=True, max_length=embedder.spec.max_length)
            return sum(len(ids) for ids in enc["input_ids"])
        return await self.compute(count)
