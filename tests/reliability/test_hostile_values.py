"""Property tests (hypothesis) on real LanceDB collections, through the precomputed-vector path (the model
is not the point here): table rows with any values are ingested or recorded as errors, never a crash; ids
with quotes, backslashes, SQL keywords and any unicode survive every filter the product builds from ids;
a user's --where, text queries and --queries files with any content answer or are refused in one line."""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from indexer import Collection, dedup, ingest, search
from indexer.cli import cli

DIM = 4
# filter_too_much: some draws of a row strategy are discarded (invalid for the format); how many varies by seed.
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Ids a filter must quote: quotes, backslashes, SQL, wildcards, whitespace, any unicode.
NASTY_VALUES = ["'", "''", "\\", "\\'", "'; DROP TABLE items; --", "' OR '1'='1", "x' OR id IS NOT NULL --", "%", "_",
                "a\nb", "\t", '"', "NULL", "SELECT", "é", "🙂", "id IN ('a')", " ", "a\x00b"]
NASTY = st.sampled_from(NASTY_VALUES)
IDS = st.one_of(NASTY, st.text(min_size=1, max_size=12)).filter(lambda s: s.strip("\x00") != "")


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _table(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@SETTINGS
@given(ids=st.lists(IDS, min_size=2, max_size=6, unique=True))
def test_ids_survive_every_filter_built_from_them(ids):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vecs = _vectors(len(ids), 0)
        rows = [{"id": i, "vector": v.tolist()} for i, v in zip(ids, vecs)]
        coll_path = tmp / "c.idx"
        s = ingest(coll_path, [str(_table(tmp / "a.jsonl", rows))], vector_field="vector", model="none",
                   progress=False)
        assert (s.added, s.errors) == (len(ids), 0)
        coll = Collection.open(coll_path)
        # rows_by_id: each id finds exactly its own row, none finds another's
        for i in ids:
            assert list(coll.rows_by_id([i], ["id"])) == [i]
        assert set(coll.rows_by_id(ids, ["id"])) == set(ids)
        # --id queries
        for i in ids:
            hits = search(coll_path, id=i, k=len(ids), engine="exact")
            assert i not in {h["id"] for h in hits} and len(hits) == len(ids) - 1
        # upsert: a changed vector for the first id replaces its row, the others stay
        rows[0]["vector"] = (-vecs[0]).tolist()
        s = ingest(coll_path, [str(_table(tmp / "a.jsonl", rows))], vector_field="vector", progress=False)
        assert (s.added, s.updated) == (0, 1)
        coll = Collection.open(coll_path)
        stored = coll.rows_by_id(ids, ["id", "vector"])
        assert set(stored) == set(ids) and coll.count() == len(ids)
        assert np.allclose(stored[ids[0]]["vector"], -vecs[0] / np.linalg.norm(vecs[0]), atol=1e-6)
        # delete: exactly the ids given
        assert coll.delete(ids[:1]) == 1
        assert set(r["id"] for b in coll.scan(["id"]) for r in b.to_pylist()) == set(ids[1:])


@SETTINGS
@given(ids=st.lists(IDS, min_size=2, max_size=6, unique=True))
def test_dedup_apply_deletes_exactly_the_drops(ids):
    """Pairs of identical vectors under nasty ids: --apply deletes one of each pair and nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = _vectors(len(ids), 1)
        rows = [{"id": i, "vector": base[n].tolist()} for n, i in enumerate(ids)]
        rows += [{"id": i + "\u2060dup", "vector": base[n].tolist()} for n, i in enumerate(ids)]
        coll_path = tmp / "c.idx"
        ingest(coll_path, [str(_table(tmp / "a.jsonl", rows))], vector_field="vector", model="none", progress=False)
        report = dedup(coll_path, threshold=0.999, apply=True)
        dropped = set(report.drop)
        assert len(dropped) == len(ids)
        left = {r["id"] for b in Collection.open(coll_path).scan(["id"]) for r in b.to_pylist()}
        assert left == {r["id"] for r in rows} - dropped and len(left) == len(ids)


# ---- source rows with any values ------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20), st.sampled_from(["\ud800", "a\udfffb", "\x00", "\ufeff", "\u202e"]), st.text(alphabet=st.characters(codec="utf-8"), min_size=2000, max_size=5000))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))
VECTOR = st.one_of(st.lists(st.floats(-10, 10), min_size=DIM, max_size=DIM), VALUES)
ROW = st.fixed_dictionaries({}, optional={"id": st.one_of(IDS, VALUES), "vector": VECTOR, "text": VALUES,
                                          "label": VALUES, "year": VALUES, "note": VALUES,
                                          "label\x00x": VALUES})


def _write(fmt: str, path: Path, rows: list[dict]) -> Path:
    if fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        # json.dumps keeps lone surrogates and huge ints as they are: what a real JSONL file can hold
        path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows), encoding="utf-8",
                        errors="surrogatepass")
    elif fmt == "csv":
        path = path.with_suffix(".csv")
        keys = sorted({k for r in rows for k in r})
        with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as fh:
            w = csv.DictWriter(fh, fieldnames=keys or ["id"])
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if k == "vector" else v for k, v in r.items()})
    else:
        path = path.with_suffix(".parquet")
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            assume(False)  # rows pyarrow itself cannot hold as one table are not a Parquet file
        pq.write_table(table, path)
    return path


@SETTINGS
@pytest.mark.parametrize("fmt, modality", [("jsonl", "vector"), ("parquet", "vector"), ("jsonl", "text"),
                                           ("csv", "text")])
@given(rows=st.lists(ROW, min_size=1, max_size=6))
def test_any_rows_are_ingested_or_recorded(fmt, modality, rows, tiny_bert_dir):
    """The first row is always good (it fixes a model-less collection's dimension); the rest are anything.
    Text goes through a tiny random BERT: the model is real, its meaning is not the point."""
    anchor = {"id": "anchor", "vector": [1.0] * DIM} if modality == "vector" else {"id": "anchor", "text": "the cat"}
    options = ({"vector_field": "vector", "model": "none"} if modality == "vector"
               else {"model": f"hf:{tiny_bert_dir}", "pooling": "mean", "device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = _write(fmt, tmp / "rows", [anchor, *rows])
        coll_path = tmp / "c.idx"
        s = ingest(coll_path, [str(src)], progress=False, **options)
        coll = Collection.open(coll_path)
        stored = [r for b in coll.scan(["id", "vector"]) for r in b.to_pylist()]
        ids = [r["id"] for r in stored]
        assert len(set(ids)) == len(ids), "duplicate ids"
        assert "anchor" in ids
        for r in stored:
            assert all(math.isfinite(x) for x in r["vector"])
        # every row is accounted for: stored (added, or replaced by a later row with its id) or recorded
        assert s.added + s.updated + s.skipped + s.errors == len(rows) + 1
        assert len(coll.errors()) == s.errors


# ---- what a user types: --where filters, text queries, --queries files ----------------------------------

def _cli(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _refused_in_one_line(result) -> None:
    """Exit 1 with one line on stderr ("Error: ..."): no traceback, no exception escaped."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.exception, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A model-less collection: each nasty value is the label of two rows, plus a query row `q`."""
    tmp = tmp_path_factory.mktemp("labelled")
    labels = NASTY_VALUES * 2
    vecs = _vectors(len(labels) + 1, 2)
    rows = [{"id": f"r{n}", "vector": v.tolist(), "label": lab} for n, (lab, v) in enumerate(zip(labels, vecs))]
    rows.append({"id": "q", "vector": vecs[-1].tolist(), "label": "query"})
    ingest(tmp / "c.idx", [str(_table(tmp / "rows.jsonl", rows))], vector_field="vector", model="none", progress=False)
    return tmp / "c.idx"


@SETTINGS
@given(value=st.one_of(NASTY, st.text(max_size=12)))
def test_where_on_any_value_finds_exactly_its_rows(value, labelled):
    """A filter the user quoted the SQL way (quotes doubled) matches exactly the rows holding that value."""
    literal = "'" + value.replace("'", "''") + "'"
    result = _cli("search", labelled, "--id", "q", "--where", f"label = {literal}", "-k", "100", "--json")
    assert result.exit_code == 0, result.output
    expected = sorted(f"r{n}" for n, lab in enumerate(NASTY_VALUES * 2) if lab == value)
    assert sorted(h["id"] for h in json.loads(result.stdout)) == expected


WHERE = st.one_of(st.text(max_size=40), st.sampled_from([
    "label = 'a", "1=1; DROP TABLE items", "label = 'x'; DELETE FROM items", "label = \x00", "'''", "id IN (",
    "label LIKE '%_%' ESCAPE '\\'", "_rowid > 0", "nosuchfield = 1", "label = " + "'x' OR " * 2000 + "true",
    "label = '" + "é" * 10000 + "'", "vector IS NULL", "label IS NOT NULL AND", "(((((label)))))", "\ud800", "$1", "label = $1",
    "$ç", "label = '$1'", "'\r", "label = '\n"]))


@SETTINGS
@given(where=WHERE)
def test_any_where_is_applied_or_refused_in_one_line(where, labelled):
    """Any --where string: results, or one line naming the filter; the collection is never changed."""
    result = _cli("search", labelled, "--id", "q", "--where", where, "-k", "100", "--json")
    if result.exit_code == 0:
        hits = json.loads(result.stdout)
        assert len({h["id"] for h in hits}) == len(hits) and "q" not in {h["id"] for h in hits}
    else:
        _refused_in_one_line(result)
    assert Collection.open(labelled).count() == 2 * len(NASTY_VALUES) + 1


@pytest.fixture(scope="module")
def texts(tmp_path_factory, tiny_bert_dir) -> Path:
    """A text collection (tiny random BERT) whose ids are the nasty values."""
    tmp = tmp_path_factory.mktemp("texts")
    rows = [{"id": i, "text": f"the cat sat on mat {n}"} for n, i in enumerate(NASTY_VALUES)]
    ingest(tmp / "t.idx", [str(_table(tmp / "rows.jsonl", rows))], model=f"hf:{tiny_bert_dir}", pooling="mean",
           device="cpu", progress=False)
    return tmp / "t.idx"


UTF8_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=200)


@SETTINGS
@given(text=st.one_of(UTF8_TEXT, st.sampled_from(["", " ", "\x00", "a\x00b", "-k", "--json", "x" * 100_000,
                                                  "🙂" * 5000, "\u202e\ufeff", "' OR 1=1 --"])))
def test_any_text_query_answers(text, texts):
    """Any text (after `--`, so one starting with a dash is a query): k results, best first."""
    result = _cli("search", texts, "-k", "3", "--json", "--", text)
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 3 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


ODD_LINES = ["", "   ", "{}", "[]", "null", '"cat"', '{"query": 5}', '{"query": null}', '{"vector": "abc"}',
             '{"vector": [[1]]}', '{"vector": []}', '{"vector": [true]}', '{"vector": ["1"]}', '{"id": 5}',
             '{"id": ["a"]}', '{"query": "a", "id": "b"}', '{"image": 7}', '{"image": "/nonexistent.png"}',
             "{not json", '{"query": "\\u0000"}', '{"vector": [1e999]}', '{"vector": [' + "9" * 400 + "]}",
             '{"vector": [NaN]}', json.dumps({"query": "x" * 100_000}), '{"query": "a"} trailing', '{"id": "nope"}',
             '{"id": "\\n0"}']  # an unknown id holding a line break (found by hypothesis: a two-line error)
LINE = st.one_of(
    st.builds(lambda t: json.dumps({"query": t}), UTF8_TEXT),
    st.builds(lambda i: json.dumps({"id": i}), st.one_of(NASTY, st.text(max_size=5))),
    st.builds(lambda v: json.dumps({"vector": v}), st.lists(st.floats(), max_size=40)),
    st.builds(json.dumps, VALUES),
    st.text(max_size=30),
    st.sampled_from(ODD_LINES))


@SETTINGS
@given(lines=st.lists(LINE, min_size=1, max_size=6))
def test_any_query_file_answers_every_line_or_refuses_in_one_line(lines, texts):
    """A --queries file with any lines: one JSONL answer per non-blank line, in order, or one line that
    says what is wrong."""
    lines = [" ".join(line.splitlines()) for line in lines]  # one line each
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", errors="surrogatepass")
        result = _cli("search", texts, "--queries", path, "-k", "2")
    if result.exit_code == 0:
        out = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(out) == sum(1 for line in lines if line.strip())
        assert all(isinstance(o["results"], list) and len(o["results"]) <= 2 for o in out)
    else:
        _refused_in_one_line(result)


@pytest.mark.parametrize("line", ODD_LINES)
def test_each_odd_query_line_answers_or_is_refused_in_one_line(line, texts, tmp_path):
    (tmp_path / "q.jsonl").write_text('{"query": "cat"}\n' + line + "\n")
    result = _cli("search", texts, "--queries", tmp_path / "q.jsonl", "-k", "2")
    if result.exit_code == 0:
        assert len(result.stdout.splitlines()) == 1 + bool(line.strip()), result.stdout
    else:
        _refused_in_one_line(result)


def test_query_file_that_is_not_utf8_is_refused_in_one_line(texts, tmp_path):
    (tmp_path / "q.jsonl").write_bytes(b'{"query": "cat"}\n\xff\xfe{"query": "dog"}\n')
    result = _cli("search", texts, "--queries", tmp_path / "q.jsonl")
    _refused_in_one_line(result)
    assert "not UTF-8" in result.stderr


# ---- ids in URLs: /items/{collection}/{id}, its image route, search by id, over a real server ------------

@pytest.fixture(scope="module")
def nasty_photos(tmp_path_factory):
    """Photos whose file names (so their ids) are the nasty values a file name can hold, each its own
    colour (so its own bytes), in an efficientnet-lite0 collection served by a real `indexer serve`."""
    from PIL import Image

    from ..serving import running_server

    root = tmp_path_factory.mktemp("nasty-photos")
    (root / "photos").mkdir()
    names = [f"{v}.png" for v in NASTY_VALUES if "\x00" not in v] + ["a%2Fb.png", "x?y#z.png", "100%_done.png",
                                                                      "sub/it's.png"]
    (root / "photos" / "sub").mkdir()
    for n, name in enumerate(names):
        Image.new("RGB", (32, 32), (n * 9 % 256, 255 - n * 7 % 256, n * 31 % 256)).save(root / "photos" / name)
    ingest(root / "photos.idx", [str(root / "photos")], model="efficientnet-lite0", progress=False)
    with running_server([root / "photos.idx"]) as url:
        yield url, root / "photos", names


def _item_url(url: str, item_id: str) -> str:
    from urllib.parse import quote

    return f"{url}/items/photos/{quote(item_id, safe='')}"


@pytest.mark.slow
def test_nasty_ids_in_urls_find_their_own_item(nasty_photos):
    """Each id finds its own row and its own file's bytes, and a search by it leaves exactly it out."""
    import httpx

    url, folder, names = nasty_photos
    for name in names:
        item = httpx.get(_item_url(url, name), timeout=60)
        assert item.status_code == 200 and item.json()["id"] == name, (name, item.text)
        image = httpx.get(_item_url(url, name) + "/image", timeout=60)
        assert image.status_code == 200 and image.content == (folder / name).read_bytes(), name
        hits = httpx.post(f"{url}/search", json={"id": name, "k": len(names)}, timeout=60)
        assert hits.status_code == 200, (name, hits.text)
        assert sorted(h["id"] for h in hits.json()["results"]) == sorted(set(names) - {name})
        # every hit's image_url leads to that hit's own file
        first = hits.json()["results"][0]
        assert httpx.get(url + first["image_url"], timeout=60).content == (folder / first["id"]).read_bytes()


@pytest.mark.slow
@SETTINGS
@given(item_id=st.one_of(NASTY, st.text(min_size=1, max_size=20)))
def test_any_id_in_a_url_is_found_or_a_clean_404(item_id, nasty_photos):
    import httpx

    url, _, names = nasty_photos
    assume(item_id.strip(".") != "")  # "." and ".." are path steps, resolved away by the client
    for suffix in ("", "/image"):
        r = httpx.get(_item_url(url, item_id) + suffix, timeout=60)
        stored = item_id in names or (suffix == "" and item_id.endswith("/image") and item_id[:-6] in names)
        assert r.status_code == (200 if stored else 404), (item_id, suffix, r.status_code, r.text[:200])
        if r.status_code == 404:
            assert set(r.json()) == {"error"} and "\n" not in r.json()["error"]
