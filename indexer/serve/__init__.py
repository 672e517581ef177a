"""The HTTP service and search page over collections: `indexer serve COLL...` (the `serve` extra: `pip install 'indexer-lancedb[serve]'`)."""

from __future__ import annotations

from .server import serve

__all__ = ["serve"]
