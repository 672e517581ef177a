"""Sources: folders, single files, JSONL/CSV/Parquet tables and JSONL on stdin, read lazily.

Validation happens here: a bad input becomes a SkippedInput with a reason, never an exception that
stops the run. Only unusable arguments (a missing path, an unsupported file type) raise.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexerError
from .documents import DOCUMENT_EXTENSIONS, read_document
from .images import IMAGE_EXTENSIONS
from .records import RESERVED, Record, SkippedInput, content_hash

TEXT_EXTENSIONS = DOCUMENT_EXTENSIONS  # .txt .md .markdown .html .htm .pdf
TABLE_EXTENSIONS = frozenset({".jsonl", ".ndjson", ".csv", ".tsv", ".parquet"})

__all__ = ["Record", "SkippedInput", "SourceOptions", "Unit", "check_sources", "count_inputs", "iter_records",
           "iter_unit", "split_sources",
           "content_hash", "IMAGE_EXTENSIONS", "TEXT_EXTENSIONS", "expand_file_lists", "guess_modality"]


@dataclass(frozen=True)
class SourceOptions:
    modality: str  # "text", "image" or "vector": what a folder contributes, which field a table row gives
    text_field: str = "text"
    image_field: str = "image"
    id_field: str | None = None  # default: a row's "id" if present, else derived from the source
    label_field: str | None = None  # default: a row's "label" if present
    vector_field: str | None = None  # precomputed embeddings (modality "vector")


def _payload_extensions(modality: str) -> frozenset[str]:
    return {"image": IMAGE_EXTENSIONS, "text": TEXT_EXTENSIONS}.get(modality, frozenset({".npy"}))


def expand_file_lists(paths: list[str]) -> list[str]:
    """`@LIST` stands for the sources LIST names, one per line (relative to LIST's folder; blank lines
    and `#` comments ignored): a file list for document sets that are not one folder."""
    out = []
    for p in paths:
        if not p.startswith("@"):
            out.append(p)
            continue
        listing = Path(p[1:])
        try:
            lines = listing.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise IndexerError(f"cannot read file list {listing}: {exc.strerror}") from exc
        out += [str(listing.parent / line.strip()) for line in lines if line.strip() and not line.startswith("#")]
    return out


def check_sources(paths: list[str], modality: str) -> None:
    """Fail before any work if an argument cannot be a source."""
    if not paths:
        raise IndexerError("no SOURCE given: pass folders, files, or - for JSONL on stdin")
    for p in paths:
        if p == "-":
            continue
        path = Path(p)
        if not path.exists():
            raise IndexerError(f"source not found: {p}")
        if modality == "vector" and path.is_dir():
            raise IndexerError(f"{p}: precomputed vectors come from tables (.parquet, .jsonl, .csv) or .npy files")
        if path.is_file():
            ext = path.suffix.lower()
            if ext not in TABLE_EXTENSIONS | _payload_extensions(modality):
                kinds = "images" if modality == "image" else f"documents ({', '.join(sorted(TEXT_EXTENSIONS))})"
                raise IndexerError(f"unsupported source {p}: expected a folder, {kinds}, "
                                   f"or a table ({', '.join(sorted(TABLE_EXTENSIONS))})")


def guess_modality(paths: list[str], text_field: str = "text", image_field: str = "image") -> str:
    """image if the sources hold image files (or tables whose first row names an image and no text), else
    text (used to pick a default model, and the tower of a joint text-image model)."""
    for p in paths:
        path = Path(p)
        if path.is_file():
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                return "image"
            if path.suffix.lower() in TABLE_EXTENSIONS:
                first = next((row for _, row in _open_table(path) if isinstance(row, dict)), {})
                if first.get(image_field) is not None and first.get(text_field) is None:
                    return "image"
            continue
        if path.is_dir():
            for n, file in enumerate(_walk(path, errors=[])):
                if file.suffix.lower() in IMAGE_EXTENSIONS:
                    return "image"
                if file.suffix.lower() in TEXT_EXTENSIONS or n > 1000:
                    break
    return "text"


def iter_records(paths: list[str], opts: SourceOptions, look_ahead: bool = False) -> Iterator[Record | SkippedInput]:
    """The inputs of `paths` in order. `look_ahead`: a first look (at the first vector, say) that the
    next read starts over from: stdin's lines it reads are kept for that read."""
    for p in paths:
        if p == "-":
            yield from _table_rows(_jsonl_rows(_STDIN.lines(look_ahead), "stdin"), "stdin", Path.cwd(), opts)
            continue
        path = Path(p)
        if path.is_dir():
            yield from _folder(path, opts)
        elif path.suffix.lower() in TABLE_EXTENSIONS:
            yield from _table_rows(_open_table(path), str(path.resolve()), path.parent, opts)
        elif path.suffix.lower() == ".npy":
            yield from _npy_rows(path)
        else:
            yield _file_record(path, path.name, opts)


