"""Precomputed embeddings: Parquet/JSONL with --vector-field and .npy files, under a named model or none."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from indexer import Collection, IndexerError, ingest, search
from indexer.cli import cli

from .conftest import write_jsonl


def test_parquet_vectors_under_the_model_that_made_them(tmp_path, minilm, sample_corpus):
    import json

    rows = [json.loads(line) for line in sample_corpus["texts"].read_text().splitlines()]
    vectors = minilm.embed([r["text"] for r in rows])
    table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows],
                      "label": [r["label"] for r in rows],
                      "emb": pa.array(list(vectors), type=pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "emb.parquet")
    coll = tmp_path / "pre.idx"
    s = ingest(coll, [str(tmp_path / "emb.parquet")], model="minilm", vector_field="emb", progress=False)
    assert (s.added, s.errors) == (48, 0)
    assert Collection.open(coll).spec.name == "minilm"
    # Queries are embedded by the recorded model, so text search works on vectors made elsewhere.
    assert search(coll, "space telescopes and galaxies", k=1)[0]["label"] == "astronomy"
    again = ingest(coll, [str(tmp_path / "emb.parquet")], vector_field="emb", progress=False)
    assert (again.added, again.skipped) == (0, 48)


def test_npy_with_model_none(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    np.save(tmp_path / "vecs.npy", x)
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "v.idx"), str(tmp_path / "vecs.npy"),
                                      "--model", "none", "-q", "--json"])
    assert result.exit_code == 0, result.output
    coll = Collection.open(tmp_path / "v.idx")
    assert coll.spec.name == "none" and coll.spec.dim == 24 and coll.count() == 500
    hit = search(coll, vector=x[42], k=1)[0]
    assert hit["id"] == "vecs.npy:43" and hit["score"] > 0.9999
    assert [h["id"] for h in search(coll, id="vecs.npy:43", k=3)] != []
    with pytest.raises(IndexerError, match="holds vector embeddings"):
        search(coll, "a text query")


def test_bad_vectors_are_recorded(tmp_path):
    src = write_jsonl(tmp_path / "v.jsonl", [
        {"id": "a", "v": [0.1, 0.2, 0.3]}, {"id": "b", "v": [1, 2]}, {"id": "c", "v": "nope"},
        {"id": "d"}, {"id": "e", "v": [0.0, float("nan"), 1.0]}, {"id": "f", "v": [0.3, 0.2, 0.1]}])
    s = ingest(tmp_path / "b.idx", [str(src)], model="none", vector_field="v", progress=False)
    assert (s.added, s.errors) == (2, 4)
    reasons = " ".join(e["reason"] for e in Collection.open(tmp_path / "b.idx").errors())
    assert "3" in reasons and "missing vector field" in reasons and "finite" in reasons


def test_dimension_must_match_the_named_model(tmp_path):
    np.save(tmp_path / "small.npy", np.ones((3, 8), dtype=np.float32))
    s = ingest(tmp_path / "m.idx", [str(tmp_path / "small.npy")], model="minilm", progress=False)
    assert (s.added, s.errors) == (0, 3)
    with pytest.raises(IndexerError, match="precomputed vectors"):
        ingest(tmp_path / "n.idx", [str(tmp_path)], vector_field="v", progress=False)
