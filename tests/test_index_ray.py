"""`indexer index --engine ray`: shards encoded by Ray tasks and merged give the local build's results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import indexer
from indexer.cli import cli
from indexer.index import build_index
from indexer.index.sharded import build_on_ray
from indexer.store import Collection

pytest.importorskip("ray")


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, d))
    x = centres[rng.integers(0, 64, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors_collection(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("ray-index")
    x = _clustered(12_000, 32, 0)
    np.save(root / "v.npy", x)
    indexer.ingest(root / "v.idx", [str(root / "v.npy")], model="none", progress=False)
    return root / "v.idx", x


def _fresh_recall(coll_path, queries: np.ndarray, base: np.ndarray) -> float:
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    found = indexer.search_batch(coll_path, [indexer.Query(vector=q.tolist()) for q in queries], k=10, engine="faiss")
    hits = [{int(h["id"].split(":")[1]) - 1 for h in hs} for hs in found]  # ids are v.npy:<row from 1>
    return float(np.mean([len(h & set(t)) / 10 for h, t in zip(hits, truth)]))


@pytest.mark.slow
def test_ray_ivf_matches_the_local_build(vectors_collection):
    path, x = vectors_collection
    queries = _clustered(200, 32, 1)
    local = build_index(path, kind="ivf-flat", target_recall=0.95)
    local_recall = _fresh_recall(path, queries, x)
    built = json.loads(CliRunner().invoke(cli, ["index", str(path), "--engine", "ray", "--kind", "ivf-flat",
                                                "--target-recall", "0.95", "--json", "-q"]).stdout)
    ray_recall = _fresh_recall(path, queries, x)
    assert built["built_on"] == "ray" and built["kind"] == "ivf-flat" and built["rows"] == len(x)
    assert built["recall_at_10"] >= 0.95 and local["recall_at_10"] >= 0.95
    assert ray_recall >= min(local_recall, 0.95) - 0.01, (ray_recall, local_recall)
    # The index follows the store as a local one does: a new row is found, positions map to the right ids.
    info = Collection.open(path).info()["index"]
    assert info["current"] is True and info["shards"] == 1


def test_ray_flat_and_refined_pq_shards_keep_positions(vectors_collection):
    path, x = vectors_collection
    coll = Collection.open(path)
    # Several shards: each task's ids are shifted into place when merged, for plain and wrapped indexes.
    flat = build_on_ray(coll, kind="flat", shard_rows=5_000)
    assert flat.meta["shards"] == 3 and flat.index.ntotal == len(x)
    for row in (0, 4_999, 5_000, 11_999):
        hit = indexer.search(path, vector=x[row].tolist(), k=1, engine="faiss")[0]
        assert hit["id"] == f"v.npy:{row + 1}" and hit["score"] == pytest.approx(1.0, abs=1e-5)
    pq = build_on_ray(coll, kind="ivf-pq", target_recall=0.9, shard_rows=4_000)
    assert pq.meta["shards"] == 3 and pq.meta["factory"].endswith("RFlat") and pq.meta["recall_at_10"] >= 0.9
    hit = indexer.search(path, vector=x[7_777].tolist(), k=1, engine="faiss")[0]
    assert hit["id"] == "v.npy:7778"


def test_ray_refuses_hnsw(vectors_collection):
    result = CliRunner().invoke(cli, ["index", str(vectors_collection[0]), "--engine", "ray", "--kind", "hnsw"])
    assert result.exit_code == 1 and "cannot be merged" in result.output
