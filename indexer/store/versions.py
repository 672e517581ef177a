"""The Lance table's versions: what to say when the table is damaged, listing the versions that can
still be read, and restoring one of them as a new version (`indexer restore`).

Every commit writes a new manifest under `lance/items.lance/_versions/`; older versions stay readable
until compacted away, so a damaged latest manifest or a data file only the newest versions use costs
the user the last few commits, not the collection.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import IndexerError
from .location import Location

VERSIONS_DIR = "lance/items.lance/_versions"
DAMAGED_DIR = "damaged"  # unreadable manifests are moved here by a restore, kept for inspection
_U64_MAX = 2**64 - 1


def _shown(loc: Location) -> str:
    """The collection as the user named it (as Collection.path shows it)."""
    return loc.uri if loc.remote else str(loc.local_path)


def recovery_hint(loc: Location) -> str:
    return (f"list the versions that can still be read with `indexer restore {_shown(loc)} --list`, then restore "
            f"one with `indexer restore {_shown(loc)} --version N` (or re-ingest into a new collection)")


def damaged_table(loc: Location, exc: Exception, file: str | None = None) -> IndexerError:
    """The user error for a Lance table that cannot be read: which file, and the command that recovers."""
    reason = re.split(r", /\S+\.rs:\d+", str(exc))[0].replace("External error: ", "").strip()
    where = f"{file} is damaged" if file else "its Lance table is damaged"
    return IndexerError(f"{_shown(loc)}: {where} ({reason}); {recovery_hint(loc)}")


def is_lance_damage(exc: Exception) -> bool:
    """Lance reports unreadable files as IO or corrupt-file errors (in ValueError, OSError or RuntimeError)."""
    text = str(exc)
    return "LanceError(IO)" in text or "corrupt file" in text.lower() or "LanceError(Corrupt" in text


def _manifest_versions(loc: Location) -> dict[int, str]:
    """version -> manifest file name, from the names in `_versions/` (both of Lance's naming schemes:
    `N.manifest`, and `u64::MAX - N` zero-padded so the newest sorts first)."""
    if loc.remote:
        names = [name.rsplit("/", 1)[-1] for name, _ in loc._remote_files(VERSIONS_DIR)]
    else:
        folder = loc.local_path / VERSIONS_DIR
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    out = {}
    for name in names:
        stem = name.removesuffix(".manifest")
        if name.endswith(".manifest") and stem.isdigit():
            n = int(stem)
            out[_U64_MAX - n if n > 2**63 else n] = name
    return out


def latest_manifest(loc: Location) -> str | None:
    """The newest manifest's path inside the collection (what a failed open could not read)."""
    versions = _manifest_versions(loc)
    return f"{VERSIONS_DIR}/{versions[max(versions)]}" if versions else None


def _open_version(loc: Location, version: int):
    import lance

    return lance.dataset(loc.lance_uri() + "/items.lance", version=version, storage_options=loc.storage_options or None)


def list_versions(loc: Location) -> list[dict[str, Any]]:
    """Every version the table has a manifest for, newest first: {"version", "file", "readable", "rows",
    "error"}. Reading a manifest is cheap; data files are not read (a damaged data file shows
    when a version is used)."""
    out = []
    for version, name in sorted(_manifest_versions(loc).items(), reverse=True):
        entry: dict[str, Any] = {"version": version, "file": f"{VERSIONS_DIR}/{name}", "readable": True,
                                 "rows": None, "error": None}
        try:
            entry["rows"] = _open_version(loc, version).count_rows()
        except Exception as exc:  # noqa: BLE001 - any failure to read a manifest means the same here
            entry.update(readable=False, error=re.split(r", /\S+\.rs:\d+", str(exc))[0])
        out.append(entry)
    return out


def restore_version(loc: Location, version: int) -> list[str]:
    """Make `version`'s rows the table's newest version (a new commit: nothing is rewritten or lost).
    Unreadable manifests newer than it are moved to `damaged/` first (returned): Lance cannot commit on
    top of a manifest it cannot read. The FAISS index is marked stale, so the next search catches it up.
    Collection.restore calls this and reopens the table after."""
    versions = _manifest_versions(loc)
    if version not in versions:
        known = ", ".join(str(v) for v in sorted(versions)) or "none"
        raise IndexerError(f"{_shown(loc)} has no version {version} (versions: {known}; see `indexer restore "
                           f"{_shown(loc)} --list`)")
    try:
        target = _open_version(loc, version)
    except Exception as exc:  # noqa: BLE001
        raise IndexerError(f"version {version} of {_shown(loc)} cannot be read either: choose another "
                           f"(`indexer restore {_shown(loc)} --list`)") from exc
    moved = []
    for newer in sorted((v for v in versions if v > version), reverse=True):
        try:
            _open_version(loc, newer)
            break  # the newest readable manifest: Lance can commit on top of it
        except Exception:  # noqa: BLE001
            moved.append(_quarantine(loc, versions[newer]))
    target.restore()
    _mark_index_stale(loc)
    return moved


def _quarantine(loc: Location, name: str) -> str:
    if loc.remote:
        raise IndexerError(f"{loc}/{VERSIONS_DIR}/{name} is unreadable: Lance cannot write a new "
                           "version after it; move it out of _versions/ by hand, then run restore again")
    src = loc.local_path / VERSIONS_DIR / name
    dest = loc.local_path / DAMAGED_DIR / name
    dest.parent.mkdir(exist_ok=True)
    src.replace(dest)
    hint = src.parent / "latest_version_hint.json"
    hint.unlink(missing_ok=True)  # it may point at the version just moved; Lance lists _versions without it
    return f"{DAMAGED_DIR}/{name}"


def _mark_index_stale(loc: Location) -> None:
    """Version numbers can repeat after a restore: forget which one the FAISS index reflects, so it is
    compared row by row (record hashes) with the table before its next use."""
    data = loc.read_bytes("index/index.json")
    if data is None:
        return
    meta = json.loads(data)
    meta["lance_version"] = None
    loc.write_bytes("index/index.json", (json.dumps(meta, indent=2) + "\n").encode())
