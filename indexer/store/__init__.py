"""Collections on disk: LanceDB table + manifest + error log."""

from .collection import Collection
from .manifest import Manifest

__all__ = ["Collection", "Manifest"]
