"""Counts in messages a person reads: `counted(1, "input")` is "1 input", `counted(2, "input")` "2 inputs"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun, singular for exactly one (`plural` for nouns that do not just take an s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
