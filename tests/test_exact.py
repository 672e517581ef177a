"""index/exact.py: the one exact cosine top-k (search, k-NN, index tuning) and the blocked products."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.errors import IndexerError
from indexer.index import exact
from indexer.index.exact import TopK, blocks, normalized, top_k
from indexer.tasks.search import Query


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    return normalized(rng.standard_normal((300, 24))), normalized(rng.standard_normal((40, 24)))


def brute(queries, base, k):
    sims = queries @ base.T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, 1), idx


@pytest.mark.parametrize("block_rows", [7, 64, 65536])
def test_top_k_matches_brute_force_whatever_the_blocks(data, monkeypatch, block_rows):
    base, queries = data
    monkeypatch.setattr(exact, "SCAN_ROWS", block_rows)
    sims, idx = top_k(queries, base, 10)
    want_sims, want_idx = brute(queries, base, 10)
    assert sims.shape == (40, 10) and (idx == want_idx).all()
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)


def test_top_k_over_a_subset_returns_positions_in_the_base(data):
    base, queries = data
    rows = np.flatnonzero(np.arange(len(base)) % 3 != 0)  # a k-NN fold leaves every third row out
    _, idx = top_k(queries, base, 5, base_rows=rows)
    _, want = brute(queries, base[rows], 5)
    assert (idx == rows[want]).all() and not (idx % 3 == 0).any()


def test_k_larger_than_the_base_gives_every_row_once(data):
    base, queries = data
    sims, idx = top_k(queries[:2], base[:4], 10)
    assert idx.shape == (2, 4) and sorted(idx[0]) == [0, 1, 2, 3]
    assert (np.diff(sims, axis=1) <= 0).all()


def test_topk_breaks_ties_by_id_and_trims_to_what_it_saw():
    best = TopK(1, 3)
    best.push(np.array([[0.5, 0.9]], np.float32), np.array([7, 3]))
    best.push(np.array([[0.5]], np.float32), np.array([2]))
    scores, ids = best.result()
    assert ids.tolist() == [[3, 2, 7]] and scores[0, 0] == np.float32(0.9)
    short = TopK(2, 5)
    short.push(np.ones((2, 2), np.float32), np.array([1, 0]))
    assert short.result()[1].tolist() == [[0, 1], [0, 1]]


def test_blocks_cover_the_product_exactly_once(data):
    base, queries = data
    product = np.full((len(queries), len(base)), np.nan, np.float32)
    pieces = 0
    for q, b, sims in blocks(queries, base, rows=16, cols=100):
        assert sims.shape == (len(q), len(b)) and np.isnan(product[np.ix_(q, b)]).all()
        product[np.ix_(q, b)] = sims
        pieces += 1
    assert pieces == 3 * 3 and np.allclose(product, queries @ base.T, atol=1e-6)
    picked = list(blocks(queries, base, query_rows=np.array([5, 1]), base_rows=np.array([9, 2, 4]), cols=2))
    assert [(q.tolist(), b.tolist()) for q, b, _ in picked] == [([5, 1], [9, 2]), ([5, 1], [4])]
    np.testing.assert_allclose(picked[1][2], queries[[5, 1]] @ base[[4]].T, atol=1e-6)


@pytest.mark.parametrize("given, message", [
    ({"QUERY": None, "--image": None}, "empty query: give exactly one of QUERY or --image"),
    ({"a": 1, "b": 2, "c": None}, "give exactly one of a, b or c"),
])
def test_one_query_kind_check_for_every_caller(given, message):
    with pytest.raises(IndexerError) as err:
        Query.pick(given)
    assert str(err.value) == message
    assert Query.pick({"query": None, "id": "r1", "vector": None}) == "id"
    with pytest.raises(ValueError, match="exactly one"):
        Query.pick(given, ValueError)
