"""Errors a user can fix: the CLI prints their message (no traceback) and exits 1."""

from __future__ import annotations


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
