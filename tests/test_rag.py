"""Retrieval for RAG: documents (Markdown, HTML, PDF), token-aware passages, full-text and hybrid search.

Real documents are written here (PDFs with fpdf2, encrypted with pypdf), chunked with the real MiniLM
tokenizer and searched through real LanceDB full-text and FAISS indexes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from indexer import IndexerError, ingest, search
from indexer.cli import cli
from indexer.ingest.chunking import Chunker, make_chunker
from indexer.sources.documents import markdown_headings, read_document
from indexer.store import Collection

SENTENCES = [
    "The river floods the valley every spring.", "Farmers plant rice on the terraces.",
    "A new bridge opened downtown last year.", "The museum shows paintings from the old city.",
    "Trains leave the central station every ten minutes.", "The bakery sells bread before sunrise.",
    "Students gather in the library to study.", "The harbour is busy with fishing boats.",
]

HTML = """<!doctype html><html><head><title>Bridges</title><style>p { color: red }</style>
<script>var tracking = "scriptjunk";</script></head><body>
<header><a href="/">Home</a> headerjunk</header><nav><ul><li>navjunk one</li><li>navjunk two</li></ul></nav>
<main><h1>Suspension <em>bridges</em></h1><p>Cables carry the deck of a suspension bridge &amp; its
load to the towers.</p><div hidden>hiddenjunk</div><h2><a href="#arch">Arch bridges</a></h2>
<p>An arch bridge pushes its load outwards into the abutments.</p></main>
<footer>footerjunk copyright</footer><script>alert("scriptjunk")</script></body></html>"""


def _pdf(path: Path, pages: list[str]) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    pdf.output(str(path))
    return path


def _scanned_pdf(path: Path) -> Path:
    """A PDF whose page is only a picture of text: no text layer."""
    from fpdf import FPDF
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (400, 120), "white")
    ImageDraw.Draw(img).text((10, 50), "scanned page: no text layer", fill="black")
    pdf = FPDF()
    pdf.add_page()
    pdf.image(img, x=10, y=10, w=180)
    pdf.output(str(path))
    return path


def _encrypted_pdf(path: Path, source: Path) -> Path:
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=str(source))
    writer.encrypt(user_password="secret", owner_password="owner")
    writer.write(str(path))
    return path


def _markdown(paragraphs: int) -> str:
    body = [f"{SENTENCES[i % 8]} {SENTENCES[(i + 3) % 8]} {SENTENCES[(i + 5) % 8]}" for i in range(paragraphs)]
    half = paragraphs // 2
    return ("# City guide\n\n" + "\n\n".join(body[:half]) + "\n\n## Getting around\n\n"
            + "\n\n".join(body[half:]) + "\n")


@pytest.fixture()
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "guide.md").write_text(_markdown(12))
    (d / "bridges.html").write_text(HTML)
    (d / "notes.txt").write_text("Tea grows on misty hillsides. It is picked by hand.\n")
    pages = [f"Page one is about volcanoes. {SENTENCES[0]} " * 3,
             f"Page two is about glaciers. {SENTENCES[1]} " * 3,
             "Page three is about deserts and the rare mineral quazzite."]
    report = _pdf(d / "report.pdf", pages)
    _encrypted_pdf(d / "locked.pdf", report)
    _scanned_pdf(d / "scan.pdf")
    return d


# ---- documents ------------------------------------------------------------------------------------------

def test_html_keeps_visible_text_and_headings():
    text, layout = read_document(Path("page.html"), HTML.encode())
    for junk in ("scriptjunk", "navjunk", "headerjunk", "footerjunk", "hiddenjunk", "color: red"):
        assert junk not in text
    assert "Cables carry the deck of a suspension bridge & its load to the towers." in text
    names = [name for _, name in layout.headings]
    assert names == ["Suspension bridges", "Arch bridges"]
    for offset, name in layout.headings:
        assert text[offset:offset + len(name)] == name
    assert layout.heading_at(text.index("pushes its load")) == "Arch bridges"


def test_markdown_headings_skip_code_fences():
    md = "Intro\n\n# Title\n\ntext\n\n```\n# a comment, not a heading\n```\nSetext\n------\n\n## Sub ##\nbody\n"
    heads = markdown_headings(md)
    assert [h for _, h in heads] == ["Title", "Setext", "Sub"]
    assert all(md[o:].startswith(("# Title", "Setext", "## Sub")) for o, _ in heads)


def test_pdf_pages_and_unusable_pdfs(tmp_path):
    pdf = _pdf(tmp_path / "a.pdf", ["first page text", "second page text", "third page text"])
    text, layout = read_document(pdf, pdf.read_bytes())
    assert len(layout.pages) == 3
    assert layout.page_at(text.index("second page")) == 2 and layout.page_at(text.index("third")) == 3
    locked = read_document(Path("x.pdf"), _encrypted_pdf(tmp_path / "b.pdf", pdf).read_bytes())
    assert isinstance(locked, str) and "encrypted" in locked
    scanned = read_document(Path("x.pdf"), _scanned_pdf(tmp_path / "c.pdf").read_bytes())
    assert isinstance(scanned, str) and "no text layer" in scanned
    assert "cannot read PDF" in read_document(Path("x.pdf"), b"%PDF-1.4 truncated")


# ---- chunking -------------------------------------------------------------------------------------------

def test_chunks_fit_the_model_break_at_sentences_and_map_back(minilm):
    tok = minilm.tokenizer
    text = _markdown(40) + " " + "x" * 3000 + " tail words here."  # a 'word' longer than any window
    chunker = make_chunker(minilm, 48, 8)
    spans = chunker.spans(text)
    assert len(spans) > 10
    for s in spans:
        passage = text[s.start:s.end]
        assert passage == passage.strip() and passage
        assert len(tok(passage, add_special_tokens=False)["input_ids"]) <= 48
    # Everything is covered, consecutive passages overlap, and breaks fall at sentence ends.
    covered = np.zeros(len(text), dtype=bool)
    for s in spans:
        covered[s.start:s.end] = True
    assert all(covered[i] for i, c in enumerate(text) if not c.isspace())
    assert all(b.start < a.end for a, b in zip(spans, spans[1:]))
    prose = [s for s in spans if s.end < text.index("x" * 100)]
    assert sum(text[s.end - 1] in ".!?" for s in prose) >= 0.9 * len(prose)


def test_chunk_limits_are_checked(minilm):
    limit = minilm.spec.max_length - 2
    with pytest.raises(IndexerError, match=f"at most {limit} tokens"):
        make_chunker(minilm, limit + 1, 0)
    assert make_chunker(minilm, limit, 0).tokens == limit
    with pytest.raises(IndexerError, match="--chunk-overlap"):
        Chunker(minilm.tokenizer, 64, 40)
    with pytest.raises(IndexerError, match="needs --chunk-tokens"):
        make_chunker(minilm, None, 8)
    assert make_chunker(minilm, None, None) is None


# ---- ingest: passages, errors, re-ingest --------------------------------------------------------------

def _rows(coll: Collection) -> dict[str, dict]:
    cols = ["id", "text", "doc_id", "chunk", "start", "end", "page", "heading", "source"]
    return {r["id"]: r for b in coll.scan(cols) for r in b.to_pylist()}


@pytest.mark.slow
def test_ingest_documents_as_passages_and_reingest_without_orphans(docs, tmp_path):
    from indexer.index import build_index

    path = tmp_path / "rag.idx"
    s = ingest(path, [str(docs)], model="minilm", chunk_tokens=48, chunk_overlap=8, progress=False)
    coll = Collection.open(path)
    errors = {Path(e["source"]).name: e["reason"] for e in coll.errors()}
    assert set(errors) == {"locked.pdf", "scan.pdf"} and s.errors == 2
    assert "encrypted" in errors["locked.pdf"] and "no text layer" in errors["scan.pdf"]

    rows = _rows(coll)
    assert s.added == len(rows) and {r["doc_id"] for r in rows.values()} == {
        "guide.md", "bridges.html", "notes.txt", "report.pdf"}
    for r in rows.values():
        original, _ = read_document(Path(r["source"]), Path(r["source"]).read_bytes())
        assert original[r["start"]:r["end"]] == r["text"]  # offsets lead back to the extracted text
        assert r["id"] == f"{r['doc_id']}#{r['chunk']}"
        assert "junk" not in r["text"]
    by_doc = {}
    for r in rows.values():
        by_doc.setdefault(r["doc_id"], []).append(r)
    assert sorted(r["chunk"] for r in by_doc["guide.md"]) == list(range(len(by_doc["guide.md"])))
    assert len(by_doc["guide.md"]) >= 4
    pdf_pages = {r["page"] for r in by_doc["report.pdf"] if "quazzite" in r["text"]}
    assert pdf_pages and max(pdf_pages) >= 2 and all(r["page"] in (1, 2, 3) for r in by_doc["report.pdf"])
    assert {r["heading"] for r in by_doc["guide.md"]} <= {"City guide", "Getting around"}
    assert by_doc["guide.md"][-1]["heading"] == "Getting around" or any(
        r["heading"] == "Getting around" for r in by_doc["guide.md"])
    assert all(r["page"] is None for r in by_doc["guide.md"])

    # Unchanged documents: nothing embedded again; the collection remembers the chunk settings.
    again = ingest(path, [str(docs)], progress=False)
    assert (again.added, again.updated, again.removed, again.skipped) == (0, 0, 0, len(rows))

    # A shorter guide: its leftover passages are deleted, from the store and from what the index returns.
    build_index(path, kind="flat")
    old_guide = {i for i, r in rows.items() if r["doc_id"] == "guide.md"}
    (docs / "guide.md").write_text(_markdown(3))
    short = ingest(path, [str(docs)], progress=False)
    rows = _rows(Collection.open(path))
    guide = {i for i, r in rows.items() if r["doc_id"] == "guide.md"}
    assert 0 < len(guide) < len(old_guide) and short.removed == len(old_guide - guide)
    assert sorted(rows[i]["chunk"] for i in guide) == list(range(len(guide)))
    for mode, engine in (("vector", "faiss"), ("vector", "exact"), ("text", "auto"), ("hybrid", "faiss")):
        hits = search(path, "The river floods the valley every spring.", k=50, mode=mode, engine=engine)
        assert hits and {h["id"] for h in hits} <= set(rows), (mode, engine)


@pytest.mark.slow
def test_duplicate_document_ids_and_documents_that_become_unusable(tmp_path):
    """`a/ b/` both holding README.md: the first is kept, the second is one error, and later runs are
    stable. A document emptied or a PDF now encrypted loses its passages (no stale passage is served)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "README.md").write_text(_markdown(6))
    (b / "README.md").write_text("# Other\n\nTea grows on misty hillsides. " * 20)
    (a / "notes.md").write_text(_markdown(4))
    report = _pdf(tmp_path / "report.pdf", ["Page one is about volcanoes. " * 5, "Page two is about glaciers."])
    (a / "report.pdf").write_bytes(report.read_bytes())
    path = tmp_path / "kb.idx"
    first = ingest(path, [str(a), str(b)], model="minilm", chunk_tokens=32, progress=False)
    coll = Collection.open(path)
    rows = _rows(coll)
    readme = [r for r in rows.values() if r["doc_id"] == "README.md"]
    assert readme and all(Path(r["source"]).parent == a for r in readme) and "Tea" not in str(readme)
    dup = [e for e in coll.errors() if "duplicate id" in e["reason"]]
    assert len(dup) == 1 and Path(dup[0]["source"]).parent == b and first.errors == 1
    again = ingest(path, [str(a), str(b)], progress=False)
    assert (again.added, again.updated, again.removed) == (0, 0, 0)
    assert _rows(Collection.open(path)) == rows

    (a / "notes.md").write_text("  \n\n")
    _encrypted_pdf(a / "report.pdf", report)
    later = ingest(path, [str(a), str(b)], progress=False)
    left = _rows(Collection.open(path))
    stale = {i for i, r in rows.items() if r["doc_id"] in ("notes.md", "report.pdf")}
    assert stale and later.removed == len(stale) and set(left) == set(rows) - stale
    assert {r["doc_id"] for r in left.values()} == {"README.md"}
    assert {h["doc_id"] for h in search(path, "volcanoes", k=50)} == {"README.md"}
    assert search(path, "volcanoes glaciers", k=50, mode="text") == []


