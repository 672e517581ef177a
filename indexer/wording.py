"""Wording of messages a person reads: counts (`counted(2, "input")` is "2 inputs") and one-line errors."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun, singular for exactly one (`plural` for nouns that do not just take an s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def one_line(message: str) -> str:
    """A message as one line: ids, paths and filters quoted in it may hold line breaks or control characters."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message.strip())
