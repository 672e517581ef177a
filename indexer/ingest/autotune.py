"""`--precision auto`: the fastest way to embed on this machine that keeps fp32's neighbours, measured on
a sample of the user's own inputs, not guessed.

Candidates: on a GPU torch fp16, bf16 (where the GPU has it) and fp32; on a CPU torch fp32 and int8, and
ONNX Runtime and OpenVINO in fp32 and int8 where they are installed (a candidate the model family cannot
run is listed with the reason). Each embeds the sample after a warm-up batch (timed: the best of a few
runs, since other processes share the machine); its vectors are compared with torch fp32's on the same
sample (overlap@10: the share of each item's 10 nearest neighbours kept).
A CNN's int8 is static: it is calibrated first, exactly as the ingest calibrates it (on the first images
of the same sources; the ingest then finds that model in the export cache), and that is not timed.
The fastest candidate with overlap@10 >= 0.95 wins; torch fp32 always qualifies. The decision is cached
under the export cache root, keyed by the model's weights, the device (GPU name, or CPU model and core
count) and the runtime packages' versions, so the next ingest of that model on that machine reads it.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import IndexerError
from ..models import Embedder, load_embedder, resolve_runtime
from ..models.device import INT8_ISA, cpu_info
from ..models.runtimes.cache import cache_root
from ..sources import SkippedInput, SourceOptions, iter_records
from ..sources.images import ImageDecodeError, decode_image
from ..spec import ModelSpec
from ..store.manifest import package_versions
from .drift import MIN_OVERLAP, measure

log = logging.getLogger(__name__)

SAMPLE = 256  # inputs the candidates embed
MIN_SAMPLE = 20  # fewer: nothing worth measuring, the default way is taken
REPEATS = {"cuda": 3, "cpu": 2}  # timed runs per candidate (a GPU's take milliseconds)
FORMAT = 4  # bump when what a cached decision means changes (2: text batches of 8-16 on a CPU; 3: onnx fp32
# runs transformers on fused kernels; 4: onnx int8 scales a transformer's activations per token)
PACKAGES = ("torch", "transformers", "onnxruntime", "onnxscript", "openvino", "nncf")


def candidates(device: torch.device) -> list[tuple[str, str]]:
    """(backend, precision) pairs to try, torch fp32 (the reference) first."""
    if device.type == "cuda":
        gpu = [("torch", "fp32"), ("torch", "fp16")]
        return gpu + [("torch", "bf16")] if torch.cuda.is_bf16_supported() else gpu
    found = [("torch", "fp32"), ("torch", "int8")]
    for backend, module in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        if importlib.util.find_spec(module) is not None:
            found += [(backend, "fp32"), (backend, "int8")]
    return found


def sample_inputs(sources: list[str], opts: SourceOptions, n: int = SAMPLE) -> list[Any]:
    """The first `n` usable inputs: texts, or decoded images (unreadable ones are passed over here; the
    ingest records them)."""
    if "-" in sources:
        raise IndexerError("--precision auto measures on a sample of the inputs read first: not on stdin "
                           "(name a precision, or ingest from a file)")
    out = []
    for record in iter_records(sources, opts):
        if isinstance(record, SkippedInput):
            continue
        if opts.modality == "text":
            if record.text and record.text.strip():
                out.append(record.text)
        else:
            try:
                out.append(decode_image(record.payload_bytes()))
            except (OSError, ImageDecodeError):
                continue
        if len(out) >= n:
            break
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = cpu_info()
    if cpu is None:
        return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
    # The same CPU with fewer cores favours other ways; one name ("AMD EPYC" in a VM) can hide CPUs with
    # and without fast int8 (VNNI), so the instruction sets that decide it are part of the name.
    return f"{cpu[0]} x{os.cpu_count()} ({' '.join(f for f in INT8_ISA if f in cpu[1]) or 'no SIMD flags'})"


def _cache_file(spec: ModelSpec, device: torch.device, ways: list[tuple[str, str]]):
    key = {"weights": spec.weights_sha256 or spec.name, "layer": spec.layer, "pooling": spec.pooling,
           "modality": spec.modality, "options": spec.options, "device": _device_name(device),
           "packages": package_versions(PACKAGES), "candidates": ways, "min_overlap": MIN_OVERLAP, "format": FORMAT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    name = os.path.basename(spec.name.removeprefix("hf:")) or "model"
    return cache_root() / "precision" / f"{name}-{digest}.json"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


Calibrate = Callable[[Embedder], None]


def _measure(spec: ModelSpec, device: str, backend: str, precision: str, sample: list[Any], batch_size: int | None,
             reference: np.ndarray | None, calibrate: Calibrate | None) -> tuple[dict, np.ndarray | None]:
    """One candidate's figures (or why it was skipped) and its vectors."""
    way = {"backend": backend, "precision": precision}
    try:
        embedder = load_embedder(spec, resolve_runtime(device, precision, backend))
        if embedder.needs_calibration:  # static int8: a one-time cost, like the export, so not timed
            if calibrate is None:
                return {**way, "skipped": "static int8 needs a calibration sample"}, None
            calibrate(embedder)
    except (IndexerError, ImportError) as exc:
        return {**way, "skipped": str(exc).splitlines()[0]}, None
    batch = batch_size or embedder.default_batch_size
    try:
        embedder.embed(sample[:batch], batch)  # warm-up: lazy initialisation, kernel selection
        seconds = float("inf")
        for _ in range(REPEATS[embedder.runtime.device.type]):  # the best run: others share the machine
            start = time.perf_counter()
            vectors = _unit(embedder.embed(sample, batch))
            seconds = min(seconds, time.perf_counter() - start)
    finally:
        del embedder
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    figures = {"mean_cosine": 1.0, "overlap_at_10": 1.0} if reference is None else measure(vectors, reference)
    return {**way, "items_per_s": round(len(sample) / seconds, 2), **figures}, vectors


