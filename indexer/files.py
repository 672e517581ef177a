"""Files beside the Lance table (manifest, index files, model records): written atomically, fingerprinted,
checked before use. Path in, bytes out: the one place a collection on object storage will plug in."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import IndexerError

_CHUNK = 1 << 22  # files can be GBs (weights, indexes): hashed in 4 MB reads


def sha256_files(paths: Sequence[Path]) -> str:
    """One digest over the files' bytes, in a stable (sorted) order; for one file, that file's sha256."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: Path) -> dict[str, Any]:
    """{"size", "mtime_ns", "sha256"}: what `verify` checks the file against later."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_files([path])}


def replace_atomic(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` beside `path`, then fsync + rename: a reader sees the old file or the new one,
    never half of one; a failed write leaves no temp file behind."""
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


def write_atomic(path: Path, write: Callable[[str], None]) -> dict[str, Any]:
    """`replace_atomic`, returning the new file's fingerprint (for index.json)."""
    replace_atomic(path, write)
    return fingerprint(path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` as the file at `path` (its folder made), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def verify(path: Path, expected: dict[str, Any], rebuild_hint: str) -> None:
    """A missing, truncated or modified file is refused with a message that says how to rebuild it.
    The checksum is recomputed only when size or mtime moved, so opening stays cheap."""
    damaged = f"{path} is damaged or was changed outside indexer; rebuild it with `{rebuild_hint}`"
    if not path.exists():
        raise IndexerError(f"{path} is missing; rebuild it with `{rebuild_hint}`")
    st = path.stat()
    if st.st_size != expected["size"]:
        raise IndexerError(damaged)
    if st.st_mtime_ns != expected["mtime_ns"] and sha256_files([path]) != expected["sha256"]:
        raise IndexerError(damaged)
