"""The Ray engine: the local engine's ingest, run by Ray Data on a cluster.

    driver   lists the sources' units (a folder's files in groups, each table file)   sources.split_sources
    read     tasks: each unit's records, hashed                                        sources.iter_unit, prepare
    claims   one actor, in input order: documents split into passages (chunked          chunking.Passages
             collections), new / changed / unchanged / duplicate id                     engine.Claims
    decode   tasks (images): decode + the model's preprocessing; plain JPEGs are left    loader.decode
             to GPU actors, which decode them with nvjpeg (loader.decode_on_device)
    embed    actors: `factory(spec, runtime)` once each, one GPU each where there are GPUs
    write    tasks: Lance fragments written by the worker; only their metadata goes back
    driver   commits groups of fragments, one atomic Lance commit each; a changed item's old row is
             deleted in the same commit as its new row, so a killed run loses or duplicates nothing

Every stage runs the local engine's code on one piece at a time, so ids, hashes, vectors and error
lines are the local engine's. The driver never holds vectors (except a batch that brings a field the
table lacks: that one is written here, after adding the column, so no field is dropped).

Where the time went: each row carries the seconds the read, preprocess and embed stages spent on it
(a batch's time shared among its rows) in columns of its own; the write task sums them with its own
seconds, and the driver adds them, and its commits, into the run's stages. The stages run on several
workers at once, so their seconds add up across workers (they may sum to more than the run's wall time).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cluster import connect, quiet_ray
from ..errors import IndexerError
from ..models import resolve_runtime
from ..sources import SkippedInput, iter_records, iter_unit, split_sources
from ..spec import ModelSpec
from ..store.arrow import conform, rows_to_table
from ..store.collection import TABLE, _sql_str
from ..timing import Stages
from .chunking import Passages
from .engine import Claims, Plan, Run, stored_row
from .loader import Prepared, Unchanged, decode, decode_on_device, decodes_on_device, prepare

log = logging.getLogger(__name__)

BLOB = "item"  # every stage passes pickled items in this one binary column
READ_BLOCK = 256  # items per block a read task yields
SCHEMA_PEEK = 512  # records read on the driver to fix the new table's schema
BLOCK_BYTES = 128 * 1024  # a few hundred texts, one image


TIMED = ("read", "preprocess", "embed")  # stages whose per-row seconds travel in columns "<stage>_s"


def _dumps(objs: list, seconds: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A batch of pickled `objs` with the seconds each one has taken so far per stage (zeros if not given)."""
    out = {BLOB: np.array([pickle.dumps(o, protocol=5) for o in objs], dtype=object)}
    for stage in TIMED:
        given = (seconds or {}).get(stage)
        out[f"{stage}_s"] = np.zeros(len(objs)) if given is None else np.asarray(given, dtype=np.float64)
    return out


def _seconds(batch: dict[str, np.ndarray], **spent: float) -> dict[str, np.ndarray]:
    """The batch's per-row seconds, plus `spent` seconds of a stage shared equally among its rows."""
    n = max(len(batch[BLOB]), 1)
    return {stage: np.asarray(batch[f"{stage}_s"], dtype=np.float64) + spent.get(stage, 0.0) / n
            for stage in TIMED}


def _loads(batch: dict[str, np.ndarray]) -> list:
    return [pickle.loads(b) for b in batch[BLOB]]


# ---- stages: run on the cluster's workers -----------------------------------------------------------

def _read(batch: dict[str, np.ndarray], opts):
    """One unit -> its records, hashed, with their place in the input order (unit, n)."""
    for index, unit in zip(batch["order"], _loads(batch)):
        items, seconds, n = [], [], -1
        start = time.perf_counter()
        try:
            for n, record in enumerate(iter_unit(unit, opts)):
                items.append(((int(index), n), prepare(record, {})))
                now = time.perf_counter()
                seconds.append(now - start)  # parsing the record and reading + hashing its payload
                start = now
                if len(items) >= READ_BLOCK:
                    yield _dumps(items, {"read": seconds})
                    items, seconds = [], []
        except Exception as exc:  # noqa: BLE001 - a source that breaks part-way is an error line, not a failed job
            items.append(((int(index), n + 1), SkippedInput(unit.path, f"cannot read: {exc}")))
            seconds.append(time.perf_counter() - start)
        if items:
            yield _dumps(items, {"read": seconds})


