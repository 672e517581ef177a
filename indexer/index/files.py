"""Index files are derived data: written atomically, checked before use, rebuilt when damaged."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import IndexerError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[str], None]) -> dict:
    """`write(tmp_path)` then fsync + rename. Returns the file's fingerprint for index.json."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return fingerprint(path)


def fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def verify(path: Path, expected: dict, rebuild_hint: str) -> None:
    """A missing, truncated or modified file is refused with a message that says how to rebuild.
    The full checksum is recomputed only when size or mtime moved, so opening stays cheap."""
    damaged = f"{path} is damaged or was changed outside indexer; rebuild it with `{rebuild_hint}`"
    if not path.exists():
        raise IndexerError(f"{path} is missing; rebuild it with `{rebuild_hint}`")
    st = path.stat()
    if st.st_size != expected["size"]:
        raise IndexerError(damaged)
    if st.st_mtime_ns != expected["mtime_ns"] and sha256_file(path) != expected["sha256"]:
        raise IndexerError(damaged)
