"""Pure functions over a collection: search (and, later, knn, probe, dedup)."""

from .search import Query, exact_search, search, search_batch

__all__ = ["Query", "exact_search", "search", "search_batch"]
