"""ingest: sources -> model -> collection, streaming, incremental and resumable.

`ingest()` is what every engine shares; the engines (engine.py explains the seam) read, embed,
write and commit: `local` in this process, `ray` on a Ray cluster.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from ..errors import IndexerError
from ..index import update_after_ingest
from ..models import DEFAULT_MODELS, Embedder, Runtime, load_embedder, resolve_runtime, resolve_spec, respec
from ..models.precomputed import PrecomputedVectors
from ..sources import (
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
from .autotune import MIN_SAMPLE, choose, sample_inputs
from .calibration import calibrate
from .chunking import Passages, make_chunker, stored_chunks
from .drift import check_drift, needs_check
from .engine import Engine, IngestSummary, Plan, Run

__all__ = ["Engine", "IngestInterrupted", "IngestSummary", "Plan", "StrictError", "ingest", "make_engine"]

log = logging.getLogger(__name__)

# Engines load lazily: the ray one imports Ray, an optional extra.
ENGINES = {"local": "indexer.ingest.local:LocalEngine", "ray": "indexer.ingest.ray_engine:RayEngine"}


class StrictError(IndexerError):
    """--strict and some inputs were skipped; the run itself completed."""

    exit_code = 1

    def __init__(self, message: str, summary: IngestSummary):
        super().__init__(message)
        self.summary = summary


class IngestInterrupted(StrictError):
    """Ctrl-C: what was embedded is committed; the same command resumes."""

    exit_code = 130


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
             pooling: str | None, normalize: bool, opts: SourceOptions) -> ModelSpec:
    """The spec to embed with: the collection's recorded one unless flags say otherwise."""
    if coll is not None:
        if coll.spec.name == "none":
            raise IndexerError(f"{coll.path} holds precomputed vectors (model none): add more with --vector-field")
        if model is None and weights is None and layer is None and pooling is None:
            return respec(coll.spec)
        return _with_recipe(resolve_spec(model or coll.spec.name, weights=weights, layer=layer, pooling=pooling,
                                         normalize=normalize, modality=coll.spec.modality), coll)
    modality = guess_modality(sources, opts.text_field, opts.image_field)  # a joint text-image model embeds the sources' kind with its tower
    if model is None:
        model = DEFAULT_MODELS[modality]
        log.info("no --model given: using %s", model)
    return resolve_spec(model, weights=weights, layer=layer, pooling=pooling, normalize=normalize,
                        modality=modality)


def _with_recipe(spec: ModelSpec, coll: Collection | None) -> ModelSpec:
    """`spec` with the int8 recipe the collection's vectors were made with (as `respec` keeps it)."""
    return spec if coll is None else replace(spec, quantization=coll.spec.quantization)


def _precomputed(coll: Collection | None, sources: list[str], opts: SourceOptions, model: str | None, weights,
                 layer, pooling, normalize: bool, runtime) -> Embedder:
    """The spec for vectors made elsewhere: the named model's (its dim is checked), `none`, or the
    collection's own."""
    if model not in (None, "none"):
        spec = resolve_spec(model, weights=weights, layer=layer, pooling=pooling, normalize=normalize)
        spec = load_embedder(_with_recipe(spec, coll), runtime).spec
    elif coll is not None and model is None:
        spec = coll.spec
    else:
        first = next((r for r in iter_records(sources, opts, look_ahead=True) if getattr(r, "vector", None) is not None), None)
        if first is None:
            raise IndexerError("no vectors found in the sources (check --vector-field)")
        spec = ModelSpec(name="none", modality="vector", dim=len(first.vector), normalize=normalize)
    return PrecomputedVectors(spec, runtime)