class _Claims:
    """The one stateful stage: the incremental rules need every item once, in input order."""

    def __init__(self, known: list, dim: int, passages: list | None = None):
        import ray

        self.known = ray.get(known[0])
        self.claims = Claims(self.known, dim)
        # Chunked collections: documents become passages here, in input order, exactly as the local
        # engine's Passages does (first occurrence of a document id, the stored passages it leaves behind).
        self.passages = ray.get(passages[0]) if passages else None
        self.last: tuple[int, int] | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        seconds: dict[str, list[float]] = {stage: [] for stage in TIMED}
        carried = _seconds(batch)
        for row, (order, item) in enumerate(_loads(batch)):
            if self.last is not None and order <= self.last:
                raise RuntimeError(f"items reached the claims stage out of order ({order} after {self.last})")
            self.last = order
            start = time.perf_counter()
            parts = self._expand(item)  # chunking tokenises: preprocess time, as in the local engine
            split = time.perf_counter() - start
            for n, part in enumerate(parts):
                part = self.claims.classify(part)
                out.append((part, isinstance(part, Prepared) and part.record.id in self.known))
                # the record's own seconds go with its first part; the split is shared by all of them
                for stage in TIMED:
                    seconds[stage].append(carried[stage][row] if n == 0 else 0.0)
                seconds["preprocess"][-1] += split / len(parts)
        if self.passages is not None and self.passages.orphans:
            out.append((Orphans(frozenset(self.passages.orphans)), False))  # the driver deletes them at the end
            self.passages.orphans = set()
            for stage in TIMED:
                seconds[stage].append(0.0)
        return _dumps(out, seconds)

    def _expand(self, item):
        if self.passages is None:
            return [item]
        parts = self.passages.expand(item.record if isinstance(item, Prepared) else item)
        if isinstance(item, Prepared) and parts == [item.record]:
            return [item]  # stored whole: already hashed by the read task
        return [prepare(part, {}) for part in parts]


@dataclass(frozen=True)
class Orphans:
    """Stored passages a new version of their document no longer has (passed along to the driver)."""

    ids: frozenset


def _decode(batch: dict[str, np.ndarray], transform, min_size: int | None, defer_jpegs: bool) -> dict[str, np.ndarray]:
    start = time.perf_counter()
    out = [(decode(item, transform, min_size, defer_jpegs), update) for item, update in _loads(batch)]
    return _dumps(out, _seconds(batch, preprocess=time.perf_counter() - start))


class _Embed:
    """Builds the embedder once, on its own device, with the factory the local engine uses."""

    def __init__(self, factory, spec: ModelSpec, device: str, precision: str, batch_size: int | None):
        self.embedder = factory(spec, resolve_runtime(device, precision))
        self.batch_size = batch_size or self.embedder.batch_size()  # none given: as the local engine sizes it
        self.transform = self.embedder.preprocess_fn()  # for JPEGs the decode tasks left to this actor
        self.min_size = self.embedder.spec.preprocessing.get("resize")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entries = _loads(batch)
        items = [item for item, _ in entries]
        truncated = getattr(self.embedder, "truncated", 0)
        stages = Stages()  # tokenising or decoding deferred JPEGs (preprocess) and the model (embed)
        vectors = iter(self._embed(items, stages))  # a JPEG no decoder reads becomes a SkippedInput in `items`
        out = [(item, update, next(vectors) if isinstance(item, Prepared) else None)
               for item, (_, update) in zip(items, entries)]
        counts = np.zeros(len(out), dtype=np.int64)
        if len(out):
            counts[0] = getattr(self.embedder, "truncated", 0) - truncated
        seconds = _seconds(batch, preprocess=stages.seconds["preprocess"], embed=stages.seconds["embed"])
        return {**_dumps(out, seconds), "truncated": counts}

    def _embed(self, items: list, stages: Stages) -> np.ndarray:
        prepared = [item for item in items if isinstance(item, Prepared)]
        if not any(p.tensor is not None or p.jpeg is not None for p in prepared):  # texts, or vectors given
            payloads = [p.record.vector if p.record.vector is not None else p.record.text for p in prepared]
            return self.embedder.embed(payloads, self.batch_size, stages)
        decoded = [p for p in prepared if p.jpeg is None]
        batch = {"items": items, "pixels": torch.stack([p.tensor for p in decoded]) if decoded else None}
        for p in decoded:
            p.tensor = None  # the writer needs the row, not the pixels
        with stages.time("preprocess"):  # the deferred JPEGs, on this actor's device
            decode_on_device(batch, self.transform, self.min_size, self.embedder.runtime.device)
        pixels = batch["pixels"]
        if pixels is None:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return np.concatenate([self.embedder.embed_batch(pixels[i : i + self.batch_size], stages)
                               for i in range(0, len(pixels), self.batch_size)])


