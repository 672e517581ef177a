"""indexer: embeddings from frozen pretrained models, stored in LanceDB, searched exactly or by ANN.

>>> import indexer
>>> indexer.ingest("photos.idx", ["photos/"])                  # doctest: +SKIP
>>> indexer.search("photos.idx", image="query.jpg", k=5)       # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from .errors import IndexerError
from .ingest import IngestSummary, ingest
from .models import Embedder, ModelSpec, list_models, load_embedder
from .store import Collection
from .tasks.dedup import dedup
from .tasks.finetune import FinetuneReport, finetune
from .tasks.knn import knn_eval, knn_predict
from .tasks.layers import sweep_layers
from .tasks.probe import ProbeHead, probe_eval, probe_predict
from .tasks.search import Query, search, search_batch
from .version import __version__


def info(collection: str | os.PathLike) -> dict[str, Any]:
    """What a collection holds: rows, model spec, fields, error count, size, versions."""
    return Collection.open(collection).info()


__all__ = ["Collection", "Embedder", "FinetuneReport", "IndexerError", "IngestSummary", "ModelSpec", "ProbeHead", "Query",
           "dedup", "finetune", "info",
           "ingest", "knn_eval", "knn_predict", "list_models", "load_embedder", "probe_eval", "probe_predict",
           "search", "search_batch", "sweep_layers", "__version__"]
