"""ingest: sources -> model -> collection, streaming, incremental and resumable."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import IndexerError
from ..index import update_after_ingest
from ..models import DEFAULT_MODELS, Embedder, load_embedder, resolve_runtime, resolve_spec, respec
from ..models.precomputed import PrecomputedVectors
from ..sources import (
    SkippedInput,
    SourceOptions,
    check_sources,
    count_inputs,
    expand_file_lists,
    guess_modality,
    iter_records,
)
from ..spec import ModelSpec
from ..store import Collection
from ..wording import counted
from .chunking import Passages, make_chunker, stored_chunks
from .loader import ImageInputs, Prepared, Unchanged, image_batches, prepare
from .writer import BatchWriter

log = logging.getLogger(__name__)

SMALL_IMAGE_RUN = 200  # images below which decoding stays in the main process
FIRST_ERRORS = 3  # reasons quoted when every input failed


@dataclass
class IngestSummary:
    added: int = 0
    updated: int = 0
    skipped: int = 0  # unchanged since the last run: not embedded again
    errors: int = 0  # inputs that could not be used; reasons in errors.jsonl
    truncated: int = 0  # texts longer than the model's limit, embedded from their first tokens
    removed: int = 0  # stored passages a changed document no longer has, deleted
    seconds: float = 0.0
    items_per_s: float = 0.0
    rows: int = 0
    collection: str = ""
    model: str = ""
    interrupted: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def all_failed(self) -> bool:
        """Every input of the run failed: nothing was stored or found unchanged (the CLI exits 1)."""
        return self.errors > 0 and self.added + self.updated + self.skipped == 0

    def line(self) -> str:
        parts = [f"{self.added} added", f"{self.updated} updated", f"{self.skipped} unchanged",
                 counted(self.errors, "error")]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.removed:
            parts.append(f"{counted(self.removed, 'old passage')} removed")
        return (f"{self.collection}: " + ", ".join(parts)
                + f" in {self.seconds:.1f}s ({self.items_per_s:.1f} items/s); {counted(self.rows, 'row')}")


class StrictError(IndexerError):
    """--strict and some inputs were skipped; the run itself completed."""

    exit_code = 1

    def __init__(self, message: str, summary: IngestSummary):
        super().__init__(message)
        self.summary = summary


class IngestInterrupted(StrictError):
    """Ctrl-C: what was embedded is committed; the same command resumes."""

    exit_code = 130


class _Run:
    """Bookkeeping shared by the text and image paths: ids seen, counts, errors, progress."""

    def __init__(self, collection: Collection, writer: BatchWriter, known: dict[str, str], progress):
        self.collection, self.writer, self.known, self.progress = collection, writer, known, progress
        self.summary = IngestSummary(collection=str(collection.path), model=collection.spec.name)
        self.seen: set[str] = set()
        self.pending_errors: list[SkippedInput] = []
        self.first_errors: list[SkippedInput] = []  # a few, for the message when every input fails

    def skip(self, item: SkippedInput) -> None:
        self.summary.errors += 1
        self.pending_errors.append(item)
        if len(self.first_errors) < FIRST_ERRORS:
            self.first_errors.append(item)
        log.debug("skipped %s: %s", item.source, item.reason)
        self.progress.update(1)

    def accept(self, item: Prepared | Unchanged | SkippedInput) -> Prepared | None:
        """Count an item; return it if it needs embedding."""
        if isinstance(item, SkippedInput):
            self.skip(item)
            return None
        rid, source = (item.id, item.source) if isinstance(item, Unchanged) else (item.record.id, item.record.source)
        if rid in self.seen:
            self.skip(SkippedInput(source, f"duplicate id {rid!r} in this run (first occurrence kept)", rid))
            return None
        self.seen.add(rid)
        if isinstance(item, Unchanged):
            self.summary.skipped += 1
            self.progress.update(1)
            return None
        return item

    def emit(self, items: list[Prepared], vectors: np.ndarray) -> None:
        """Hand embedded rows to the writer: new ids are appended, known ids upserted."""
        for upsert in (False, True):
            idx = [i for i, p in enumerate(items) if (p.record.id in self.known) == upsert]
            if idx:
                rows = [_row(items[i]) for i in idx]
                self.writer.put(rows, vectors[idx], upsert=upsert)
                if upsert:
                    self.summary.updated += len(idx)
                else:
                    self.summary.added += len(idx)
        self.progress.update(len(items))
        self.flush_errors()

    def flush_errors(self) -> None:
        self.collection.log_skipped(self.pending_errors)
        self.pending_errors = []


def _row(item: Prepared) -> dict:
    r = item.record
    row = {"id": r.id, "content_hash": item.content_hash, "record_hash": item.record_hash, "source": r.source}
    if r.text is not None:
        row["text"] = r.text
    if r.path is not None:
        row["path"] = r.path
    row["label"] = r.label
    row.update(r.fields)
    return row


def _open_existing(path: str, storage_options: dict[str, str] | None) -> Collection | None:
    return Collection.open(path, storage_options) if Collection.exists(path, storage_options) else None


def _label_field(coll: Collection | None, given: str | None) -> str | None:
    """The field labels are read from: the one given, else the one the collection recorded (a
    re-run without --label-field keeps reading labels where the first run did). The labels of one
    collection come from one field: another name is refused."""
    recorded = coll.manifest.label_field if coll is not None else None
    if given is None or recorded is None or given == recorded:
        return given or recorded
    raise IndexerError(f"{coll.path} stores its labels from the field {recorded!r}; got --label-field {given!r} "
                       f"(use --label-field {recorded}, or ingest into a new collection)")


def _resolve(coll: Collection | None, sources: list[str], model: str | None, weights: str | None, layer,
             pooling: str | None, normalize: bool) -> ModelSpec:
    """The spec to embed with: the collection's recorded one unless flags say otherwise."""
    if coll is not None:
        if coll.spec.name == "none":
            raise IndexerError(f"{coll.path} holds precomputed vectors (model none): add more with --vector-field")
        if model is None and weights is None and layer is None and pooling is None:
            return respec(coll.spec)
        return resolve_spec(model or coll.spec.name, weights=weights, layer=layer, pooling=pooling,
                            normalize=normalize)
    if model is None:
        model = DEFAULT_MODELS[guess_modality(sources)]
        log.info("no --model given: using %s", model)
    return resolve_spec(model, weights=weights, layer=layer, pooling=pooling, normalize=normalize)


