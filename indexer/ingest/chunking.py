"""Token-aware chunking: documents -> passages that fit the model, cut where the text breaks naturally.

Passages are measured in the model's own tokens (what it truncates on), never exceed its limit, and
end at the best break in the second half of the window: a paragraph end, else a sentence end, else
a line end, else a word end. Each passage is an exact slice `text[start:end]` of the document, so
its offsets lead back to the source.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from ..errors import IndexerError
from ..sources import Record, SkippedInput
from ..store import Collection

# Stored on every passage row; user fields with these names get the `user_` prefix.
CHUNK_FIELDS = ("doc_id", "chunk", "start", "end", "page", "heading")
_PARAGRAPH, _SENTENCE, _LINE, _WORD, _ANY = 4, 3, 2, 1, 0  # how good a break is; -1: inside a word
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


@dataclass(frozen=True)
class Span:
    start: int  # character offsets into the document's text
    end: int


class Chunker:
    """Split texts into passages of at most `tokens` tokens of `tokenizer`, consecutive passages
    sharing about `overlap` tokens.

    >>> chunker = Chunker(embedder.tokenizer, tokens=128, overlap=16)    # doctest: +SKIP
    >>> [(s.start, s.end) for s in chunker.spans(text)]                   # doctest: +SKIP
    [(0, 611), (548, 1190), ...]
    """

    def __init__(self, tokenizer: Any, tokens: int, overlap: int = 0):
        if tokens < 8:
            raise IndexerError(f"--chunk-tokens {tokens}: use at least 8 tokens per passage")
        if not 0 <= overlap <= tokens // 2:
            raise IndexerError(f"--chunk-overlap {overlap}: use 0 to {tokens // 2} (half of --chunk-tokens)")
        self.tokenizer, self.tokens, self.overlap = tokenizer, tokens, overlap

    def settings(self) -> dict[str, int]:
        """What the collection records, so a later ingest without flags chunks the same way."""
        return {"tokens": self.tokens, "overlap": self.overlap}

    def spans(self, text: str) -> list[Span]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        words = enc.word_ids()
        n = len(offsets)
        if n == 0:
            return []
        # A cut before token i is allowed only between words (splitting a word re-tokenises it differently).
        starts_word = [i == 0 or words[i] is None or words[i] != words[i - 1] for i in range(n)]
        kind = [_ANY] + [_cut_kind(text, offsets[i - 1][1], offsets[i][0]) if starts_word[i] else -1
                         for i in range(1, n)] + [_PARAGRAPH]
        cuts: list[tuple[int, int]] = []  # token ranges [first, cut)
        first = 0
        while first < n:
            last = first + self.tokens  # exclusive
            if last >= n:
                cut = n
            else:
                floor = first + max(1, self.tokens // 2)
                cut = max(range(floor, last + 1), key=lambda i: (kind[i], i))
                if kind[cut] < _WORD:  # no space in the second half: the last one before it, else
                    # the last word boundary, else (one word longer than the window) inside the word
                    cut = max(range(first + 1, last + 1), key=lambda i: (min(kind[i], _WORD), i))
            cuts.append((first, cut))
            if cut >= n:
                break
            # The overlap starts at a word that follows a space (not mid-word, not at a stray "."),
            # else at any word boundary, else the next passage starts where this one ends.
            back = range(max(cut - self.overlap, first + 1), cut)
            first = next((i for i in back if kind[i] >= _WORD), next((i for i in back if starts_word[i]), cut))
        return self._fit(text, offsets, cuts)

    def _fit(self, text: str, offsets: list[tuple[int, int]], cuts: list[tuple[int, int]]) -> list[Span]:
        """Spans of the token ranges, each re-tokenised on its own (in one batch) and trimmed if that
        comes out longer: a span cut inside a word, or a tokenizer whose words depend on context, can."""
        spans = [Span(offsets[first][0], offsets[cut - 1][1]) for first, cut in cuts]
        lengths = self._lengths([text[s.start:s.end] for s in spans])
        for i, ((first, cut), length) in enumerate(zip(cuts, lengths)):
            while length > self.tokens and cut - first > 1:
                cut -= 1
                spans[i] = Span(spans[i].start, offsets[cut - 1][1])
                length = self._lengths([text[spans[i].start:spans[i].end]])[0]
        return spans

    def _lengths(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    def split(self, record: Record) -> list[Record]:
        """A document record -> one record per passage: id `DOCID#N` (N from 0), with the passage's
        location in fields (doc_id, chunk, start, end, page, heading)."""
        text, layout = record.text, record.layout
        fields = {(f"user_{k}" if k in CHUNK_FIELDS else k): v for k, v in record.fields.items()}
        out = []
        for n, span in enumerate(self.spans(text)):
            where = {"doc_id": record.id, "chunk": n, "start": span.start, "end": span.end,
                     "page": layout.page_at(span.start) if layout else None,
                     "heading": layout.heading_at(span.start) if layout else None}
            out.append(Record(id=f"{record.id}#{n}", source=record.source, text=text[span.start:span.end],
                              label=record.label, fields={**fields, **where}))
        return out


def _cut_kind(text: str, prev_end: int, next_start: int) -> int:
    """How good a break the gap between two tokens is."""
    gap = text[prev_end:next_start]
    if not gap:
        return _ANY
    if gap.count("\n") >= 2:
        return _PARAGRAPH
    if _SENTENCE_END.search(text[max(0, prev_end - 4):prev_end]):
        return _SENTENCE
    return _LINE if "\n" in gap else _WORD


def make_chunker(embedder: Any, tokens: int | None, overlap: int | None,
                 recorded: dict[str, int] | None = None) -> Chunker | None:
    """The chunker for `--chunk-tokens/--chunk-overlap`, else for the settings the collection
    recorded; None (documents embedded whole) without either, or with `--chunk-tokens 0`."""
    if tokens is None and overlap is None and recorded:
        tokens, overlap = recorded["tokens"], recorded["overlap"]
    if not tokens:
        if overlap:
            raise IndexerError("--chunk-overlap needs --chunk-tokens")
        return None
    tokenizer = getattr(embedder, "tokenizer", None)
    if embedder.spec.modality != "text" or tokenizer is None:
        raise IndexerError(f"--chunk-tokens splits text for a text model; {embedder.spec.name} is a "
                           f"{embedder.spec.modality} model")
    limit = embedder.spec.max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if tokens > limit:
        raise IndexerError(f"--chunk-tokens {tokens}: {embedder.spec.name} reads at most {limit} tokens per "
                           f"passage ({embedder.spec.max_length} with its special tokens)")
    return Chunker(tokenizer, tokens, overlap or 0)


def stored_chunks(coll: Collection) -> dict[str, set[str]]:
    """doc_id -> ids of its passage rows already in the collection (to find the ones a shorter
    version of the document leaves behind)."""
    table = coll.table
    out: dict[str, set[str]] = {}
    if table is None or "doc_id" not in table.schema.names:
        return out
    for batch in coll.scan(["id", "doc_id"], where="doc_id IS NOT NULL", batch_size=65536):
        for rid, doc in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            out.setdefault(doc, set()).add(rid)
    return out


class Passages:
    """Turns each document record into its passage records, and collects the stored rows that a new
    version of a document leaves behind (a shorter document has fewer passages; a document stored
    whole and now chunked, or the other way round; one now unusable, e.g. emptied or encrypted):
    ingest deletes them, so none is orphaned and no stale passage is served."""

    def __init__(self, chunker: Chunker | None, stored: dict[str, set[str]], known: Container[str]):
        self.chunker, self.stored, self.known = chunker, stored, known
        self.orphans: set[str] = set()
        self.seen: set[str] = set()  # document ids of this run

    def expand(self, record: Record | SkippedInput) -> list[Record | SkippedInput]:
        if isinstance(record, SkippedInput):
            if record.id is not None and record.id not in self.seen:
                self.seen.add(record.id)
                self.orphans |= self.stored.pop(record.id, set())
            return [record]
        if record.text is None or record.vector is not None:
            return [record]
        # Two documents with one id (`a/README.md`, `b/README.md` given as `a/ b/`) would mix their
        # passages, and later runs would delete each other's: the first one is kept.
        if record.id in self.seen:
            return [SkippedInput(record.source, f"duplicate id {record.id!r} in this run (first occurrence kept)",
                                 record.id)]
        self.seen.add(record.id)
        old = self.stored.pop(record.id, set())
        if self.chunker is None:
            self.orphans |= old
            return [record]
        passages = self.chunker.split(record)
        if not passages:
            self.orphans |= old
            return [SkippedInput(record.source, "no text to embed", record.id)]
        self.orphans |= old - {p.id for p in passages}
        if record.id in self.known:
            self.orphans.add(record.id)
        return passages