# ---- full-text and hybrid search ----------------------------------------------------------------------

NEAR_CODES = ["ZX81QL", "ZX18QK", "ZY81QK", "ZX81OK", "XZ81QK"]  # one character away from ZX81QK


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """Parts whose codes differ from ZX81QK by one character, two texts that name ZX81QK exactly, a
    how-to on the same subject without the code, and filler."""
    rows = [{"id": f"part-{c}", "text": f"Part {c}.", "label": "part"} for c in NEAR_CODES]
    rows += [{"id": "manual", "label": "manual", "text": "Chapter seven of the maintenance manual: after a power "
              "surge, replace fuse ZX81QK and test the circuit."},
             {"id": "order", "label": "order", "text": "Order form: ZX81QK, quantity three, paid by card."},
             {"id": "fuse", "label": "howto", "text": "How to replace a blown fuse safely after a power surge."}]
    rows += [{"id": f"filler-{i}", "text": s, "label": "city"} for i, s in enumerate(SENTENCES)]
    d = tmp_path_factory.mktemp("parts")
    src = d / "parts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(d / "parts.idx", [str(src)], model="minilm", progress=False)
    return d / "parts.idx"


def test_full_text_finds_an_exact_code_that_vector_search_misses(parts):
    text = search(parts, "ZX81QK", k=5, mode="text")
    assert {h["id"] for h in text} == {"order", "manual"}  # only the rows with that exact term
    assert all(h["score"] > 0 for h in text)
    vector = [h["id"] for h in search(parts, "ZX81QK", k=5, mode="vector")]
    assert "manual" not in vector and vector[0].startswith("part-")  # near-identical codes look alike to it
    hybrid = [h["id"] for h in search(parts, "ZX81QK", k=5, mode="hybrid")]
    assert set(hybrid[:2]) == {"order", "manual"}


