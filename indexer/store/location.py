"""Where a collection lives: a local directory or a prefix on object storage (s3://, gs://, az://).

Lance reads and writes the table itself (its object-store layer); every other file of a collection
(manifest.json, errors.jsonl, the index files, the write lock) goes through `Location`, so those files
follow the table wherever it is. Object stores are configured the way every tool of their cloud is: the
standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_REGION, AWS_ALLOW_HTTP, ...)
and, for the rest, storage options (`--storage-option KEY=VALUE`: Lance's names, e.g. aws_region,
aws_endpoint, allow_http), which are given to Lance as they are and to pyarrow's filesystem for the
side files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import IndexerError
from ..files import write_bytes_atomic

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://")
LEASE_SECONDS = 120.0  # an object-store writer lease; renewed every 30 s while held

# Storage options that process-wide code (the CLI's --storage-option) sets for every collection it opens.
_default_options: dict[str, str] = {}


def set_default_storage_options(options: dict[str, str]) -> None:
    _default_options.clear()
    _default_options.update(options)


def parse_storage_options(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`KEY=VALUE` strings -> a dict, with a clear error for a pair without `=`."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise IndexerError(f"--storage-option {pair!r}: expected KEY=VALUE (e.g. aws_region=eu-west-1)")
        out[key.strip().lower()] = value
    return out


def is_remote(uri: str | os.PathLike) -> bool:
    return isinstance(uri, str) and uri.startswith(REMOTE_SCHEMES)


def _holder(record: str) -> str:
    """Who holds a local lock, from what its file says (empty in the moment between taking and writing it)."""
    try:
        held = json.loads(record)
        since = time.strftime("%H:%M:%S", time.localtime(held["since"]))
        return f"process {held['pid']} ({held['purpose']}, since {since})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "another process"


class Location:
    """A collection's root. Names below it are relative, '/'-separated ("index/index.json")."""

    def __init__(self, uri: str | os.PathLike, storage_options: dict[str, str] | None = None):
        self.remote = is_remote(uri)
        self._identity: str | None = None
        self.storage_options = {**_default_options, **(storage_options or {})}
        if self.remote:
            self.uri = str(uri).rstrip("/")
            self._fs, self._root = _remote_filesystem(self.uri, self.storage_options)
        else:
            self.uri = str(uri)
            self._fs, self._root = None, Path(uri)

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def local_path(self) -> Path:
        """The directory itself; only for local collections."""
        if self.remote:
            raise IndexerError(f"{self.uri} is on object storage: no local path")
        return self._root

    def identity(self) -> str:
        """A key naming this collection in caches (absolute path or URI); resolved once (the query path asks)."""
        if self._identity is None:
            self._identity = self.uri if self.remote else str(self._root.resolve())
        return self._identity

    def lance_uri(self, name: str = "lance") -> str:
        return f"{self.uri}/{name}" if self.remote else str(self._root / name)

    # ---- files beside the table -------------------------------------------------------------------------

    def exists(self, name: str = "") -> bool:
        if not self.remote:
            return (self._root / name).exists() if name else self._root.exists()
        import pyarrow.fs as pafs

        return self._fs.get_file_info(self._key(name)).type != pafs.FileType.NotFound

    def is_empty(self) -> bool:
        """True when there is nothing at the root (a new collection may be created there)."""
        if not self.remote:
            return not self._root.exists() or not any(self._root.iterdir())
        return not self._remote_files()

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        if not self.remote:
            try:
                return (self._root / name).read_bytes()
            except FileNotFoundError:
                return None
        try:
            with self._fs.open_input_stream(self._key(name)) as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:  # pyarrow reports a missing object as OSError on some stores
            if "not found" in str(exc).lower() or "nosuchkey" in str(exc).lower():
                return None
            raise

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic: a reader sees the old file or the new one. Local: temp file + fsync + rename; object
        stores make a single PUT visible whole."""
        if not self.remote:
            write_bytes_atomic(self._root / name, data)
            return
        with self._fs.open_output_stream(self._key(name)) as fh:
            fh.write(data)

    def append_lines(self, name: str, lines: list[str]) -> None:
        """Append text lines (errors.jsonl). Object stores cannot append: the object is rewritten, which
        is fine for a log that only the collection's one writer (it holds the lock) adds to."""
        text = "".join(line + "\n" for line in lines)
        if not self.remote:
            self._root.mkdir(parents=True, exist_ok=True)
            with open(self._root / name, "a", encoding="utf-8") as fh:
                fh.write(text)
            return
        old = self.read_bytes(name) or b""
        self.write_bytes(name, old + text.encode("utf-8"))

    def delete(self, name: str) -> None:
        if not self.remote:
            (self._root / name).unlink(missing_ok=True)
            return
        try:
            self._fs.delete_file(self._key(name))
        except FileNotFoundError:
            pass

    def size(self) -> int:
        if not self.remote:
            return sum(f.stat().st_size for f in self._root.rglob("*") if f.is_file())
        return sum(size for _, size in self._remote_files())

    def _key(self, name: str) -> str:
        return f"{self._root}/{name}" if name else self._root

    def _remote_files(self, prefix: str = "") -> list[tuple[str, int]]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self._key(prefix), recursive=True, allow_not_found=True)
        cut = len(self._root) + 1
        return [(i.path[cut:], i.size) for i in self._fs.get_file_info(selector) if i.type == pafs.FileType.File]

    # ---- the index directory: a local working copy for object stores -----------------------------------

    def local_dir(self, name: str) -> Path:
        """A local directory holding `name`'s files: the directory itself for a local collection; for one
        on object storage, a cache directory (FAISS maps and writes local files) that `pull` fills and
        `push` publishes."""
        if not self.remote:
            return self._root / name
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        cache = Path(os.environ.get("INDEXER_CACHE", Path.home() / ".cache" / "indexer"))
        return cache / "collections" / digest / name

    def pull(self, name: str, files: dict[str, dict]) -> Path:
        """Bring the local copy of `name/` up to date for `files` ({relative name: {size, mtime_ns}} as
        recorded when they were written); returns the directory. A file is fetched when its local copy is
        missing or differs in size or mtime; the recorded mtime is set on it, so the checksum check that
        follows stays cheap."""
        directory = self.local_dir(name)
        if not self.remote:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        for rel, expected in files.items():
            local = directory / rel
            try:
                st = local.stat()
                if st.st_size == expected["size"] and st.st_mtime_ns == expected["mtime_ns"]:
                    continue
            except FileNotFoundError:
                pass
            data = self.read_bytes(f"{name}/{rel}")
            if data is None:
                continue  # the checksum check reports it missing, with the command that rebuilds it
            write_bytes_atomic(local, data)
            os.utime(local, ns=(expected["mtime_ns"], expected["mtime_ns"]))
        return directory

    def push(self, name: str, files: list[str]) -> None:
        """Publish local copies of `files` (relative to `name/`) to the object store, data before
        metadata: list index.json last so a reader never sees metadata for files not yet there."""
        if not self.remote:
            return
        directory = self.local_dir(name)
        for rel in sorted(files, key=lambda f: f.endswith(".json")):
            self.write_bytes(f"{name}/{rel}", (directory / rel).read_bytes())

    # ---- one writer at a time -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, purpose: str = "a write", wait: bool = True, name: str = ".lock") -> Iterator[None]:
        """Exclusive writer lock; `purpose` ("ingest", "index", ...) tells a waiting writer what it waits
        for. Local: flock, which the OS releases if the process dies; a second writer waits for the first
        (saying once, on stderr, which process it waits for), or with `wait=False` is refused at once.
        Object stores have no locks: a lease object (owner + expiry) renewed by a thread while held; a
        second writer is refused, and a writer that died blocks others until its lease expires
        (LEASE_SECONDS), and the message says so."""
        if not self.remote:
            self._root.mkdir(parents=True, exist_ok=True)
            # Opened without truncating: the file names the holder, which a waiting writer reads.
            with open(os.open(self._root / name, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    holder = _holder(fh.read())
                    if not wait:
                        raise IndexerError(f"{self.uri} is being written by {holder}; wait for it") from exc
                    log.warning("%s is being written by %s; waiting for it to finish (Ctrl-C to stop)",
                                self.uri, holder)
                    fcntl.flock(fh, fcntl.LOCK_EX)
                fh.seek(0)
                fh.truncate()
                fh.write(json.dumps({"pid": os.getpid(), "purpose": purpose, "since": time.time()}))
                fh.flush()
                try:
                    yield
                finally:
                    fh.truncate(0)  # still held: the next writer finds no stale holder
            return
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]} ({purpose})"
        held = self._read_lease(name)
        if held is not None and held["owner"] != owner and held["expires"] > time.time():
            until = time.strftime("%H:%M:%S", time.localtime(held["expires"]))
            raise IndexerError(f"{self.uri} is being written by {held['owner']}; wait for it (if that process "
                               f"died, its lease expires at {until}, or delete {self.uri}/{name})")
        self._write_lease(name, owner)
        time.sleep(0.05)  # a racing writer's lease lands in this window; the last one written wins
        if (self._read_lease(name) or {}).get("owner") != owner:
            raise IndexerError(f"{self.uri} is being written by another process; wait for it")
        stop = threading.Event()
        renew = threading.Thread(target=self._renew_lease, args=(name, owner, stop), daemon=True)
        renew.start()
        try:
            yield
        finally:
            stop.set()
            renew.join()
            if (self._read_lease(name) or {}).get("owner") == owner:
                self.delete(name)

    def _read_lease(self, name: str) -> dict | None:
        data = self.read_bytes(name)
        try:
            return json.loads(data) if data else None
        except json.JSONDecodeError:
            return None

    def _write_lease(self, name: str, owner: str) -> None:
        self.write_bytes(name, json.dumps({"owner": owner, "expires": time.time() + LEASE_SECONDS}).encode())

    def _renew_lease(self, name: str, owner: str, stop: threading.Event) -> None:
        while not stop.wait(LEASE_SECONDS / 4):
            self._write_lease(name, owner)