def _auto_precision(spec: ModelSpec, sources: list[str], opts: SourceOptions, device: str, batch_size: int | None,
                    default: Runtime) -> tuple[dict | None, Runtime]:
    """--precision auto: the measured decision and its runtime; the default one for too few inputs."""
    sample = sample_inputs(sources, opts)
    if len(sample) < MIN_SAMPLE:
        log.info("--precision auto: %d usable inputs are too few to measure on (%d): %s %s", len(sample),
                 MIN_SAMPLE, default.backend, default.precision)
        return None, default
    tuned = choose(spec, sample, device, batch_size, lambda embedder: calibrate(embedder, sources, opts, None))
    return tuned, resolve_runtime(device, tuned["precision"], tuned["backend"])


def make_engine(name: str = "local", **options) -> Engine:
    """The engine called `name`, configured by its own options (the local one takes `workers`; ray takes
    `address`, `workers`, `gpus_per_worker`, `cpus_per_worker`)."""
    if name not in ENGINES:
        raise IndexerError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    engine = getattr(importlib.import_module(module), cls)
    unknown = sorted(k for k, v in options.items() if v is not None and k not in engine.__dataclass_fields__)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise IndexerError(f"{flags}: only for another --engine than {name}")
    return engine(**{k: v for k, v in options.items() if v is not None})


