"""Errors a user can fix: the CLI prints their message (no traceback) and exits 1. A write the storage refuses
(disk full, read-only) is one too."""

from __future__ import annotations

import errno
import os
import re


class IndexerError(Exception):
    """A failure caused by input, flags or environment, with a message that says what to do."""


def attempt_import(module: str, extra: str | None = None):
    """Import an optional dependency, or raise an IndexerError naming what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        from .version import DISTRIBUTION

        # The extra is named by the distribution: `pip install 'indexer[...]'` fetches an unrelated project.
        hint = (f"install the indexer[{extra}] extra: pip install '{DISTRIBUTION}[{extra}]' "
                f"(in a checkout: pip install -e '.[{extra}]')") if extra else f"pip install {module}"
        raise IndexerError(f"{module} is needed for this feature; {hint}") from exc


# The storage refusing a write. Lance and FAISS report these as RuntimeError text, not OSError.errno.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system"}
_ERRNO_IN_TEXT = re.compile(r"(?:os error|errno) (\d+)", re.IGNORECASE)


def storage_error(exc: BaseException) -> IndexerError | None:
    """The one-line error for a write the storage refused (disk full, quota, read-only), else None."""
    code = getattr(exc, "errno", None)
    if code not in _STORAGE_ERRNOS:
        text = str(exc)
        found = [int(m) for m in _ERRNO_IN_TEXT.findall(text)]
        found += [c for c in _STORAGE_ERRNOS if os.strerror(c) in text]
        code = next((c for c in found if c in _STORAGE_ERRNOS), None)
    if code is None:
        return None
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if code == errno.EROFS:
        return IndexerError(f"cannot write{where}: {_STORAGE_ERRNOS[code]}; nothing was changed (commands that only "
                            "read, such as search and info, still work)")
    return IndexerError(f"cannot write{where}: {_STORAGE_ERRNOS[code]}; what was committed is kept: free some space "
                        "and run the same command again to finish")