class _StdinLines:
    """Standard input cannot rewind: the lines a look-ahead read are kept and read again first."""

    def __init__(self) -> None:
        self.stream, self.kept = None, deque()

    def lines(self, keep: bool) -> Iterator[str]:
        if self.stream is not sys.stdin:  # another stdin (a test's): nothing kept is from it
            self.stream, self.kept = sys.stdin, deque()
        if keep:
            yield from list(self.kept)
        else:
            while self.kept:
                yield self.kept.popleft()
        for line in sys.stdin:
            if keep:
                self.kept.append(line)
            yield line


_STDIN = _StdinLines()


def count_inputs(paths: list[str], opts: SourceOptions) -> int | None:
    """How many inputs the sources hold, when that is cheap to know (for the progress bar's ETA)."""
    total = 0
    exts = _payload_extensions(opts.modality)
    for p in paths:
        path = Path(p)
        if p == "-":
            return None
        if path.is_dir():
            total += sum(1 for f in _walk(path, errors=[]) if f.suffix.lower() in exts)
        elif path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        elif path.suffix.lower() == ".npy":
            total += len(np.load(path, mmap_mode="r"))
        elif path.suffix.lower() in TABLE_EXTENSIONS:
            with open(path, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
            if path.suffix.lower() in (".csv", ".tsv"):
                total -= 1  # header
        else:
            total += 1
    return total


# ---- folders and single files ----------------------------------------------------------------------

def _walk(root: Path, errors: list[SkippedInput]) -> Iterator[Path]:
    """Files under root in a stable (sorted) order; unreadable folders are reported, not fatal."""
    def onerror(exc: OSError) -> None:
        errors.append(SkippedInput(str(exc.filename), f"cannot read folder: {exc.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _folder(root: Path, opts: SourceOptions) -> Iterator[Record | SkippedInput]:
    exts = _payload_extensions(opts.modality)
    errors: list[SkippedInput] = []
    for file in _walk(root, errors):
        yield from errors
        errors.clear()
        if file.suffix.lower() in exts:
            yield _file_record(file, file.relative_to(root).as_posix(), opts)
    yield from errors


def _resolved(path: Path) -> str | None:
    """The absolute path with symlinks followed, or None for a symlink loop (which pathlib raises as a
    RuntimeError on Python 3.11, as OSError elsewhere): one such file must not end the run."""
    try:
        return str(path.resolve())
    except (RuntimeError, OSError):
        return None


def _file_record(path: Path, rid: str, opts: SourceOptions) -> Record | SkippedInput:
    source = _resolved(path)
    if source is None:
        return SkippedInput(str(path.absolute()), "cannot read file: symlink loop", rid)
    if opts.modality == "image":
        return Record(id=rid, source=source, path=source)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return SkippedInput(source, f"cannot read file: {exc.strerror}", rid)
    doc = read_document(path, raw)
    if isinstance(doc, str):
        return SkippedInput(source, doc, rid)
    text, layout = doc
    return Record(id=rid, source=source, text=text, layout=layout)


def _npy_rows(path: Path) -> Iterator[Record | SkippedInput]:
    """An (n, d) array of precomputed embeddings; row i gets the id `<file name>:<i + 1>`."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 2:
        raise IndexerError(f"{path}: expected a 2-D array of vectors, got shape {arr.shape}")
    source = str(path.resolve())
    for i in range(len(arr)):
        yield _vector_record(Record(id=f"{path.name}:{i + 1}", source=f"{source}:{i + 1}"), arr[i])


def _vector_record(record: Record, value: Any) -> Record | SkippedInput:
    try:
        vec = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        return SkippedInput(record.source, "vector field is not a list of numbers", record.id)
    if vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
        return SkippedInput(record.source, "vector must be a non-empty 1-D list of finite numbers", record.id)
    record.vector = vec
    return record


# ---- tables -----------------------------------------------------------------------------------------

def _jsonl_rows(lines, name: str) -> Iterator[tuple[int, dict | SkippedInput]]:
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, SkippedInput(f"{name}:{n}", f"invalid JSON: {exc.msg}")
            continue
        if not isinstance(row, dict):
            yield n, SkippedInput(f"{name}:{n}", "a JSONL line must be an object")
            continue
        if "\\u" in line and _lone_surrogate(row):
            yield n, SkippedInput(f"{name}:{n}", "invalid unicode: a \\ud800-\\udfff escape without its pair "
                                  "(UTF-8 cannot store it)")
            continue
        yield n, row


def _lone_surrogate(row: dict) -> bool:
    """JSON can escape half a UTF-16 pair (\\ud800); Python keeps it, but Arrow and Lance cannot store it."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _open_table(path: Path) -> Iterator[tuple[int, dict | SkippedInput]]:
    ext = path.suffix.lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        if ext in (".jsonl", ".ndjson"):
            yield from _jsonl_rows(fh, path.name)
        else:
            reader = csv.DictReader(fh, delimiter="\t" if ext == ".tsv" else ",")
            for n, row in enumerate(reader, start=1):
                yield n, row


def _table_rows(rows: Iterator[tuple[int, dict | SkippedInput]], source: str, base: Path,
                opts: SourceOptions) -> Iterator[Record | SkippedInput]:
    """Rows become records; without an id field a row's id is `<file name>:<row number>`."""
    name = Path(source).name
    for n, row in rows:
        if isinstance(row, SkippedInput):
            yield row
            continue
        yield _row_record(row, f"{source}:{n}", f"{name}:{n}", base, opts)


def _field_name(key: Any) -> str:
    """A user field's column name: `user_` before a name the collection owns; `.` (Lance reads it as a
    struct path), NUL (cut there) and backticks (its quoting), and an empty name, which Lance cannot
    store as a column, become `_`."""
    name = re.sub(r"[.\x00`]", "_", str(key)) or "_"
    return f"user_{name}" if name in RESERVED else name


def _row_record(row: dict[str, Any], where: str, default_id: str, base: Path,
                opts: SourceOptions) -> Record | SkippedInput:
    id_key = opts.id_field or ("id" if "id" in row else None)
    if id_key is not None:
        if row.get(id_key) in (None, ""):
            return SkippedInput(where, f"missing id field {id_key!r}")
        rid = str(row[id_key])
    else:
        rid = default_id
    label_key = opts.label_field or "label"
    label = row.get(label_key)
    label = None if label in (None, "") else str(label)
    payload_key = {"image": opts.image_field, "text": opts.text_field}.get(opts.modality, opts.vector_field)
    value = row.get(payload_key)
    used = {id_key, label_key, payload_key}
    if opts.modality == "vector":
        used.add(opts.text_field)
    fields = {_field_name(k): v for k, v in row.items() if k not in used}
    record = Record(id=rid, source=where, label=label, fields=fields)
    if opts.modality == "vector":
        if value is None:
            return SkippedInput(where, f"missing vector field {payload_key!r}", rid)
        text = row.get(opts.text_field)
        record.text = text if isinstance(text, str) else None  # kept alongside, for reading results
        return _vector_record(record, value)
    if opts.modality == "text":
        if value is None:
            return SkippedInput(where, f"missing text field {payload_key!r} (set --text-field)", rid)
        if not isinstance(value, str) or not value.strip():
            return SkippedInput(where, f"empty or non-text value in field {payload_key!r}", rid)
        record.text = value
    elif isinstance(value, (bytes, bytearray)):
        record.data = bytes(value)
    elif isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        record.data = bytes(value["bytes"])  # the Hugging Face datasets image struct
    elif isinstance(value, str) and value:
        record.path = _resolved(base / value)
        if record.path is None:
            return SkippedInput(where, f"cannot read image {value!r}: symlink loop", rid)
    else:
        return SkippedInput(where, f"missing image field {payload_key!r} (a path or bytes; set --image-field)", rid)
    return record


# ---- units: the sources split into pieces that workers read independently ---------------------------

@dataclass(frozen=True)
class Unit:
    """A piece of the sources one worker reads: some files of a folder (ids relative to `root`), or one
    file. Reading the units in order yields exactly what `iter_records` yields."""

    path: str  # the folder root, or the file
    files: tuple[str, ...] = ()  # for a folder: its files, relative to the root, in walk order


def split_sources(paths: list[str], opts: SourceOptions,
                  files_per_unit: int = 256) -> tuple[list[Unit], list[SkippedInput]]:
    """The units of `paths` in source order, plus unreadable folders (reported, as `iter_records` does).
    Lists folders up front, which stdin cannot do."""
    if "-" in paths:
        raise IndexerError("stdin (-) can be read by one process only: save it to a .jsonl file for a cluster")
    units: list[Unit] = []
    errors: list[SkippedInput] = []
    exts = _payload_extensions(opts.modality)
    for p in paths:
        # Absolute: a worker runs in another directory (or on another machine that mounts the same path).
        # Ids do not change: they are relative to a folder, or a file's name.
        path = Path(p).absolute()
        if not path.is_dir():
            units.append(Unit(str(path)))
            continue
        files = [f.relative_to(path).as_posix() for f in _walk(path, errors) if f.suffix.lower() in exts]
        units += [Unit(str(path), tuple(files[i : i + files_per_unit])) for i in range(0, len(files), files_per_unit)]
    return units, errors


def iter_unit(unit: Unit, opts: SourceOptions) -> Iterator[Record | SkippedInput]:
    if not unit.files:
        yield from iter_records([unit.path], opts)
        return
    root = Path(unit.path)
    for rel in unit.files:
        yield _file_record(root / rel, rel, opts)