@dataclass
class Written:
    """What a write task sends the driver: fragment metadata and counts, never vectors (but see `rows`)."""

    fragments: list = field(default_factory=list)
    added: int = 0
    updates: list[str] = field(default_factory=list)  # ids whose old rows the commit deletes
    unchanged: int = 0
    errors: list[SkippedInput] = field(default_factory=list)
    orphans: set[str] = field(default_factory=set)  # stored passages to delete once the run is done
    truncated: int = 0
    rows: tuple[list[dict], np.ndarray, list[bool]] | None = None  # a batch the table's schema cannot take yet
    stages: Stages = field(default_factory=Stages)  # every stage's seconds and items for these rows


def _write(batch: dict[str, np.ndarray], uri: str, storage_options: dict | None) -> dict[str, np.ndarray]:
    import lance

    start = time.perf_counter()
    out = Written(truncated=int(np.sum(batch["truncated"])))
    entries = _loads(batch)
    n_items = sum(not isinstance(item, Orphans) for item, _, _ in entries)
    n_prepared = sum(isinstance(item, Prepared) for item, _, _ in entries)
    for stage, items in zip(TIMED, (n_items, n_prepared, n_prepared)):
        out.stages.add(stage, float(np.sum(batch[f"{stage}_s"])), items)
    prepared, vectors, updates = [], [], []
    for item, update, vector in entries:
        if isinstance(item, SkippedInput):
            out.errors.append(item)
        elif isinstance(item, Unchanged):
            out.unchanged += 1
        elif isinstance(item, Orphans):
            out.orphans |= item.ids
        else:
            prepared.append(item)
            vectors.append(vector)
            updates.append(update)
    if prepared:
        rows = [stored_row(p) for p in prepared]
        table = rows_to_table(rows, np.stack(vectors))
        schema = lance.dataset(uri, storage_options=storage_options).schema
        data, new_fields = conform(table, schema)
        if new_fields:
            out.rows = (rows, np.stack(vectors), updates)
        else:
            out.fragments = lance.fragment.write_fragments(data, uri, schema=schema, storage_options=storage_options)
            out.updates = [r["id"] for r, u in zip(rows, updates) if u]
            out.added = len(rows) - len(out.updates)
    out.stages.add("write", time.perf_counter() - start, 0 if out.rows else len(prepared))  # else the driver writes
    return {"result": np.array([pickle.dumps(out, protocol=5)], dtype=object)}


# ---- the driver -------------------------------------------------------------------------------------

