"""Static int8 calibration: a CNN's int8 model (onnx, openvino) measures its activation ranges on the
first images of the user's own ingest, decoded and preprocessed exactly as they will be embedded.

The sample's key (its images' content hashes and the preprocessing) is recorded in the collection's
spec and keys the cached export: a re-run finds the same model without calibrating again, queries use
that one, and a collection of other images gets its own. If the export has left the cache, running the
same ingest again draws the same first images, so the same key, and rebuilds it."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import torch

from ..errors import IndexerError
from ..models import Embedder
from ..models.runtimes.cache import ExportMissing, calibration_key, calibration_sample, int8_weight_bits
from ..sources import SourceOptions
from .loader import ImageInputs, Prepared

log = logging.getLogger(__name__)

# Images calibrated on. Measured on EfficientNet-Lite0 over 512 generated photos (every convolution int8):
# 64 and 256 give the same vectors (mean cosine to fp32 0.983 both, onnx and openvino), 256 takes 5x
# longer (50 s vs 10 s).
SAMPLE = 64


def calibrate(embedder: Embedder, sources: list[str], opts: SourceOptions, recorded: str | None,
              sample: int = SAMPLE) -> None:
    """Give `embedder` its static int8 model: the one calibrated as `recorded` (the collection's key)
    when it is still cached, else one calibrated on the first `sample` images of `sources`."""
    if recorded is not None:
        try:
            embedder.calibrate(None, recorded)
            return
        except ExportMissing:
            log.info("the collection's int8 model is not cached: calibrating again on the same first images")
    started = time.perf_counter()
    digest, pixels = draw_sample(embedder, sources, opts, sample)
    if recorded is None:
        key = calibration_key(digest, int8_weight_bits())
    elif calibration_sample(recorded) == digest:
        key = recorded  # a rebuild keeps the collection's recipe, whatever this CPU would choose
    else:
        raise IndexerError(f"the int8 model this collection was calibrated with ({recorded}) is not in the export "
                           f"cache, and these sources do not start with the same {sample} images: ingest into a "
                           "new collection, or run the first ingest's command again")
    embedder.calibrate(pixels, key)
    log.info("int8 calibrated on the first %d images (%.1fs)", len(pixels), time.perf_counter() - started)


def draw_sample(embedder: Embedder, sources: list[str], opts: SourceOptions, sample: int) -> tuple[str, torch.Tensor]:
    """(digest, pixels) of the first `sample` images of `sources` that decode, whether stored already or
    not; the digest identifies them and their preprocessing."""
    if "-" in sources:
        raise IndexerError("--precision int8 calibrates a CNN on the first images before embedding them all, "
                           "and stdin can be read once only: give the images as files")
    dataset = ImageInputs(sources, opts, {}, embedder.preprocess_fn(),
                          min_size=embedder.spec.preprocessing.get("resize"))
    items: list[Prepared] = []
    for item, _, _ in dataset:
        if isinstance(item, Prepared):
            items.append(item)
            if len(items) == sample:
                break
    if not items:
        raise IndexerError("--precision int8 calibrates a CNN on the first images of its input: none could be "
                           "read (see the errors of a --precision fp32 run)")
    identity = {"images": [p.content_hash for p in items], "preprocessing": embedder.spec.preprocessing}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return key, torch.stack([p.tensor for p in items])
