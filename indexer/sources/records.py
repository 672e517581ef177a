"""What every source yields: a Record to embed, or a SkippedInput to log."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Columns the collection owns; user fields with these names are stored with a `user_` prefix.
RESERVED = frozenset({"id", "vector", "content_hash", "record_hash", "source", "text", "path", "label"})


@dataclass
class Record:
    """One input. `vector` (precomputed) or else one of `text` / `path` / `data` carries the payload."""

    id: str
    source: str
    text: str | None = None
    path: str | None = None
    data: bytes | None = None
    label: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    vector: np.ndarray | None = None
    layout: Any = None  # documents: where pages and headings start in `text` (sources.documents.Layout)

    def payload_bytes(self) -> bytes:
        if self.vector is not None:
            return self.vector.tobytes()
        if self.text is not None:
            return self.text.encode("utf-8")
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as fh:
            return fh.read()

    def record_hash(self, content_hash: str) -> str:
        """Changes when the content, label or fields change: what incremental ingest compares.
        (Not the source path: moving a folder should not re-embed it.)"""
        meta = json.dumps([self.label, self.fields], sort_keys=True, default=str)
        return hashlib.sha256(f"{content_hash}\0{meta}".encode()).hexdigest()[:32]


@dataclass
class SkippedInput:
    """An input that could not be used, with the reason; it goes to errors.jsonl."""

    source: str
    reason: str
    id: str | None = None


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
