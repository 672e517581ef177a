"""The engine seam: what `ingest()` hands an engine, and the rules every engine applies.

`ingest()` does what all engines share (resolve the model, open or create the collection, take the
write lock, load the stored record hashes, count, log errors, compact, update the index) and hands
an engine a `Plan` and a `Run`. An engine reads the plan's sources, embeds what the `Claims` say
needs embedding, writes the rows and commits them, counting into the run's summary:

    local.py       one process: a DataLoader for images, a background commit thread
    ray_engine.py  a Ray cluster: Ray Data reads and embeds, workers write Lance fragments,
                   the driver commits them

A third engine (Dask, Spark, a queue of jobs) implements the same `run(plan, run)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from ..models import Embedder, Runtime
from ..sources import SkippedInput, SourceOptions
from ..spec import ModelSpec
from ..store import Collection
from ..timing import Stages
from ..wording import counted
from .chunking import Passages
from .loader import Prepared, Unchanged

log = logging.getLogger(__name__)

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
    # {"read"|"preprocess"|"embed"|"write": {"seconds", "items_per_s"}}; writing runs in a background
    # thread, so its seconds overlap the others'
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    bottleneck: str | None = None  # the stage that took longest
    drift: dict | None = None  # measured in this run: another backend or int8 against torch fp32 (drift.py)
    auto_precision: dict | None = None  # --precision auto: the way picked, why, and every candidate's figures

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
        line = (f"{self.collection}: " + ", ".join(parts)
                + f" in {self.seconds:.1f}s ({self.items_per_s:.1f} items/s); {counted(self.rows, 'row')}")
        if self.bottleneck:
            line += f"; slowest stage: {self.bottleneck} ({self.stages[self.bottleneck]['seconds']:.1f}s)"
        return line


class Claims:
    """The incremental rules, applied to items in input order: unchanged items are skipped, the first
    occurrence of an id in a run is kept and later ones are errors, precomputed vectors must fit."""

    def __init__(self, known: dict[str, str], dim: int | None = None):
        self.known, self.dim = known, dim
        self.seen: set[str] = set()

    def classify(self, item: Prepared | Unchanged | SkippedInput) -> Prepared | Unchanged | SkippedInput:
        if isinstance(item, SkippedInput):
            return item
        if isinstance(item, Prepared) and self.known.get(item.record.id) == item.record_hash:
            item = Unchanged(item.record.id, item.record.source)  # hashed by a worker that had no `known`
        rid, source = (item.id, item.source) if isinstance(item, Unchanged) else (item.record.id, item.record.source)
        if rid in self.seen:
            return SkippedInput(source, f"duplicate id {rid!r} in this run (first occurrence kept)", rid)
        self.seen.add(rid)
        vector = None if isinstance(item, Unchanged) else item.record.vector
        if vector is not None and self.dim is not None and len(vector) != self.dim:
            return SkippedInput(source, f"vector has {len(vector)} dimensions; the collection has {self.dim}", rid)
        return item


class Run:
    """Bookkeeping shared by every engine: counts, errors (to errors.jsonl), the progress bar."""

    def __init__(self, collection: Collection, known: dict[str, str], progress, dim: int | None = None):
        self.collection, self.known, self.progress = collection, known, progress
        self.summary = IngestSummary(collection=str(collection.path), model=collection.spec.name)
        self.claims = Claims(known, dim)
        self.stages = Stages()  # the engine times what it does into this
        self.pending_errors: list[SkippedInput] = []
        self.first_errors: list[SkippedInput] = []  # a few, for the message when every input fails

    def skip(self, item: SkippedInput) -> None:
        self.summary.errors += 1
        self.pending_errors.append(item)
        if len(self.first_errors) < FIRST_ERRORS:
            self.first_errors.append(item)
        log.debug("skipped %s: %s", item.source, item.reason)
        self.progress.update(1)

    def unchanged(self, n: int = 1) -> None:
        self.summary.skipped += n
        self.progress.update(n)

    def accept(self, item: Prepared | Unchanged | SkippedInput) -> Prepared | None:
        """Count an item; return it if it needs embedding."""
        item = self.claims.classify(item)
        if isinstance(item, SkippedInput):
            self.skip(item)
        elif isinstance(item, Unchanged):
            self.unchanged()
        else:
            return item
        return None

    def written(self, added: int, updated: int) -> None:
        self.summary.added += added
        self.summary.updated += updated
        self.progress.update(added + updated)

    def flush_errors(self) -> None:
        self.collection.log_skipped(self.pending_errors)
        self.pending_errors = []


def stored_row(item: Prepared) -> dict:
    """The table row of an embedded item (its vector aside), as every engine writes it."""
    r = item.record
    row = {"id": r.id, "content_hash": item.content_hash, "record_hash": item.record_hash, "source": r.source}
    if r.text is not None:
        row["text"] = r.text
    if r.path is not None:
        row["path"] = r.path
    row["label"] = r.label
    row.update(r.fields)
    return row


@dataclass
class Plan:
    """What an engine is given: the inputs, how to read them, the model, and how to build it again."""

    collection: Collection
    sources: list[str]
    opts: SourceOptions
    embedder: Embedder  # built here: the local engine embeds with it, others read its spec
    factory: Callable[[ModelSpec, Runtime], Embedder]  # how a worker builds the same embedder
    batch_size: int
    passages: Passages
    device: str  # as given: a worker resolves it on its own machine
    precision: str
    commit_rows: int
    total: int | None
    batch_size_given: bool = True  # False: `batch_size` is this machine's default, a worker picks its own


class Engine(Protocol):
    """read -> embed -> write -> commit: everything the plan names, counted into `run`.

    Committed rows must survive a killed run (the next run skips them by their record hash);
    a KeyboardInterrupt commits what is embedded and propagates."""

    def run(self, plan: Plan, run: Run) -> None: ...
