"""The export cache: one directory per (weights, the pooled graph, backend, precision), written
atomically, so a second run reuses it and a killed export leaves nothing half-written behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ...spec import ModelSpec

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when what an export contains changes, so old ones are not reused


def cache_root() -> Path:
    """$INDEXER_CACHE, else ~/.cache/indexer. Not next to the model: packaged models live in
    site-packages, which is often read-only or shared by several environments."""
    return Path(os.environ.get("INDEXER_CACHE") or Path.home() / ".cache" / "indexer")


def export_dir(spec: ModelSpec, backend: str, precision: str) -> Path:
    """Where the export of `spec`'s features graph for (backend, precision) lives."""
    key = {"weights": spec.weights_sha256 or spec.name, "layer": spec.layer, "pooling": spec.pooling,
           "options": spec.options, "backend": backend, "precision": precision, "format": EXPORT_FORMAT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    name = Path(spec.name.removeprefix("hf:")).name or "model"
    return cache_root() / "exports" / f"{name}-{backend}-{precision}-{digest}"


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
