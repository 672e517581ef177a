"""The HTTP service and search page over collections: `indexer serve COLL...` (extra `indexer[serve]`)."""

from __future__ import annotations

from .server import serve

__all__ = ["serve"]