# Lance's storage option names -> pyarrow S3FileSystem arguments (the rest are Lance's alone).
_S3_ARGS = {"aws_region": "region", "region": "region", "aws_endpoint": "endpoint_override",
            "endpoint": "endpoint_override", "aws_access_key_id": "access_key", "access_key_id": "access_key",
            "aws_secret_access_key": "secret_key", "secret_access_key": "secret_key",
            "aws_session_token": "session_token", "session_token": "session_token"}


def _remote_filesystem(uri: str, options: dict[str, str]) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    try:
        if uri.startswith("s3://"):
            kwargs: dict[str, Any] = {_S3_ARGS[k]: v for k, v in options.items() if k in _S3_ARGS}
            endpoint = kwargs.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") \
                or os.environ.get("AWS_ENDPOINT_URL")
            allow_http = str(options.get("allow_http", options.get("aws_allow_http",
                             os.environ.get("AWS_ALLOW_HTTP", "")))).lower() in ("1", "true", "yes")
            if endpoint:
                scheme, _, host = endpoint.partition("://")
                kwargs["endpoint_override"] = host or scheme
                kwargs["scheme"] = scheme if host else ("http" if allow_http else "https")
            if "region" not in kwargs and os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION")):
                kwargs["region"] = os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION"))
            return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    except (OSError, ValueError) as exc:
        raise IndexerError(f"cannot reach {uri}: {exc}") from exc
