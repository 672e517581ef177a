"""Ingest into a real LanceDB collection: layout, sources, incremental runs, bad input, model identity."""

from __future__ import annotations

import json
import shutil

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from indexer import Collection, IndexerError, ingest, search
from indexer.ingest import StrictError

from .conftest import write_jsonl


def _rows(path) -> dict[str, dict]:
    tbl = lance.dataset(str(path / "lance" / "items.lance")).to_table()
    rows = tbl.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows), "duplicate ids"
    return {r["id"]: r for r in rows}


def test_text_jsonl_collection_layout(tmp_path, sample_corpus):
    coll = tmp_path / "t.idx"
    s = ingest(coll, [str(sample_corpus["texts"])], model="minilm", progress=False)
    assert (s.added, s.updated, s.skipped, s.errors, s.rows) == (48, 0, 0, 0, 48)
    manifest = json.loads((coll / "manifest.json").read_text())
    assert manifest["model"]["name"] == "minilm" and manifest["model"]["dim"] == 384
    assert manifest["model"]["pooling"] == "mean" and manifest["model"]["normalize"] is True
    assert len(manifest["model"]["weights_sha256"]) == 64 and manifest["metric"] == "cosine"
    assert "lancedb" in manifest["packages"]
    rows = _rows(coll)  # readable with plain `lance`, no indexer needed
    r = rows["biology-1"]
    assert r["label"] == "biology" and r["text"].startswith("Plants convert sunlight")
    assert len(r["vector"]) == 384 and abs(np.linalg.norm(r["vector"]) - 1) < 1e-5
    assert len(r["content_hash"]) == 64


def test_incremental_runs_add_only_new_or_changed(tmp_path):
    src = tmp_path / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": f"document number {i} about topic {i % 3}", "year": 2000 + i} for i in range(20)]
    write_jsonl(src, rows)
    coll = tmp_path / "c.idx"
    assert ingest(coll, [str(src)], progress=False).added == 20
    again = ingest(coll, [str(src)], progress=False)
    assert (again.added, again.updated, again.skipped) == (0, 0, 20)
    before = _rows(coll)
    rows[3]["text"] = "a completely different text about the sea"
    rows[5]["year"] = 1999  # metadata-only change is picked up too
    rows.append({"id": "d20", "text": "a new document", "year": 2030})
    write_jsonl(src, rows)
    third = ingest(coll, [str(src)], progress=False)
    assert (third.added, third.updated, third.skipped) == (1, 2, 18)
    after = _rows(coll)
    assert len(after) == 21 and after["d5"]["year"] == 1999
    assert after["d3"]["text"].startswith("a completely") and after["d3"]["vector"] != before["d3"]["vector"]
    assert after["d7"]["vector"] == before["d7"]["vector"]


def test_folder_of_text_files_and_single_file(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("cats purr when they are happy")
    (docs / "sub" / "b.md").write_text("# Banks\nbanks lend money at interest")
    (docs / "ignored.csv.bak").write_text("not a source file")
    extra = tmp_path / "extra.txt"
    extra.write_text("the moon orbits the earth")
    coll = tmp_path / "f.idx"
    s = ingest(coll, [str(docs), str(extra)], model="minilm", progress=False)
    assert s.added == 3 and s.errors == 0
    assert set(_rows(coll)) == {"a.txt", "sub/b.md", "extra.txt"}
    assert search(coll, "lending and loans", k=1)[0]["id"] == "sub/b.md"


def test_csv_and_parquet_with_fields(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("key,body,topic,score\nk1,the river runs to the sea,nature,3\nk2,stock prices fell,money,5\n")
    pq_path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": ["k3"], "body": ["the striker scored a goal"], "topic": ["sport"],
                             "score": [4]}), pq_path)
    coll = tmp_path / "t.idx"
    s = ingest(coll, [str(csv_path), str(pq_path)], model="minilm", text_field="body", id_field="key",
               label_field="topic", progress=False)
    assert s.added == 3 and s.errors == 0
    rows = _rows(coll)
    assert rows["k2"]["label"] == "money" and rows["k3"]["label"] == "sport"
    assert str(rows["k1"]["score"]) == "3"  # kept as a user field
    hits = search(coll, "football", k=3, where="label = 'sport'")
    assert [h["id"] for h in hits] == ["k3"]


