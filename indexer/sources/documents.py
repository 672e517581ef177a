"""Documents people keep knowledge in (plain text, Markdown, HTML, PDF) -> text plus where it came from.

Each reader returns the extracted text and a Layout: the character offsets where pages and headings
start in that text, so a passage cut from it can say which page and section it belongs to. A file
that yields no usable text (encrypted or scanned PDF, binary data) gives a reason string instead,
which the caller records as a SkippedInput.
"""

from __future__ import annotations

import bisect
import io
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from html.parser import HTMLParser
from pathlib import Path

DOCUMENT_EXTENSIONS = frozenset({".txt", ".md", ".markdown", ".html", ".htm", ".pdf"})


@dataclass(frozen=True)
class Layout:
    """Where pages (1, 2, ...) and headings start, as character offsets into the extracted text."""

    pages: tuple[int, ...] = ()
    headings: tuple[tuple[int, str], ...] = field(default=())

    def page_at(self, offset: int) -> int | None:
        return bisect.bisect_right(self.pages, offset) if self.pages else None

    @cached_property
    def _heading_offsets(self) -> list[int]:
        return [h[0] for h in self.headings]

    def heading_at(self, offset: int) -> str | None:
        """The nearest heading at or before `offset`."""
        i = bisect.bisect_right(self._heading_offsets, offset)
        return self.headings[i - 1][1] if i else None


Document = tuple[str, Layout]


def read_document(path: Path, raw: bytes) -> Document | str:
    """The text and layout of a document file, or why it cannot be used."""
    ext = path.suffix.lower()
    if ext == ".pdf":
        return pdf_document(raw)
    try:
        text = decode_text(raw, html=ext in (".html", ".htm"))
    except NotText as exc:
        return str(exc)
    if ext in (".html", ".htm"):
        text, layout = html_document(text)
    elif ext in (".md", ".markdown"):
        layout = Layout(headings=markdown_headings(text))
    else:
        layout = Layout()
    return (text, layout) if text.strip() else "empty text"


class NotText(ValueError):
    """The bytes are not usable text; the message says why."""


def decode_text(raw: bytes, html: bool = False) -> str:
    """UTF-8 text (a BOM is dropped); HTML may declare another charset. Raises NotText."""
    encoding = "utf-8-sig"
    if html:
        declared = re.search(rb"<meta[^>]+charset=[\"']?([A-Za-z0-9_-]+)", raw[:4096], re.IGNORECASE)
        if declared:
            encoding = declared.group(1).decode("ascii")
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise NotText(f"unknown charset {encoding!r}") from None
    except UnicodeDecodeError as exc:
        raise NotText(f"not valid {encoding.removesuffix('-sig').upper()} text (byte {exc.start})") from None
    if "\x00" in text:
        raise NotText("binary data, not text")
    if not text.strip():
        raise NotText("empty text")
    return text


# ---- Markdown -------------------------------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def markdown_headings(text: str) -> tuple[tuple[int, str], ...]:
    """ATX (`# Title`) and setext (`Title` over `===`) headings, outside fenced code blocks."""
    out: list[tuple[int, str]] = []
    offset, fenced, prev = 0, False, None  # prev: (offset, text) of the previous non-blank line
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        if _FENCE.match(body):
            fenced = not fenced
        elif not fenced:
            atx = _ATX.match(body)
            if atx:
                out.append((offset, atx.group(2).strip()))
            elif _SETEXT.match(body) and prev is not None:
                out.append(prev)
            prev = (offset, body.strip()) if body.strip() and not atx else None
        offset += len(line)
    return tuple(out)


# ---- HTML -----------------------------------------------------------------------------------------------

# Not visible, or page furniture repeated on every page: never part of a passage.
_SKIP = frozenset({"script", "style", "noscript", "template", "head", "nav", "header", "footer", "aside", "svg",
                   "iframe", "object", "canvas", "select", "button"})