def test_hybrid_ranks_what_both_rankings_agree_on_first(parts):
    q = "fuse ZX81QK"
    vector = [h["id"] for h in search(parts, q, k=3)]
    text = [h["id"] for h in search(parts, q, k=3, mode="text")]
    hits = search(parts, q, k=6, mode="hybrid")
    assert vector[0] == text[0] == hits[0]["id"] == "manual"
    assert hits[0]["score"] == pytest.approx(2 / 61)  # rank 1 in both: 1/(60+1) twice
    assert hits[0]["vector_score"] > 0.5 and hits[0]["text_score"] > 0
    # The how-to and the order form (found by their terms) come next, ahead of the look-alike part codes
    # that led the vector ranking.
    assert {"fuse", "order"} - set(vector) == {"fuse", "order"}
    assert {h["id"] for h in hits[1:3]} == {"fuse", "order"}
    assert all(h["id"].startswith("part-") and h["text_score"] is None for h in hits[3:])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_where_filters_every_mode(parts):
    for mode in ("vector", "text", "hybrid"):
        hits = search(parts, "fuse ZX81QK", k=10, mode=mode, where="label = 'order'")
        assert [h["id"] for h in hits] == ["order"], mode


def test_wrong_combinations_are_refused(parts, tmp_path):
    with pytest.raises(IndexerError, match="needs a text query"):
        search(parts, id="order", mode="text")
    with pytest.raises(IndexerError, match="--mode"):
        search(parts, "x", mode="fuzzy")
    with pytest.raises(IndexerError, match="empty"):
        search(parts, "  ", mode="text")
    with pytest.raises(IndexerError, match="invalid --where"):
        search(parts, "ZX81QK", mode="text", where="no_such_field = 1")
    with pytest.raises(IndexerError, match="invalid --where \"label = = 'x'\""):  # a SQL syntax error
        search(parts, "ZX81QK", mode="text", where="label = = 'x'")
    np.save(tmp_path / "v.npy", np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32))
    vec = tmp_path / "vec.idx"
    ingest(vec, [str(tmp_path / "v.npy")], model="none", progress=False)
    with pytest.raises(IndexerError, match="stores no text"):
        search(vec, vector=[1.0] * 8, mode="hybrid")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(IndexerError, match="NaN or infinite"):
            search(vec, vector=[bad] + [1.0] * 7)


