"""Transitional: tasks/finetune.py (being split into a package elsewhere) still imports write_atomic from
here. Its new home is indexer/files.py; delete this module once nothing imports it."""

from ..files import write_atomic

__all__ = ["write_atomic"]