def _precomputed(coll: Collection | None, sources: list[str], opts: SourceOptions, model: str | None, weights,
                 layer, pooling, normalize: bool, runtime) -> Embedder:
    """The spec for vectors made elsewhere: the named model's (its dim is checked), `none`, or the
    collection's own."""
    if model not in (None, "none"):
        spec = load_embedder(resolve_spec(model, weights=weights, layer=layer, pooling=pooling,
                                          normalize=normalize), runtime).spec
    elif coll is not None and model is None:
        spec = coll.spec
    else:
        first = next((r for r in iter_records(sources, opts) if getattr(r, "vector", None) is not None), None)
        if first is None:
            raise IndexerError("no vectors found in the sources (check --vector-field)")
        spec = ModelSpec(name="none", modality="vector", dim=len(first.vector), normalize=normalize)
    return PrecomputedVectors(spec, runtime)


def ingest(collection: str | os.PathLike, sources: list[str], *, model: str | None = None,
           weights: str | None = None, layer: int | str | None = None, pooling: str | None = None,
           normalize: bool = True, text_field: str = "text", image_field: str = "image",
           id_field: str | None = None, label_field: str | None = None, batch_size: int | None = None,
           vector_field: str | None = None, workers: int | None = None, device: str = "auto",
           precision: str = "auto", strict: bool = False, progress: bool = True,
           chunk_tokens: int | None = None, chunk_overlap: int | None = None,
           storage_options: dict[str, str] | None = None) -> IngestSummary:
    """Embed `sources` into the collection at `collection` (created on first use).

    Incremental: items whose content and metadata are unchanged are skipped; changed ones are
    replaced. Resumable: rows are committed in batches, so a killed run continues where it stopped.
    Precomputed embeddings (`vector_field`, or .npy sources) are stored as they are, under the model
    that made them (`model`) or `model="none"`.
    `chunk_tokens` splits each text into passages of at most that many model tokens (consecutive ones
    sharing `chunk_overlap`), stored as `DOCID#N` rows with doc_id, chunk, start, end, page, heading;
    the collection remembers the setting (`chunk_tokens=0` turns it off).
    `collection` may be a local directory or an object-store URI (`s3://bucket/coll`), configured by
    the standard environment (AWS_*) and `storage_options` (Lance's option names).

    >>> s = ingest("notes.idx", ["notes/"], model="minilm")      # doctest: +SKIP
    >>> s.added, s.errors                                          # doctest: +SKIP
    (120, 0)
    """
    from tqdm import tqdm

    path = str(collection)
    sources = expand_file_lists(sources)
    coll = _open_existing(path, storage_options)
    label_field = _label_field(coll, label_field)
    started = time.perf_counter()
    runtime = resolve_runtime(device, precision)
    if batch_size is not None and batch_size < 1:
        raise IndexerError("--batch-size must be at least 1")
    opts_for = lambda modality: SourceOptions(  # noqa: E731
        modality=modality, text_field=text_field, image_field=image_field, id_field=id_field,
        label_field=label_field, vector_field=vector_field)
    if vector_field is not None or any(Path(s).suffix.lower() == ".npy" for s in sources):
        opts = opts_for("vector")
        check_sources(sources, "vector")
        embedder = _precomputed(coll, sources, opts, model, weights, layer, pooling, normalize, runtime)
    else:
        spec = _resolve(coll, sources, model, weights, layer, pooling, normalize)
        opts = opts_for(spec.modality)
        check_sources(sources, spec.modality)  # before loading the model (seconds), so a typo fails at once
        embedder = load_embedder(spec, runtime)
    chunker = make_chunker(embedder, chunk_tokens, chunk_overlap, coll.manifest.chunking if coll else None)
    if coll is None:
        coll = Collection.create(path, embedder.spec, storage_options)
    else:
        coll.check_compatible(embedder.spec)
    modality = opts.modality
    batch_size = batch_size or embedder.default_batch_size

    with coll.write_lock():
        if label_field not in (None, "label", coll.manifest.label_field):
            coll.manifest.label_field = label_field
            coll.save_manifest()
        known = coll.record_hashes()
        total = count_inputs(sources, opts)
        bar = tqdm(total=total, unit="item", disable=not progress, dynamic_ncols=True, smoothing=0.05,
                   desc=f"ingest {Path(path).name}")
        writer = BatchWriter(coll, commit_rows=max(256, 8 * batch_size))
        run = _Run(coll, writer, known, bar)
        passages = Passages(chunker, stored_chunks(coll), known)
        try:
            if modality in ("text", "vector"):
                _ingest_windows(run, embedder, sources, opts, batch_size, passages)
            else:
                _ingest_images(run, embedder, sources, opts, batch_size, workers, runtime.is_cuda, total)
        except KeyboardInterrupt:
            run.summary.interrupted = True
        finally:
            bar.close()
            writer.close()
            run.flush_errors()
        if not run.summary.interrupted:
            run.summary.removed = coll.delete(passages.orphans)
        coll.compact()
        coll.manifest.chunking = chunker.settings() if chunker else None
        coll.touch(embedder.spec)
        if not run.summary.interrupted:
            update_after_ingest(coll)

    s = run.summary
    s.truncated = getattr(embedder, "truncated", 0)
    s.seconds = time.perf_counter() - started
    s.items_per_s = (s.added + s.updated) / s.seconds if s.seconds else 0.0
    s.rows = coll.count()
    if s.truncated:
        log.warning("%s longer than %s tokens: embedded from their first tokens",
                    counted(s.truncated, "text was", "texts were"), embedder.spec.max_length)
    if s.all_failed:
        reasons = "; ".join(f"{e.source}: {e.reason}" for e in run.first_errors)
        log.error("every input failed (%s), nothing was stored; first: %s (all reasons in %s)",
                  counted(s.errors, "input"), reasons, f"{coll.path}/errors.jsonl")
    elif s.errors:
        log.warning("%s skipped; reasons in %s", counted(s.errors, "input"), f"{coll.path}/errors.jsonl")
    if s.interrupted:
        raise IngestInterrupted("interrupted; committed rows are kept: run the same command to resume", s)
    if strict and s.errors:
        raise StrictError(f"--strict: {counted(s.errors, 'input was', 'inputs were')} skipped "
                          f"(see {coll.path}/errors.jsonl)", s)
    return s


