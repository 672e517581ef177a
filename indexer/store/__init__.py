"""Collections on disk: the LanceDB table, manifest.json and errors.jsonl (Collection, Manifest)."""

from .collection import Collection
from .manifest import Manifest

__all__ = ["Collection", "Manifest"]
