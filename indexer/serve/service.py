"""What the HTTP service serves, without any HTTP: the collections opened once, their query models
loaded once, and a micro-batcher that folds concurrent queries into one `search_batch` call.

All model and index work runs on ONE compute thread: on a few cores, parallel forward passes only
fight over them, while one batched pass embeds 8 short texts in about the time of 2 single ones. That
thread's torch runs on few threads (`threads`): a parallel region waits for all of its threads, and on a
busy machine one of them is often descheduled; measured on 2 shared cores, one MiniLM query took 25 ms
on 1 thread and 130-580 ms (median) on 2.

The compute thread takes its next batch itself, the moment the last one ends: a batcher on the event
loop starts it only when the loop gets round to it, after answering the last batch's requests and
reading new ones (measured at 64 clients: 37 ms idle after each 145 ms batch of 32).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexerError
from ..models.device import resolve_runtime
from ..store import Collection
from ..store.location import is_remote
from ..tasks.search import MODES, Query, query_embedder, search_batch
from ..wording import one_line
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
    query_backend: str = "torch"  # how its text or image queries are embedded on a CPU (Service.warm_up picks)

    @property
    def modality(self) -> str:
        return self.coll.spec.modality

    def describe(self) -> dict[str, Any]:
        spec = self.coll.spec
        index = self.coll.index_info()
        return {"name": self.name, "rows": self.coll.count(),
                "model": spec.name, "modality": spec.modality, "dim": spec.dim,
                "queries": [k for k in ("text", "image") if spec.accepts(k)],
                "query_backend": self.query_backend if spec.modality in ("text", "image") else None,
                "fields": self.coll.result_columns(),
                "index": None if index is None else {"engine": index["engine"], "kind": index["kind"],
                                                     "recall_at_10": index.get("recall_at_10")}}


@dataclass
class _Job:
    """A query for the micro-batcher."""

    name: str
    params: SearchParams
    query: Query
    future: Future = field(default_factory=Future, repr=False)


@dataclass
class _Call:
    """Any other work for the compute thread (loading models, /embed)."""

    fn: Callable
    args: tuple
    future: Future = field(default_factory=Future, repr=False)


def _settle(future: Future, answer: Any) -> None:
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)


def _freeze_heap() -> None:
    """What is loaded by now (models, modules, indexes) lives as long as the server: kept out of the
    garbage collector's sight, a full collection stops walking it. Measured at 64 clients: a 560 ms
    pause, every request waiting, once in each 12 s run; gone."""
    gc.collect()
    gc.freeze()


def default_threads() -> int:
    """Half the cores, at most 4: room for the event loop and the clients, and short parallel regions."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def exported_threads() -> int:
    """All the cores, at most 4, for an exported query model: its runtime's idle threads sleep rather
    than spin, so a busy core costs it little. Measured (bench_serve, 2 cores shared with the clients):
    2 threads gave 1.3x the throughput of 1 at 8 and 64 clients, and no worse with a third process
    busy on one core."""
    return max(1, min(4, os.cpu_count() or 1))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Exported models size their thread pool from torch's thread count when they are loaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    that long for others to join, unless the last batch held only one query (a lone client).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, device: str = "auto", max_batch: int = 32,
                 batch_wait: float = 0.0, threads: int | None = None, query_backend: str = "auto"):
        if not paths:
            raise IndexerError("name at least one collection to serve")
        self.collections = {name: Served(name, Collection.open(p)) for name, p in collection_names(paths).items()}
        self.device = device
        self.query_backend = query_backend
        self.max_batch = max(1, max_batch)
        self.batch_wait = batch_wait
        self.threads = threads or default_threads()
        self.exported_threads = threads or exported_threads()
        self.batch_sizes = Histogram((1, 2, 4, 8, 16, 32, 64, 128))
        self._inbox: queue.SimpleQueue[_Job | _Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._compute_loop, name="indexer-compute", daemon=True)
        self._thread.start()
        self._warm = False

    # ---- lifecycle ------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Load every query model and index now, so the first request does not pay for it (and a model
        that cannot load is a one-line error before the server starts, not a failed startup)."""
        if not self._warm:
            self._submit(_Call(self._warm_up, ())).result()

    async def start(self) -> None:
        if not self._warm:
            await self.compute(self._warm_up)

    async def stop(self) -> None:
        self.close()

    def close(self) -> None:
        """End the compute thread once its current work is done."""
        self._inbox.put(None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _warm_up(self) -> None:
        from PIL import Image

        for s in self.collections.values():
            if s.coll.count() == 0:
                continue
            if s.modality in ("text", "image"):
                s.query_backend = self._pick_query_backend(s)
                sample = "warm up" if s.modality == "text" else Image.new("RGB", (64, 64), "gray")
                query_embedder(s.coll, self.device, s.query_backend).embed([sample])
            search_batch(s.coll, [Query(vector=np.ones(s.coll.spec.dim, np.float32))], k=1, device=self.device)
            log.info("serving %s: %d rows, %s%s", s.name, s.coll.count(), s.coll.spec.describe(),
                     "" if s.query_backend == "torch" else f"; queries embedded by its {s.query_backend} fp32 export")
        self._warm = True
        _freeze_heap()

    def _pick_query_backend(self, s: Served) -> str:
        """`auto`: ONNX Runtime's fp32 export of the model where it can stand in for torch (a torch fp32
        collection, queries on a CPU) and gives torch's vectors: 1.3x faster for a batch of 32 short texts,
        2.5x for one (MiniLM on one thread); else torch. A named backend that cannot is an error."""
        if self.query_backend != "auto":
            with _torch_threads(self.exported_threads):
                query_embedder(s.coll, self.device, self.query_backend)
            return self.query_backend
        spec = s.coll.spec
        if spec.backend != "torch" or spec.precision == "int8" or spec.joint or resolve_runtime(self.device).is_cuda:
            return "torch"
        try:
            with _torch_threads(self.exported_threads):
                query_embedder(s.coll, self.device, "onnx")
        except Exception as exc:  # noqa: BLE001 - any failure to export only means torch, as before
            log.info("queries of %s are embedded by torch (its ONNX export: %s)", s.name, one_line(str(exc))[:300])
            return "torch"
        return "onnx"

    async def compute(self, fn, *args):
        """Run fn on the compute thread."""
        return await asyncio.wrap_future(self._submit(_Call(fn, args)))

    def _submit(self, item: _Job | _Call) -> Future:
        if not self.alive:  # closed, or its loop died (logged): never leave a request waiting forever
            raise RuntimeError("the compute thread has stopped")
        self._inbox.put(item)
        return item.future

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
        return await asyncio.wrap_future(self._submit(_Job(served.name, params, query)))

    # ---- the compute thread ---------------------------------------------------------------------------------

    def _compute_loop(self) -> None:
        import faiss
        import torch

        torch.set_num_threads(self.threads)
        faiss.omp_set_num_threads(self.threads)
        last_batch = 0
        try:
            while (first := self._inbox.get()) is not None:
                if isinstance(first, _Call):
                    self._run_call(first)
                    continue
                if self.batch_wait and self.max_batch > 1 and last_batch > 1:  # a lone client waits for no one
                    time.sleep(self.batch_wait)
                jobs, calls, closing = [first], [], False
                while len(jobs) < self.max_batch and not closing:
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    closing = item is None
                    if isinstance(item, _Call):
                        calls.append(item)
                    elif item is not None:
                        jobs.append(item)
                self._run_batch([j for j in jobs if j.future.set_running_or_notify_cancel()])  # not clients gone
                last_batch = len(jobs)
                for call in calls:
                    self._run_call(call)
                if closing:
                    return
        except BaseException:
            log.critical("the compute thread stopped: searches will not be answered", exc_info=True)
            raise

    @staticmethod
    def _run_call(call: _Call) -> None:
        if call.future.set_running_or_notify_cancel():
            try:
                call.future.set_result(call.fn(*call.args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                call.future.set_exception(as_failure(exc))

    def _run_batch(self, jobs: list[_Job]) -> None:
        groups: dict[tuple[str, SearchParams], list[_Job]] = defaultdict(list)
        for job in jobs:
            groups[job.name, job.params].append(job)
        for (name, params), group in groups.items():
            self.batch_sizes.observe(len(group))
            try:
                answers = self._answer(name, params, [j.query for j in group])
            except BaseException as exc:  # noqa: BLE001 - a bug: fail these requests, keep serving others
                log.error("search batch failed", exc_info=exc)
                answers = [as_failure(exc)] * len(group)
            for job, answer in zip(group, answers):
                _settle(job.future, answer)

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
                            fields=params.fields, query_backend=served.query_backend)

    # ---- embeddings -----------------------------------------------------------------------------------------

    async def embed(self, name: str | None, items: list[Any]) -> tuple[Served, np.ndarray]:
        served = self.collection(name)
        if served.modality not in ("text", "image"):
            raise ServeError(f"collection {served.name!r} was ingested with --model none: it has no model to embed with")
        return served, await self.compute(self._embed, served, items)

    def _embed(self, served: Served, items: list[Any]) -> np.ndarray:
        return query_embedder(served.coll, self.device, served.query_backend).embed(items)

    async def count_tokens(self, served: Served, texts: list[str]) -> int:
        """Tokens the model saw (after truncation to its limit), for the OpenAI `usage` field."""
        def count() -> int:
            embedder = query_embedder(served.coll, self.device, served.query_backend)
            enc = embedder.tokenizer(texts, truncation=True, max_length=embedder.spec.max_length)
            return sum(len(ids) for ids in enc["input_ids"])
        return await self.compute(count)
