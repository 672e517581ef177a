"""indexer: embeddings from frozen pretrained models, stored in LanceDB, searched exactly or by ANN.

>>> import indexer
>>> indexer.ingest("photos.idx", ["photos/"])                  # doctest: +SKIP
>>> indexer.search("photos.idx", image="query.jpg", k=5)       # doctest: +SKIP

The API loads on first use (PEP 562): `import indexer`, the store and `indexer info` load no torch.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import TYPE_CHECKING, Any

from .version import __version__

# name -> the module (relative to this package) that defines it
_API = {
    "IndexerError": "errors",
    "ModelSpec": "spec",
    "Collection": "store",
    "Embedder": "models", "list_models": "models", "load_embedder": "models",
    "IngestSummary": "ingest", "ingest": "ingest",
    "Query": "tasks.search", "search": "tasks.search", "search_batch": "tasks.search",
    "knn_eval": "tasks.knn", "knn_predict": "tasks.knn",
    "ProbeHead": "tasks.probe", "probe_eval": "tasks.probe", "probe_predict": "tasks.probe",
    "sweep_layers": "tasks.layers",
    "zero_shot_eval": "tasks.zeroshot", "zero_shot_predict": "tasks.zeroshot",
    "dedup": "tasks.dedup",
    "FinetuneReport": "tasks.finetune", "finetune": "tasks.finetune",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from .errors import IndexerError
    from .ingest import IngestSummary, ingest
    from .models import Embedder, list_models, load_embedder
    from .spec import ModelSpec
    from .store import Collection
    from .tasks.dedup import dedup
    from .tasks.finetune import FinetuneReport, finetune
    from .tasks.knn import knn_eval, knn_predict
    from .tasks.layers import sweep_layers
    from .tasks.probe import ProbeHead, probe_eval, probe_predict
    from .tasks.search import Query, search, search_batch
    from .tasks.zeroshot import zero_shot_eval, zero_shot_predict


def info(collection: str | os.PathLike) -> dict[str, Any]:
    """What a collection holds: rows, model spec, fields, error count, size, versions."""
    from .store import Collection

    return Collection.open(collection).info()


def restore(collection: str | os.PathLike, version: int | None = None) -> Any:
    """The Lance table's versions, newest first, each readable or not (`version=None`); or make `version`'s
    rows the newest version, a new commit (`indexer restore COLL --version N`): how a collection whose
    latest commit or data file was damaged comes back.

    >>> indexer.restore("photos.idx", version=3)          # doctest: +SKIP
    {'restored': 3, 'version': 6, 'rows': 120, 'moved': ['damaged/18446744073709551610.manifest']}
    """
    from .store import Collection

    coll = Collection.open(collection)
    if version is None:
        return coll.versions()
    with coll.write_lock("restore"):
        return coll.restore(version)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    """`indexer.ingest` names both a subpackage and the API function. Importing the subpackage sets it as
    an attribute here; the function keeps the name, as when the API was imported eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (isinstance(value, types.ModuleType) and name in _API):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["Collection", "Embedder", "FinetuneReport", "IndexerError", "IngestSummary", "ModelSpec", "ProbeHead", "Query",
           "__version__", "dedup", "finetune", "info", "restore",
           "ingest", "knn_eval", "knn_predict", "list_models", "load_embedder", "probe_eval", "probe_predict",
           "search", "search_batch", "sweep_layers", "zero_shot_eval", "zero_shot_predict"]