def _ingest_windows(run: _Run, embedder: Embedder, sources: list[str], opts: SourceOptions,
                    batch_size: int, passages: Passages) -> None:
    """Text and precomputed vectors, in windows of many batches (sorting a window of texts by length
    keeps padding small). Documents are split into passages first when the collection chunks."""
    window: list[Prepared] = []
    window_size = batch_size * 64
    for document in iter_records(sources, opts):
        records = passages.expand(document)
        if len(records) > 1 and run.progress.total is not None:
            run.progress.total += len(records) - 1  # the bar counts passages
        for record in records:
            item = run.accept(prepare(record, run.known))
            if item is not None and item.record.vector is not None and len(item.record.vector) != embedder.dim:
                run.skip(SkippedInput(item.record.source, f"vector has {len(item.record.vector)} dimensions; "
                                      f"the collection has {embedder.dim}", item.record.id))
            elif item is not None:
                window.append(item)
        if len(window) >= window_size:
            _embed_window(run, embedder, window, batch_size)
            window = []
    _embed_window(run, embedder, window, batch_size)


def _embed_window(run: _Run, embedder: Embedder, window: list[Prepared], batch_size: int) -> None:
    if window:
        payloads = [p.record.vector if p.record.vector is not None else p.record.text for p in window]
        run.emit(window, embedder.embed(payloads, batch_size))


def _ingest_images(run: _Run, embedder: Embedder, sources: list[str], opts: SourceOptions, batch_size: int,
                   workers: int | None, cuda: bool, total: int | None) -> None:
    if workers is None:
        # Starting a worker costs seconds (it imports torch): not worth it for a handful of images.
        small = total is not None and total < SMALL_IMAGE_RUN
        workers = 0 if small else min(4, os.cpu_count() or 1)
    if "-" in sources:
        workers = 0  # stdin can be read by one process only
    crop = embedder.spec.preprocessing.get("resize")
    dataset = ImageInputs(sources, opts, run.known, embedder.preprocess_fn(), min_size=crop)
    for batch in image_batches(dataset, batch_size, workers, pin_memory=cuda):
        # batch["pixels"] holds one image per Prepared item, in order; duplicates are dropped after.
        prepared, keep = [], []
        for item in batch["items"]:
            accepted = run.accept(item) is not None
            if isinstance(item, Prepared):
                prepared.append(item)
                keep.append(accepted)
        keep = np.array(keep, dtype=bool)
        if keep.any():
            vectors = embedder.embed_batch(batch["pixels"][torch.from_numpy(keep)])
            run.emit([p for p, k in zip(prepared, keep) if k], vectors)
