"""The local engine: one process embeds, DataLoader workers decode images, a thread commits."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..models import Embedder
from ..sources import iter_records
from .engine import Plan, Run, stored_row
from .loader import (
    ImageInputs,
    Prepared,
    decode_on_device,
    decodes_on_device,
    image_batches,
    loader_workers,
    prepare,
    read_ahead,
)
from .writer import BatchWriter

SMALL_IMAGE_RUN = 200  # images below which decoding stays in the main process


@dataclass
class LocalEngine:
    workers: int | None = None  # image decoding processes; None: loader_workers(), none for a small run

    def run(self, plan: Plan, run: Run) -> None:
        writer = BatchWriter(plan.collection, commit_rows=plan.commit_rows, stages=run.stages)
        out = _Output(run, writer)
        try:
            if plan.opts.modality in ("text", "vector"):
                _ingest_windows(out, plan)
            else:
                _ingest_images(out, plan, self.workers)
        finally:
            writer.close()


class _Output:
    """Embedded rows to the writer: new ids are appended, known ids upserted."""

    def __init__(self, run: Run, writer: BatchWriter):
        self.run, self.writer = run, writer

    def emit(self, items: list[Prepared], vectors: np.ndarray) -> None:
        counts = {}
        for upsert in (False, True):
            idx = [i for i, p in enumerate(items) if (p.record.id in self.run.known) == upsert]
            if idx:
                self.writer.put([stored_row(items[i]) for i in idx], vectors[idx], upsert=upsert)
            counts[upsert] = len(idx)
        self.run.written(added=counts[False], updated=counts[True])
        self.run.flush_errors()


def _ingest_windows(out: _Output, plan: Plan) -> None:
    """Text and precomputed vectors, in windows of many batches (sorting a window of texts by length
    keeps padding small). Documents are split into passages first when the collection chunks."""
    run = out.run
    window: list[Prepared] = []
    window_size = plan.batch_size * 64
    documents = iter_records(plan.sources, plan.opts)
    if _reads_ahead(plan.embedder):  # "read" is then the time the model's thread waited for records
        documents = read_ahead(documents, window_size)
    for document in run.stages.iterate("read", documents):
        with run.stages.time("preprocess"):  # chunking tokenises
            records = plan.passages.expand(document)
        if len(records) > 1 and run.progress.total is not None:
            run.progress.total += len(records) - 1  # the bar counts passages
        for record in records:
            with run.stages.time("read"):  # hashing
                prepared = prepare(record, run.known)
            item = run.accept(prepared)
            if item is not None:
                window.append(item)
        if len(window) >= window_size:
            _embed_window(out, plan.embedder, window, plan.batch_size)
            window = []
    _embed_window(out, plan.embedder, window, plan.batch_size)


def _reads_ahead(embedder: Embedder) -> bool:
    """Whether records are read (parsed, files opened) by a thread a window ahead of the model: on a GPU,
    whose forward pass leaves the CPU idle. On a CPU the model takes every core anyway."""
    return embedder.runtime.is_cuda


def _embed_window(out: _Output, embedder: Embedder, window: list[Prepared], batch_size: int) -> None:
    if window:
        payloads = [p.record.vector if p.record.vector is not None else p.record.text for p in window]
        out.emit(window, embedder.embed(payloads, batch_size, out.run.stages))


def _jpeg_device(embedder: Embedder) -> torch.device | None:
    """Where JPEGs are decoded when not in the workers: on the model's GPU (nvjpeg), for the CNNs whose
    transform runs on tensors there. None: the workers decode every image with PIL."""
    if embedder.runtime.is_cuda and decodes_on_device(embedder.preprocess_fn()):
        return embedder.runtime.device
    return None


def _ingest_images(out: _Output, plan: Plan, workers: int | None) -> None:
    run, embedder, sources = out.run, plan.embedder, plan.sources
    cuda = embedder.runtime.is_cuda
    default_workers, prefetch = loader_workers(os.cpu_count() or 1, cuda, plan.batch_size)
    if workers is None:
        # Starting a worker costs seconds (it imports torch): not worth it for a handful of images.
        small = plan.total is not None and plan.total < SMALL_IMAGE_RUN
        workers = 0 if small else default_workers
    if "-" in sources:
        workers = 0  # stdin can be read by one process only
    crop = embedder.spec.preprocessing.get("resize")
    transform = embedder.preprocess_fn()
    jpeg_device = _jpeg_device(embedder)
    dataset = ImageInputs(sources, plan.opts, run.known, transform, min_size=crop,
                          defer_jpegs=jpeg_device is not None)
    for batch in image_batches(dataset, plan.batch_size, workers, pin_memory=cuda, prefetch=prefetch):
        # Workers read and decode in parallel: their seconds, shared out, are the stage's wall time.
        n = len(batch["items"])
        run.stages.add("read", batch["read_s"] / max(workers, 1), n)
        run.stages.add("preprocess", batch["decode_s"] / max(workers, 1))  # embed_batch counts the items
        if jpeg_device is not None:
            with run.stages.time("preprocess"):
                decode_on_device(batch, transform, crop, jpeg_device)
        # batch["pixels"] holds one image per Prepared item, in order; duplicates are dropped after.
        prepared, keep = [], []
        for item in batch["items"]:
            accepted = run.accept(item) is not None
            if isinstance(item, Prepared):
                prepared.append(item)
                keep.append(accepted)
        keep = np.array(keep, dtype=bool)
        if keep.any():
            pixels = batch["pixels"]
            vectors = embedder.embed_batch(pixels[torch.from_numpy(keep).to(pixels.device)], run.stages)
            out.emit([p for p, k in zip(prepared, keep) if k], vectors)
