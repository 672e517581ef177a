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
from .tasks.search import Query, search, search_batch

__version__ = "0.1.0"


def info(collection: str | os.PathLike) -> dict[str, Any]:
    """What a collection holds: rows, model spec, fields, error count, size, versions."""
    return Collection.open(collection).info()


__all__ = ["Collection", "Embedder", "IndexerError", "IngestSummary", "ModelSpec", "Query", "info", "ingest",
           "list_models", "load_embedder", "search", "search_batch"]