def test_image_folder_with_broken_inputs(tmp_path, sample_corpus):
    folder = tmp_path / "imgs"
    shutil.copytree(sample_corpus["images"], folder)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("I am not a png")
    good = (folder / "cat.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    Image.new("RGBA", (50, 40), (0, 128, 0, 100)).save(folder / "rgba.png")
    Image.new("I;16", (50, 40)).save(folder / "sixteen.png")
    coll = tmp_path / "i.idx"
    s = ingest(coll, [str(folder)], progress=False, workers=2)
    n_good = len(list(sample_corpus["images"].iterdir()))
    assert (s.added, s.errors) == (n_good + 2, 3)
    errors = {e["id"]: e["reason"] for e in Collection.open(coll).errors()}
    assert set(errors) == {"zero.jpg", "text.png", "truncated.jpg"}
    assert "empty" in errors["zero.jpg"] and "not an image" in errors["text.png"]
    assert Collection.open(coll).spec.name == "efficientnet-lite0"  # picked from the sources
    hits = search(coll, image=str(sample_corpus["queries"] / "cat-edited.jpg"), k=2)
    assert hits[0]["id"] == "cat.jpg" and hits[0]["score"] > 0.8
    with pytest.raises(StrictError) as err:
        ingest(coll, [str(folder)], progress=False, strict=True)
    assert err.value.summary.errors == 3 and err.value.summary.skipped == n_good + 2


def test_bad_text_rows_are_recorded(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"id": "ok", "text": "fine"}\n{not json\n[1, 2]\n{"id": "empty", "text": "  "}\n'
                   '{"id": "notext", "body": "x"}\n{"id": "ok", "text": "duplicate id"}\n{"text": 5}\n')
    bad_txt = tmp_path / "folder"
    bad_txt.mkdir()
    (bad_txt / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (bad_txt / "empty.md").write_text("")
    coll = tmp_path / "b.idx"
    s = ingest(coll, [str(src), str(bad_txt)], model="minilm", progress=False)
    assert (s.added, s.errors) == (1, 8)
    reasons = " | ".join(e["reason"] for e in Collection.open(coll).errors())
    for expected in ("invalid JSON", "must be an object", "empty", "missing text field", "duplicate id",
                     "UTF-8"):
        assert expected in reasons


def test_stdin_source(tmp_path, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO('{"text": "from a pipe"}\n{"text": "second line"}\n'))
    s = ingest(tmp_path / "s.idx", ["-"], model="minilm", progress=False)
    assert s.added == 2 and set(_rows(tmp_path / "s.idx")) == {"stdin:1", "stdin:2"}


def test_stdin_vectors_into_a_new_collection_keep_the_first_row(tmp_path, monkeypatch):
    """The first vector's row is read to learn the dim before the collection exists; stdin cannot rewind,
    and that row was once lost."""
    import io
    import sys

    rows = "".join(json.dumps({"id": f"r{i}", "vector": [float(i), 1.0, 2.0]}) + "\n" for i in range(5))
    monkeypatch.setattr(sys, "stdin", io.StringIO(rows))
    s = ingest(tmp_path / "v.idx", ["-"], model="none", vector_field="vector", progress=False)
    assert s.added == 5 and set(_rows(tmp_path / "v.idx")) == {f"r{i}" for i in range(5)}


def test_other_model_is_refused(tmp_path, tiny_bert_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello there"}])
    coll = tmp_path / "m.idx"
    ingest(coll, [str(src)], model="minilm", progress=False)
    with pytest.raises(IndexerError, match="refusing"):
        ingest(coll, [str(src)], model=f"hf:{tiny_bert_dir}", pooling="mean", progress=False)
    with pytest.raises(IndexerError, match="refusing"):
        ingest(coll, [str(src)], model="minilm", pooling="cls", progress=False)
    assert ingest(coll, [str(src)], model="minilm", progress=False).skipped == 1  # same model is fine


def test_bad_arguments_fail_before_work(tmp_path):
    with pytest.raises(IndexerError, match="source not found"):
        ingest(tmp_path / "x.idx", [str(tmp_path / "missing")], model="minilm", progress=False)
    odd = tmp_path / "file.xyz"
    odd.write_text("?")
    with pytest.raises(IndexerError, match="unsupported source"):
        ingest(tmp_path / "x.idx", [str(odd)], model="minilm", progress=False)
    assert not (tmp_path / "x.idx").exists()
