"""The export cache: one directory per (weights, the pooled graph, backend, precision, and a static int8
model's calibration), written atomically, so a second run reuses it and a killed export leaves nothing
half-written behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import IndexerError
from ...spec import ModelSpec
from ..device import cpu_info

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when what an export contains changes, so old ones are not reused
# Static int8 keeps a CNN's first convolutions in fp32: the early, high-resolution layers are where int8
# loses most. Measured on EfficientNet-Lite0 (256 generated photos, onnx): mean cosine to fp32 0.9835 with
# none kept, 0.9904 with 2, 0.9943 with 3, 0.9969 with 8 (neighbour overlap@10 0.960 -> 0.980), and not
# slower in the same (noisy) run.
FLOAT_CONVS = 8


def cache_root() -> Path:
    """$INDEXER_CACHE, else ~/.cache/indexer. Not next to the model: packaged models live in
    site-packages, which is often read-only or shared by several environments."""
    return Path(os.environ.get("INDEXER_CACHE") or Path.home() / ".cache" / "indexer")


def export_dir(spec: ModelSpec, backend: str, precision: str, graph: str | None = None) -> Path:
    """Where the export of `spec`'s features graph for (backend, precision) lives (and, for a static
    int8 model, the calibration sample it was made with); `graph` names a rewrite of the plain export
    (a backend's fused kernels)."""
    key = {"weights": spec.weights_sha256 or spec.name, "layer": spec.layer, "pooling": spec.pooling,
           "options": spec.options, "backend": backend, "precision": precision, "format": EXPORT_FORMAT}
    if graph:
        key["graph"] = graph
    if precision == "int8" and spec.calibration:
        # A static int8 model is its calibration too: two collections of different images do not
        # share one (its ranges fit one's data), while the same inputs find the same export again.
        key["calibration"] = spec.calibration
        key["float_convs"] = FLOAT_CONVS
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    name = Path(spec.name.removeprefix("hf:")).name or "model"
    return cache_root() / "exports" / "-".join(filter(None, (name, backend, precision, graph, digest)))


def cached(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(directory)` into a temporary directory renamed into place when
    complete (a rename is atomic: readers see the whole export or none)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        log.info("exporting %s (once; cached in %s)", target.name, target.parent)
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not another process finishing the same export first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# Static int8 on an x86 CPU without VNNI: its u8 x s8 products go through VPMADDUBSW, whose pairwise
# 16-bit sums saturate. Weights of 7 bits cannot overflow there (ONNX Runtime's reduce_range, NNCF's
# overflow fix). Measured on EfficientNet-Lite0 (256 generated photos, AVX2 without VNNI, 8 fp32 convs):
# mean cosine to fp32 0.9837 -> 0.9911 (onnx), 0.9893 -> 0.9947 (openvino), as fast. With VNNI, 8 bits
# lose nothing to saturation and keep more (0.9969 on onnx), so 7 bits are only for CPUs without it.
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
WEIGHTS_7BIT = "-w7"  # in a calibration key: the model has 7-bit weights
# In a calibration key: NNCF (openvino) corrected the biases int8 shifts with its full algorithm, not its
# fast one. EfficientNet-Lite0, 512 photos, 7-bit weights (AVX2): mean cosine to fp32 0.9946 -> 0.9966,
# overlap@10 0.949 -> 0.954 (items), 0.942 -> 0.949 (queries); calibration 13-14 s instead of 8-10 (64
# images, 2 cores). Keys made before it lack it: their models are rebuilt the way they were made.
FULL_BIAS_CORRECTION = "-bc"


def int8_weight_bits() -> int:
    """The weight bits of a static int8 model made on this CPU: 7 on x86 without VNNI, else 8."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return 8  # ARM's int8 dot products (sdot) accumulate in 32 bits
    cpu = cpu_info()
    if cpu is None:
        return 7  # an x86 CPU we cannot inspect: 7 bits lose a little, saturation a lot more
    return 8 if cpu[1] & VNNI_FLAGS else 7


def calibration_key(sample: str, weight_bits: int) -> str:
    """The key of a new static int8 model: its calibration sample's digest, then its recipe (what a
    rebuild on another CPU or version must reproduce): the weight bits, full bias correction."""
    return sample + (WEIGHTS_7BIT if weight_bits == 7 else "") + FULL_BIAS_CORRECTION


def calibration_sample(key: str) -> str:
    """The calibration sample's digest that `key` starts with."""
    return key.removesuffix(FULL_BIAS_CORRECTION).removesuffix(WEIGHTS_7BIT)


@dataclass(frozen=True)
class Calibration:
    """Static int8: the model inputs (batches) whose activation ranges the quantiser measures, keyed by
    `spec.calibration`, and the recipe that key records. `batches=None`: only an export already cached
    under that key may be used (a query never calibrates; it must run the model the collection's vectors
    came from)."""

    batches: list[dict[str, torch.Tensor]] | None = None
    weight_bits: int = 8
    full_bias_correction: bool = False

    @classmethod
    def keyed(cls, key: str, batches: list[dict[str, torch.Tensor]] | None = None) -> Calibration:
        recipe = key[len(calibration_sample(key)):]
        return cls(batches, 7 if WEIGHTS_7BIT in recipe else 8, FULL_BIAS_CORRECTION in recipe)


class ExportMissing(IndexerError):
    """A statically quantised model is not in the cache and there is no calibration sample to rebuild it."""


def calibrated_export_missing(spec: ModelSpec, backend: str) -> ExportMissing:
    return ExportMissing(f"the {backend} int8 model these vectors were made with (calibrated on a sample of "
                         f"their inputs, {spec.calibration}) is not in the export cache {cache_root()}: run the "
                         "same indexer ingest again (same sources) to rebuild it, or point INDEXER_CACHE at "
                         "the cache it was built in")