def ingest(collection: str | os.PathLike, sources: list[str], *, model: str | None = None,
           weights: str | None = None, layer: int | str | None = None, pooling: str | None = None,
           normalize: bool = True, text_field: str = "text", image_field: str = "image",
           id_field: str | None = None, label_field: str | None = None, batch_size: int | None = None,
           vector_field: str | None = None, workers: int | None = None, device: str = "auto",
           precision: str = "default", backend: str | None = None, strict: bool = False, progress: bool = True,
           chunk_tokens: int | None = None, chunk_overlap: int | None = None, engine: str = "local",
           address: str | None = None, gpus_per_worker: float | None = None,
           cpus_per_worker: float | None = None, storage_options: dict[str, str] | None = None) -> IngestSummary:
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
    `engine="ray"` runs the same ingest on a Ray cluster (`address`: "auto", "HOST:PORT" or
    "ray://HOST:PORT"; default: a local one) with `workers` embedding actors of `gpus_per_worker` GPUs
    and `cpus_per_worker` CPUs each; `workers` is the number of image decoding processes locally.
    `backend="onnx"` runs the model exported to ONNX Runtime (CPU; `precision="int8"` quantises it);
    a collection keeps the backend and int8 it was made with, and queries are embedded the same way.
    `precision="default"` is fp16 autocast on CUDA, fp32 on CPU; `precision="auto"` measures the ways
    this machine has on a sample of the inputs and takes the fastest that keeps overlap@10 >= 0.95
    with fp32 (autotune.py; cached, recorded in the manifest as `auto_precision`).

    >>> s = ingest("notes.idx", ["notes/"], model="minilm")      # doctest: +SKIP
    >>> s.added, s.errors                                          # doctest: +SKIP
    (120, 0)
    """
    from tqdm import tqdm

    path = str(collection)
    sources = expand_file_lists(sources)
    coll = Collection.find(path, storage_options)
    label_field = _label_field(coll, label_field)
    started = time.perf_counter()
    runner = make_engine(engine, workers=workers, address=address, gpus_per_worker=gpus_per_worker,
                         cpus_per_worker=cpus_per_worker)
    local = engine == "local"
    if precision == "auto" and (not local or backend is not None or coll is not None):
        if not local:
            raise IndexerError("--precision auto measures the ways of this machine: the local engine only")
        if backend is not None:
            raise IndexerError("--precision auto picks the backend too: leave out --backend")
        log.info("--precision auto: %s keeps the way its vectors were made", coll.path)
        precision = "default"
    if coll is not None and backend is None and precision == "default":
        # A re-run embeds the way the stored vectors were (another backend or int8 would be refused).
        backend = coll.spec.backend
        precision = "int8" if coll.spec.precision == "int8" else "default"
    backend = backend or "torch"
    if not local and backend != "torch":
        raise IndexerError(f"--backend {backend}: the local engine only (--engine local)")
    # Another engine embeds on its workers: here the model is built on the CPU only to know its spec.
    # (--precision auto: measured below, once the model and the inputs are known)
    runtime = resolve_runtime(device, "default" if precision == "auto" else precision, backend) if local \
        else resolve_runtime("cpu", "fp32")
    tuned = None
    if batch_size is not None and batch_size < 1:
        raise IndexerError("--batch-size must be at least 1")
    opts_for = lambda modality: SourceOptions(  # noqa: E731
        modality=modality, text_field=text_field, image_field=image_field, id_field=id_field,
        label_field=label_field, vector_field=vector_field)
    if vector_field is not None or any(Path(s).suffix.lower() == ".npy" for s in sources):
        opts = opts_for("vector")
        check_sources(sources, "vector")
        embedder = _precomputed(coll, sources, opts, model, weights, layer, pooling, normalize, runtime)
        factory = PrecomputedVectors
        precision = "default"  # no model runs
    else:
        spec = _resolve(coll, sources, model, weights, layer, pooling, normalize, opts_for("text"))
        opts = opts_for(spec.modality)
        check_sources(sources, spec.modality)  # before loading the model (seconds), so a typo fails at once
        if precision == "auto":
            tuned, runtime = _auto_precision(spec, sources, opts, device, batch_size, runtime)
            backend, precision = runtime.backend, runtime.precision
        embedder = load_embedder(replace(spec, calibration=None), runtime)  # calibrate() finds a recorded one
        if embedder.needs_calibration:  # static int8: on this ingest's first images, or the collection's
            calibrate(embedder, sources, opts, coll.spec.calibration if coll else None)
        if not local and precision == "int8":  # the workers quantise: the vectors are int8's
            embedder.spec = replace(embedder.spec, precision="int8")
        factory = load_embedder
    chunker = make_chunker(embedder, chunk_tokens, chunk_overlap, coll.manifest.chunking if coll else None)
    # Another ingest may have created the collection while the model loaded.
    created = False
    if coll is None:
        coll, created = Collection.find_or_create(path, embedder.spec, storage_options)
    if created:
        coll.manifest.auto_precision = tuned  # saved by touch() below
    else:
        coll.check_compatible(embedder.spec)
    given_batch_size = batch_size
    batch_size = batch_size or embedder.batch_size()  # on a GPU: what its free memory holds

    with coll.write_lock("ingest"):
        if label_field not in (None, "label", coll.manifest.label_field):
            coll.manifest.label_field = label_field
            coll.save_manifest()
        known = coll.record_hashes()
        total = count_inputs(sources, opts)
        bar = tqdm(total=total, unit="item", disable=not progress, dynamic_ncols=True, smoothing=0.05,
                   desc=f"ingest {Path(path).name}")
        run = Run(coll, known, bar, dim=embedder.dim)
        passages = Passages(chunker, stored_chunks(coll), known)
        plan = Plan(coll, sources, opts, embedder, factory, batch_size, passages, device, precision,
                    commit_rows=max(256, 8 * batch_size), total=total,
                    batch_size_given=given_batch_size is not None)
        try:
            runner.run(plan, run)
        except KeyboardInterrupt:
            run.summary.interrupted = True
        finally:
            bar.close()
            run.flush_errors()
        if not run.summary.interrupted:
            run.summary.removed = coll.delete(passages.orphans)
        coll.compact()
        coll.manifest.chunking = chunker.settings() if chunker else None
        coll.touch(embedder.spec)
        if not run.summary.interrupted:
            update_after_ingest(coll)
            if needs_check(coll, embedder):
                run.summary.drift = check_drift(coll, embedder)

    s = run.summary
    s.truncated += getattr(embedder, "truncated", 0)  # the local engine embeds with this one
    s.seconds = time.perf_counter() - started
    s.items_per_s = (s.added + s.updated) / s.seconds if s.seconds else 0.0
    s.rows = coll.count()
    s.stages, s.bottleneck = run.stages.to_dict(), run.stages.bottleneck()
    s.auto_precision = tuned
    log.debug("stages: %s", run.stages.line())
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