def choose(spec: ModelSpec, sample: list[Any], device: str = "auto", batch_size: int | None = None,
           calibrate: Calibrate | None = None) -> dict:
    """Measure every candidate on `sample` (or read the cached decision) and pick; `calibrate` gives a
    static int8 embedder its model, as the ingest will (without it, such a candidate is skipped). Returns
    {"backend", "precision", "reason", "device", "sample", "min_overlap", "measurements", "cached"}."""
    dev = resolve_runtime(device).device
    ways = candidates(dev)
    path = _cache_file(spec, dev, ways)
    if path.is_file():
        decision = {**json.loads(path.read_text()), "cached": str(path)}
        log.info("--precision auto: %s (decided before on this machine; %s)", decision["reason"], path)
        return decision
    started = time.perf_counter()
    measurements, reference = [], None
    for backend, precision in ways:
        figures, vectors = _measure(spec, device, backend, precision, sample, batch_size, reference, calibrate)
        reference = vectors if reference is None else reference  # torch fp32 runs first
        measurements.append(figures)
        log.debug("--precision auto: %s", figures)
    kept = [m for m in measurements if "skipped" not in m and m["overlap_at_10"] >= MIN_OVERLAP]
    best = max(kept, key=lambda m: m["items_per_s"])
    fp32 = measurements[0]["items_per_s"]
    others = [f"{m['backend']} {m['precision']} " + (f"overlap@10 {m['overlap_at_10']:.3f}" if "skipped" not in m
                                                   else "not available") for m in measurements if m is not best]
    reason = (f"{best['backend']} {best['precision']} at {best['items_per_s']:.1f} items/s, "
              f"{best['items_per_s'] / fp32:.2f}x torch fp32, overlap@10 {best['overlap_at_10']:.3f} >= {MIN_OVERLAP} "
              f"on {len(sample)} of the inputs (also measured: {'; '.join(others)})")
    decision = {"backend": best["backend"], "precision": best["precision"], "reason": reason,
                "device": _device_name(dev), "sample": len(sample), "min_overlap": MIN_OVERLAP,
                "seconds": round(time.perf_counter() - started, 1), "measurements": measurements}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(decision, indent=2) + "\n")
    os.replace(tmp, path)  # whole or absent for a reader
    log.info("--precision auto: %s; cached in %s", reason, path)
    return {**decision, "cached": None}