def test_a_bad_where_through_lance_is_a_user_error(tmp_path):
    from indexer.index import build_index

    np.save(tmp_path / "v.npy", np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32))
    vec = tmp_path / "vec.idx"
    ingest(vec, [str(tmp_path / "v.npy")], model="none", progress=False)
    build_index(vec, engine="lance", target_recall=0.5)
    assert len(search(vec, vector=[1.0] * 8, k=3, engine="lance")) == 3
    for where in ("no_such_field = 1", "id = = 'x'"):
        with pytest.raises(IndexerError, match="invalid --where"):
            search(vec, vector=[1.0] * 8, engine="lance", where=where)


# ---- grouping and the command line --------------------------------------------------------------------

@pytest.mark.slow
def test_group_by_doc_and_cli(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    # One long document about bridges (many passages) and short ones on other topics.
    (d / "bridges.md").write_text("# Bridges\n\n" + "\n\n".join(
        f"Bridge number {i} crosses the river with steel cables and stone towers." for i in range(30)))
    for i, s in enumerate(SENTENCES[1:6]):
        (d / f"note{i}.txt").write_text(s + "\n")
    # A file list (@FILE): one source per line, relative to the list; comments and blank lines ignored.
    (tmp_path / "sources.lst").write_text("# the knowledge base\n" + "".join(
        f"docs/{f.name}\n\n" for f in sorted(d.iterdir())))
    runner = CliRunner()
    res = runner.invoke(cli, ["ingest", str(tmp_path / "g.idx"), f"@{tmp_path / 'sources.lst'}",
                              "--chunk-tokens", "24", "--chunk-overlap", "4", "--json", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["added"] > 10 and summary["errors"] == 0
    rows = _rows(Collection.open(tmp_path / "g.idx"))
    assert {r["doc_id"] for r in rows.values()} == {"bridges.md"} | {f"note{i}.txt" for i in range(5)}

    q = ["search", str(tmp_path / "g.idx"), "a bridge over the river", "-k", "4", "--json", "-q"]
    flat = json.loads(runner.invoke(cli, q + ["--mode", "hybrid"]).output)
    assert [h["doc_id"] for h in flat].count("bridges.md") >= 2  # ungrouped, one document fills the top
    res = runner.invoke(cli, q + ["--mode", "hybrid", "--group-by-doc"])
    grouped = json.loads(res.output)
    docs = [h["doc_id"] for h in grouped]
    assert docs[0] == "bridges.md" and len(docs) == len(set(docs)) == 4
    assert 1 <= len(grouped[0]["other_chunks"]) <= 2
    assert all(o["doc_id"] == "bridges.md" and o["score"] <= grouped[0]["score"] for o in grouped[0]["other_chunks"])
    for h in grouped:
        assert {"text", "start", "end", "chunk", "page", "heading"} <= set(h)

    plain = runner.invoke(cli, ["search", str(tmp_path / "g.idx"), "steel cables", "--mode", "text", "-k", "2"])
    assert plain.exit_code == 0 and "bridges.md#" in plain.output and "heading Bridges" in plain.output
    bad = runner.invoke(cli, ["search", str(tmp_path / "g.idx"), "--id", "note0.txt#0", "--mode", "text"])
    assert bad.exit_code == 1 and "needs a text query" in bad.output and "Traceback" not in bad.output