_BLOCK = frozenset({"p", "div", "section", "article", "main", "blockquote", "pre", "table", "ul", "ol", "dl",
                    "figure", "figcaption", "form", "fieldset", "address", "details", "summary", "hr",
                    "h1", "h2", "h3", "h4", "h5", "h6"})
_LINE = frozenset({"br", "li", "tr", "dt", "dd", "caption"})
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                   "wbr"})


class _VisibleText(HTMLParser):
    """Visible text with paragraph breaks between blocks; headings recorded where they start."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.length = 0
        self.headings: list[tuple[int, str]] = []
        self.title = ""
        self._skip: list[str] = []  # open elements whose content is dropped
        self._in_heading = False
        self._heading: int | None = None  # where the open heading's text starts
        self._break = ""  # pending separator, written before the next text
        self._pre = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs) -> None:
        hidden = any(k == "hidden" or (k == "aria-hidden" and v == "true") for k, v in attrs)
        if tag == "title":
            self._in_title = True
        if tag in _VOID:
            if tag in ("br", "hr"):
                self._separate("\n" if tag == "br" else "\n\n")
            return
        if self._skip or tag in _SKIP or hidden:
            self._skip.append(tag)
            return
        if tag == "pre":
            self._pre += 1
        if tag in _BLOCK:
            self._separate("\n\n")
        elif tag in _LINE:
            self._separate("\n")
        if tag in _HEADINGS:
            self._in_heading, self._heading = True, None  # its offset is set at its first character

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if self._skip:
            if tag in self._skip:  # close up to the matching element (tolerates unclosed children)
                while self._skip and self._skip.pop() != tag:
                    pass
            return
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in _HEADINGS and self._in_heading:
            if self._heading is not None:
                name = " ".join("".join(self.parts)[self._heading:].split())
                if name:
                    self.headings.append((self._heading, name))
            self._in_heading, self._heading = False, None
        if tag in _BLOCK:
            self._separate("\n\n")
        elif tag in _LINE:
            self._separate("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
            return
        if self._skip:
            return
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self._break or self.parts[-1].endswith((" ", "\n")):
                data = data.lstrip()
        if not data:
            return
        if self._break and self.parts:
            self._write(self._break)
        self._break = ""
        if self._in_heading and self._heading is None:
            self._heading = self.length
        self._write(data)

    def _separate(self, sep: str) -> None:
        if self.parts and len(sep) > len(self._break):
            self._break = sep

    def _write(self, s: str) -> None:
        self.parts.append(s)
        self.length += len(s)


def html_document(markup: str) -> Document:
    parser = _VisibleText()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts).rstrip()
    headings = parser.headings
    title = " ".join(parser.title.split())
    if title and (not headings or headings[0][0] > 0):
        headings = [(0, title), *headings]  # the page title names what comes before the first heading
    return text, Layout(headings=tuple(headings))


# ---- PDF ------------------------------------------------------------------------------------------------

def pdf_document(raw: bytes) -> Document | str:
    """Text per page through pypdf, pages separated by a blank line. Encrypted PDFs (unless the
    password is empty) and PDFs with no text layer (scans) are refused with a reason."""
    from ..errors import attempt_import

    pypdf = attempt_import("pypdf")
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns about every odd but readable object
    try:
        reader = pypdf.PdfReader(io.BytesIO(raw))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except Exception as exc:  # noqa: BLE001 - e.g. AES without the crypto package
                return f"encrypted PDF: cannot open it ({exc})"
            if not opened:
                return "encrypted PDF: it needs a password; decrypt it first (e.g. qpdf --decrypt)"
        parts, pages, length = [], [], 0
        for page in reader.pages:
            if parts:
                parts.append("\n\n")
                length += 2
            pages.append(length)
            text = (page.extract_text() or "").strip()
            parts.append(text)
            length += len(text)
    except Exception as exc:  # noqa: BLE001 - a damaged PDF must not stop the run
        return f"cannot read PDF: {exc}"
    text = "".join(parts)
    if not text.strip():
        return f"PDF has no text layer ({len(pages)} pages of images?): run OCR on it first"
    return text, Layout(pages=tuple(pages))
