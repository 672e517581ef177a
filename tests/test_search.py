"""Exact search against a brute-force reference, filters, id/vector/batched queries, wrong modality."""

from __future__ import annotations

import lance
import numpy as np
import pytest

from indexer import Collection, IndexerError, Query, ingest, search, search_batch
from indexer.index.exact import exact_search

from .conftest import WORDS, write_jsonl


@pytest.fixture(scope="module")
def text_coll(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("search")
    rows = [{"id": f"r{i}", "text": " ".join(rng.choice(WORDS, size=rng.integers(3, 12))),
             "label": ["a", "b", "c"][i % 3], "n": i} for i in range(300)]
    src = write_jsonl(d / "rows.jsonl", rows)
    ingest(d / "c.idx", [str(src)], model="minilm", progress=False)
    return Collection.open(d / "c.idx")


def _all(coll):
    tbl = lance.dataset(str(coll.path / "lance" / "items.lance")).to_table(columns=["id", "vector", "label"])
    return tbl["id"].to_pylist(), np.stack(tbl["vector"].to_numpy(zero_copy_only=False)), tbl["label"].to_pylist()


def test_exact_search_matches_brute_force(text_coll):
    ids, vecs, _ = _all(text_coll)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((7, vecs.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    results = search_batch(text_coll, [Query(vector=q) for q in queries], k=10)
    for q, hits in zip(queries, results):
        scores = vecs @ q
        expected = [ids[i] for i in np.argsort(-scores)[:10]]
        assert [h["id"] for h in hits] == expected
        np.testing.assert_allclose([h["score"] for h in hits], np.sort(scores)[::-1][:10], atol=1e-5)


def test_blocks_smaller_than_k_merge_correctly(text_coll, monkeypatch):
    """Streaming top-k over many small blocks equals one big block."""
    ids, vecs, _ = _all(text_coll)
    q = vecs[:3]
    full = exact_search(text_coll, q, 25)
    original = text_coll.scan
    monkeypatch.setattr(text_coll, "scan", lambda *a, **kw: original(*a, **{**kw, "batch_size": 7}))
    assert exact_search(text_coll, q, 25)[0] == full[0]


def test_where_prefilters_before_ranking(text_coll):
    hits = search(text_coll, "the cat", k=50, where="label = 'b' AND n < 60", fields="id,label,n")
    assert len(hits) == 20 and {h["label"] for h in hits} == {"b"} and max(h["n"] for h in hits) < 60
    with pytest.raises(IndexerError, match="invalid --where"):
        search(text_coll, "the cat", where="label ===")


def test_id_query_leaves_the_item_out(text_coll):
    hits = search(text_coll, id="r5", k=5)
    assert len(hits) == 5 and "r5" not in [h["id"] for h in hits]
    ids, vecs, _ = _all(text_coll)
    i = ids.index("r5")
    expected = [ids[j] for j in np.argsort(-(vecs @ vecs[i])) if ids[j] != "r5"][:5]
    assert [h["id"] for h in hits] == expected
    with pytest.raises(IndexerError, match="id not found"):
        search(text_coll, id="nope")


def test_batch_results_keep_input_order(text_coll):
    qs = [Query(text="market price"), Query(id="r1"), Query(text="blue moon"), Query(vector=np.ones(384))]
    batched = search_batch(text_coll, qs, k=3)
    singles = [search(text_coll, q.text, id=q.id, vector=q.vector, k=3) for q in qs]
    assert [[h["id"] for h in r] for r in batched] == [[h["id"] for h in r] for r in singles]


def test_wrong_modality_and_bad_vectors(text_coll, sample_corpus):
    with pytest.raises(IndexerError, match="holds text embeddings"):
        search(text_coll, image=str(sample_corpus["queries"] / "cat-edited.jpg"))
    with pytest.raises(IndexerError, match="384"):
        search(text_coll, vector=[0.1, 0.2])
    with pytest.raises(IndexerError, match="exactly one"):
        search(text_coll, "a", id="r1")


def test_results_carry_the_fields_asked_for(text_coll):
    hit = search(text_coll, "red car", k=1)[0]
    assert hit.keys() == {"id", "score", "text", "label"}  # the default: what the item is, and its label
    everything = search(text_coll, "red car", k=1, fields="all")[0]
    assert {"id", "score", "text", "label", "n", "content_hash", "source"} <= everything.keys()
    assert "vector" not in everything and "record_hash" not in everything
    lean = search(text_coll, "red car", k=3, fields=["n"])
    assert all(h.keys() == {"id", "score", "n"} for h in lean)
    assert [h["id"] for h in lean] == [h["id"] for h in search(text_coll, "red car", k=3)]
    with pytest.raises(IndexerError, match=r"unknown field 'year'.*\(or all\)"):
        search(text_coll, "red car", fields="id,year")


def test_image_collection_search(tmp_path, sample_corpus):
    ingest(tmp_path / "i.idx", [str(sample_corpus["images"])], progress=False, workers=0)
    hits = search(tmp_path / "i.idx", image=str(sample_corpus["queries"] / "flower-small.png"), k=3)
    assert hits[0]["id"] == "flower.jpg" and hits[0]["path"].endswith("flower.jpg")
    with pytest.raises(IndexerError, match="holds image embeddings"):
        search(tmp_path / "i.idx", "a flower")
