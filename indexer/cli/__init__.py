"""Command line: each command parses, calls one library function, prints. No logic of its own.

Commands live in one module per role (collection, learn, dedup, serve, ...) and register themselves on the
shared group when imported; every module in this package is imported here.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import cli

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "__main__"):
        importlib.import_module(f"{__name__}.{_module.name}")


def main() -> None:
    cli(prog_name="indexer")


__all__ = ["cli", "main"]