@dataclass
class RayEngine:
    address: str | None = None  # "auto", "HOST:PORT", "ray://HOST:PORT"; None: a local cluster
    workers: int | None = None  # embedding actors; default: one per GPU, else one per `cpus_per_worker` CPUs
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs
    cpus_per_worker: float | None = None  # default: 1

    def run(self, plan: Plan, run: Run) -> None:
        ray = connect(self.address)
        units, unreadable = split_sources(plan.sources, plan.opts)
        for item in unreadable:
            run.skip(item)
        uri = _ensure_table(plan)
        if uri is None:  # nothing readable at all: every input is an error line
            for item in iter_records(plan.sources, plan.opts):
                run.accept(prepare(item, {}))
            return
        committer = _Committer(plan, run, uri)
        try:
            with quiet_ray():
                for row in self._pipeline(ray, plan, run, units, uri).iter_rows():
                    committer.add(pickle.loads(row["result"]))
        except ray.exceptions.RayError as exc:
            raise IndexerError(f"--engine ray: the pipeline failed: {_root_cause(exc)}") from exc
        finally:
            committer.commit()  # what was written is kept, after Ctrl-C too
            plan.passages.orphans |= committer.orphans  # ingest() deletes them after a complete run
            plan.collection.dataset()  # the collection's table handle moves to the last commit

    def split(self, cpus: float, gpus: float) -> tuple[int, float, float]:
        """(embedding workers, CPUs and GPUs each) on a cluster of `cpus` and `gpus`: by default one
        worker per GPU, so every GPU of every machine embeds; on a cluster without GPUs one per
        `cpus_per_worker` CPUs."""
        gpus_per = self.gpus_per_worker if self.gpus_per_worker is not None else (1 if gpus else 0)
        cpus_per = self.cpus_per_worker or 1
        workers = self.workers or max(1, int(gpus // gpus_per) if gpus_per else int(cpus // cpus_per))
        if workers * gpus_per > gpus or workers * cpus_per > cpus:  # Ray would wait for them forever
            raise IndexerError(f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: {workers} workers of "
                               f"{cpus_per:g} CPUs and {gpus_per:g} GPUs do not fit (lower --workers, "
                               "--cpus-per-worker or --gpus-per-worker)")
        return workers, cpus_per, gpus_per

    def _pipeline(self, ray, plan: Plan, run: Run, units, uri: str):
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
        workers, cpus_per, gpus_per = self.split(cpus, gpus)
        log.info("ray: %d embedding workers (%g CPUs, %g GPUs each) on %g CPUs, %g GPUs",
                 workers, cpus_per, gpus_per, cpus, gpus)
        # Light stages take no CPU slot (the embedding actors may hold them all) and few processes.
        light = {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=max(1, min(4, int(cpus))))}
        spare = cpus - workers * cpus_per
        embedder = plan.embedder
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the claims stage needs input order
        # Ray Data runs one task per block and merges what a task yields into blocks of this size: small
        # blocks spread the items of one big file over all the embedding workers.
        ctx.target_max_block_size = BLOCK_BYTES
        ds = ray.data.from_items([{"order": i, BLOB: pickle.dumps(u)} for i, u in enumerate(units)],
                                 override_num_blocks=max(1, len(units)))
        # Texts sort by length in a window of 8 batches, and at least 512 texts (8 GPU batches): each call
        # to an embedding actor has a fixed cost, which CPU batches of 16 would pay 4x as often.
        window = plan.batch_size if plan.opts.modality == "image" else max(plan.batch_size * 8, 512)
        ds = ds.map_batches(_read, batch_size=1, fn_kwargs={"opts": plan.opts}, **light)
        ds = ds.map_batches(_Claims, batch_size=None, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0,
                            # its state is the run's: a restart would forget the ids seen
                            max_restarts=0, allow_out_of_order_execution=False,
                            fn_constructor_kwargs={
                                "known": [ray.put(run.known)], "dim": embedder.dim,
                                "passages": [ray.put(plan.passages)] if plan.passages.chunker else None})
        if plan.opts.modality == "image":
            decode_cpus = {"num_cpus": 1} if spare >= 1 else light
            ds = ds.map_batches(_decode, batch_size=plan.batch_size, **decode_cpus,
                                fn_kwargs={"transform": embedder.preprocess_fn(),
                                           "min_size": embedder.spec.preprocessing.get("resize"),
                                           "defer_jpegs": _gpu_decodes_jpegs(plan, gpus_per)})
        ds = ds.map_batches(_Embed, batch_size=window, compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=cpus_per, num_gpus=gpus_per,
                            fn_constructor_kwargs={"factory": plan.factory, "spec": embedder.spec,
                                                   "device": plan.device, "precision": plan.precision,
                                                   "batch_size": plan.batch_size if plan.batch_size_given else None})
        # Workers reach an object store with the collection's storage options (credentials come from
        # each worker's own environment, as for any S3 client).
        return ds.map_batches(_write, batch_size=plan.commit_rows, **light, fn_kwargs={
            "uri": uri, "storage_options": plan.collection.location.storage_options or None})


def _gpu_decodes_jpegs(plan: Plan, gpus_per_worker: float) -> bool:
    """Whether the embedding actors decode plain JPEGs on their GPUs (nvjpeg), as the local engine does:
    they have GPUs, the model runs there, and its transform runs on tensors. The decode tasks then only
    pass the JPEGs' bytes on (smaller than the pixels, too)."""
    return (gpus_per_worker > 0 and not plan.device.startswith("cpu")
            and decodes_on_device(plan.embedder.preprocess_fn()))


def _root_cause(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _ensure_table(plan: Plan) -> str | None:
    """The Lance dataset's URI; a new collection's table is created first, its schema from the first
    records (read here), so every worker writes fragments of one schema. None if no record is readable."""
    coll = plan.collection
    if coll.table is None:
        rows = []
        peek = SCHEMA_PEEK if plan.opts.modality != "image" else 16  # images: reading one is reading a file
        split = Passages(plan.passages.chunker, {}, {})  # passages carry their own fields (doc_id, chunk, ...)
        for n, record in enumerate(iter_records(plan.sources, plan.opts)):
            for part in split.expand(record):
                item = prepare(part, {})
                if isinstance(item, Prepared):
                    rows.append(stored_row(item))
            if len(rows) >= peek or n >= 8 * peek:
                break
        if not rows:
            return None
        schema = rows_to_table(rows, np.zeros((len(rows), plan.embedder.dim), dtype=np.float32)).schema
        coll.db.create_table(TABLE, schema=schema)
    return coll.dataset().uri


class _Committer:
    """Groups written fragments into atomic Lance commits of about `commit_rows` rows (or every 20 s)."""

    def __init__(self, plan: Plan, run: Run, uri: str, seconds: float = 20.0):
        self.coll, self.run, self.uri = plan.collection, run, uri
        self.storage_options = plan.collection.location.storage_options or None
        self.commit_rows, self.seconds = plan.commit_rows, seconds
        self.pending: list[Written] = []
        self.orphans: set[str] = set()
        self.last = time.monotonic()

    def add(self, written: Written) -> None:
        run = self.run
        for item in written.errors:
            run.skip(item)
        run.unchanged(written.unchanged)
        self.orphans |= written.orphans
        run.summary.truncated += written.truncated
        for stage in written.stages.seconds:
            run.stages.add(stage, written.stages.seconds[stage], written.stages.items[stage])
        run.flush_errors()
        if written.rows is not None:
            self.commit()
            self._write_here(*written.rows)
        elif written.fragments:
            self.pending.append(written)
        rows = sum(w.added + len(w.updates) for w in self.pending)
        if rows >= self.commit_rows or (rows and time.monotonic() - self.last > self.seconds):
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        import lance

        with self.run.stages.time("write"):  # the write tasks counted the rows; this is the commit's time
            ds = lance.dataset(self.uri, storage_options=self.storage_options)
            removed, updated = _delete_rows(ds, [i for w in self.pending for i in w.updates])
            op = lance.LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated,
                                             new_fragments=[f for w in self.pending for f in w.fragments])
            lance.LanceDataset.commit(self.uri, op, read_version=ds.version, storage_options=self.storage_options)
        self.run.written(added=sum(w.added for w in self.pending), updated=sum(len(w.updates) for w in self.pending))
        self.pending = []
        self.last = time.monotonic()

    def _write_here(self, rows: list[dict], vectors: np.ndarray, updates: list[bool]) -> None:
        """A batch with a field the table lacks: the collection adds the column and writes it, as locally."""
        self.coll.dataset()  # see the commits made behind the table handle's back
        for upsert in (False, True):
            idx = [i for i, u in enumerate(updates) if u == upsert]
            if idx:
                with self.run.stages.time("write", len(idx)):
                    self.coll.write([rows[i] for i in idx], vectors[idx], upsert=upsert)
        self.run.written(added=updates.count(False), updated=updates.count(True))


def _delete_rows(ds, ids: list[str]) -> tuple[list[int], list]:
    """Delete the stored rows of `ids` fragment by fragment (not committed): (removed fragment ids,
    updated fragment metadata) for the commit that adds their new rows."""
    by_fragment: dict[int, list[int]] = defaultdict(list)
    for start in range(0, len(ids), 1000):
        where = f"id IN ({', '.join(_sql_str(i) for i in ids[start : start + 1000])})"
        found = ds.to_table(columns=[], filter=where, with_row_address=True)
        for address in found.column("_rowaddr").to_pylist():
            by_fragment[address >> 32].append(address & 0xFFFFFFFF)
    removed, updated = [], []
    for fragment_id, offsets in by_fragment.items():
        meta = ds.get_fragment(fragment_id).delete_rows(offsets)
        if meta is None:
            removed.append(fragment_id)
        else:
            updated.append(meta)
    return removed, updated
