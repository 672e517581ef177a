"""The FAISS index: tuned recall on fresh queries, incremental catch-up, filters, damaged files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexer import Collection, IndexerError, Query, search, search_batch
from indexer.index import FaissIndex, build_index, current_index
from indexer.models.base import ModelSpec


def clustered(n: int, d: int, seed: int, centers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters on the unit sphere (like real embeddings: many topics, spread within each)."""
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = rng.standard_normal((64, d)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), centers


def vector_collection(path, x: np.ndarray, start: int = 0) -> Collection:
    coll = Collection.create(path, ModelSpec(name="none", modality="vector", dim=x.shape[1]))
    add_rows(coll, x, start)
    return coll


def add_rows(coll: Collection, x: np.ndarray, start: int, upsert: bool = False, tag: str = "v1") -> None:
    rows = [{"id": f"r{start + i}", "content_hash": tag, "record_hash": f"{tag}-{start + i}", "source": "test",
             "label": ["even", "odd"][(start + i) % 2], "n": start + i} for i in range(len(x))]
    coll.write(rows, x, upsert=upsert)


def fresh_recall(coll: Collection, queries: np.ndarray, k: int = 10, **kw) -> float:
    exact = search_batch(coll, [Query(vector=q) for q in queries], k=k, engine="exact")
    ann = search_batch(coll, [Query(vector=q) for q in queries], k=k, engine="faiss", **kw)
    return float(np.mean([len({h["id"] for h in a} & {h["id"] for h in e}) / k for a, e in zip(ann, exact)]))


@pytest.fixture(scope="module")
def data():
    x, centers = clustered(40_000, 32, seed=0)
    q, _ = clustered(200, 32, seed=1, centers=centers)
    return x, q


@pytest.mark.parametrize("kind", ["auto", "ivf-flat", "ivf-pq"])
def test_tuned_index_meets_target_on_fresh_queries(tmp_path, data, kind):
    x, q = data
    coll = vector_collection(tmp_path / "c.idx", x)
    info = build_index(coll, kind=kind, target_recall=0.95)
    assert info["kind"] == ("hnsw" if kind == "auto" else kind)
    assert info["recall_at_10"] >= 0.95 and info["recall_queries"] == 1000
    assert info["params"] and info["qps_single"] > 0 and info["lance_version"] == coll.version()
    assert fresh_recall(coll, q) >= 0.94
    assert Collection.open(coll.path).info()["index"]["current"] is True


def test_small_collections_get_exact_flat(tmp_path, data):
    coll = vector_collection(tmp_path / "s.idx", data[0][:3000])
    assert build_index(coll)["kind"] == "flat"
    assert fresh_recall(coll, data[1][:20]) == 1.0


def test_incremental_updates_equal_a_rebuild(tmp_path, data):
    x, q = data
    coll = vector_collection(tmp_path / "inc.idx", x[:5000])
    build_index(coll, kind="flat")
    add_rows(coll, x[5000:5600], start=5000)  # new rows
    add_rows(coll, x[6000:6100], start=100, upsert=True, tag="v2")  # r100..r199 get new vectors
    coll.table.delete("n >= 4950 AND n < 5000")  # deleted rows
    caught_up = search_batch(coll, [Query(vector=v) for v in q[:30]], k=10, engine="faiss")
    index = current_index(coll)
    assert index.is_current(coll) and int(index.live.sum()) == coll.count() == 5550
    exact = search_batch(coll, [Query(vector=v) for v in q[:30]], k=10, engine="exact")
    assert [[h["id"] for h in r] for r in caught_up] == [[h["id"] for h in r] for r in exact]
    build_index(coll, kind="flat")
    rebuilt = search_batch(coll, [Query(vector=v) for v in q[:30]], k=10, engine="faiss")
    assert [[h["id"] for h in r] for r in caught_up] == [[h["id"] for h in r] for r in rebuilt]
    # The moved rows are found at their new place, deleted ones never.
    hit = search(coll, vector=x[6050], k=1, engine="faiss")[0]
    assert hit["id"] == "r150" and hit["score"] > 0.999
    assert not any(h["id"] in {f"r{i}" for i in range(4950, 5000)} for r in caught_up for h in r)


def test_ivf_catch_up_has_no_stale_or_phantom_ids(tmp_path, data):
    x, q = data
    coll = vector_collection(tmp_path / "ivf.idx", x[:20_000])
    build_index(coll, kind="ivf-flat")
    add_rows(coll, x[20_000:22_000], start=20_000)
    add_rows(coll, x[30_000:30_500], start=0, upsert=True, tag="v2")
    coll.table.delete("n >= 19000 AND n < 20000")
    hits = search_batch(coll, [Query(vector=v) for v in q], k=10, engine="faiss")
    current = {f"r{i}": v for i, v in enumerate(x[:22_000]) if not 19_000 <= i < 20_000}
    current.update({f"r{i}": x[30_000 + i] for i in range(500)})
    for v, result in zip(q, hits):
        for h in result:
            assert h["id"] in current
            assert abs(h["score"] - float(current[h["id"]] @ v)) < 1e-4  # the row's current vector
    assert fresh_recall(coll, q) >= 0.9


def test_growth_triggers_a_retrain(tmp_path, data, caplog):
    x, _ = data
    coll = vector_collection(tmp_path / "grow.idx", x[:4000])
    build_index(coll, kind="ivf-flat")
    add_rows(coll, x[4000:20_000], start=4000)
    with caplog.at_level("WARNING", logger="indexer"):
        index = current_index(coll)
    assert "rebuilding the index" in caplog.text and index.meta["trained_rows"] == 20_000


def test_where_filters_with_the_index(tmp_path, data):
    x, q = data
    coll = vector_collection(tmp_path / "f.idx", x)
    build_index(coll)
    broad = search_batch(coll, [Query(vector=v) for v in q[:50]], k=10, where="label = 'even'", engine="faiss")
    exact = search_batch(coll, [Query(vector=v) for v in q[:50]], k=10, where="label = 'even'", engine="exact")
    assert all(h["label"] == "even" for r in broad for h in r)
    overlap = np.mean([len({h["id"] for h in a} & {h["id"] for h in e}) / 10 for a, e in zip(broad, exact)])
    assert overlap >= 0.94
    narrow = search(coll, vector=q[0], k=10, where="n < 300 AND label = 'odd'", engine="faiss", fields="label,n")
    assert len(narrow) == 10 and all(h["n"] < 300 and h["label"] == "odd" for h in narrow)
    assert [h["id"] for h in narrow] == [h["id"] for h in search(coll, vector=q[0], k=10,
                                                                where="n < 300 AND label = 'odd'", engine="exact")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete-rows", "bad-json"])
def test_damaged_index_is_detected(tmp_path, data, damage):
    coll = vector_collection(tmp_path / "d.idx", data[0][:3000])
    build_index(coll, kind="flat")
    d = coll.path / "index"
    if damage == "flip":
        raw = bytearray((d / "faiss.index").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (d / "faiss.index").write_bytes(bytes(raw))
    elif damage == "truncate":
        raw = (d / "faiss.index").read_bytes()
        (d / "faiss.index").write_bytes(raw[: len(raw) // 2])
    elif damage == "delete-rows":
        (d / "rows.parquet").unlink()
    else:
        (d / "index.json").write_text("{not json")
    with pytest.raises(IndexerError, match="rebuild"):
        search(coll, vector=data[1][0], k=5)
    build_index(coll, kind="flat")  # the hint works
    assert len(search(coll, vector=data[1][0], k=5)) == 5


def test_index_json_records_what_was_measured(tmp_path, data):
    coll = vector_collection(tmp_path / "j.idx", data[0][:25_000])
    build_index(coll, kind="hnsw", target_recall=0.9)
    meta = json.loads((coll.path / "index" / "index.json").read_text())
    for key in ("kind", "params", "recall_at_10", "qps_single", "qps_batch", "build_seconds", "memory_bytes",
                "lance_version", "sweep", "files"):
        assert key in meta
    assert meta["params"]["ef"] >= 16 and meta["sweep"][-1]["recall"] >= 0.9
    assert FaissIndex.open(coll).index.ntotal == 25_000
    with pytest.raises(IndexerError, match="over --max-memory"):
        build_index(coll, kind="hnsw", max_memory="1MB")


def test_ingest_keeps_the_index_current(tmp_path, monkeypatch):
    import indexer.index as index_module
    from indexer import ingest

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    np.save(tmp_path / "a.npy", x[:2000])
    np.save(tmp_path / "b.npy", x[2000:])
    coll_path = tmp_path / "auto.idx"
    monkeypatch.setattr(index_module, "AUTO_INDEX_ROWS", 1500)
    ingest(coll_path, [str(tmp_path / "a.npy")], model="none", progress=False)
    coll = Collection.open(coll_path)
    assert coll.index_info() is not None and coll.index_info()["rows"] == 2000  # built automatically
    ingest(coll_path, [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")], model="none", progress=False)
    info = Collection.open(coll_path).index_info()
    assert info["current"] and info["rows"] == 3000


def test_lance_engine_is_tuned_and_never_stale(tmp_path, data):
    x, q = data
    coll = vector_collection(tmp_path / "lance.idx", x[:20_000])
    info = build_index(coll, engine="lance", target_recall=0.9)
    assert info["engine"] == "lance" and info["recall_at_10"] >= 0.9 and info["params"]["nprobes"] >= 1
    assert fresh_recall_lance(coll, q) >= 0.88  # target 0.9, less sampling noise on 200 queries
    hits = search(coll, vector=q[0], k=10, where="label = 'odd'", engine="lance")
    assert len(hits) == 10 and all(h["label"] == "odd" for h in hits)
    add_rows(coll, x[30_000:30_010], start=30_000)  # not in the Lance index yet: found by its flat scan
    hit = search(coll, vector=x[30_005], k=1, engine="lance")[0]
    assert hit["id"] == "r30005" and hit["score"] > 0.999
    assert Collection.open(coll.path).info()["lance_index"]["kind"] == "ivf-pq"


def fresh_recall_lance(coll: Collection, queries: np.ndarray, k: int = 10) -> float:
    exact = search_batch(coll, [Query(vector=v) for v in queries], k=k, engine="exact")
    ann = search_batch(coll, [Query(vector=v) for v in queries], k=k, engine="lance")
    return float(np.mean([len({h["id"] for h in a} & {h["id"] for h in e}) / k for a, e in zip(ann, exact)]))


@pytest.mark.slow
def test_tuned_index_on_real_minilm_embeddings(tmp_path, minilm):
    """Real sentence embeddings (clumpier than synthetic data): the tuned IVF index still meets its target
    on sentences it has never seen."""
    from .conftest import WORDS

    rng = np.random.default_rng(7)

    def sentences(n):
        return [" ".join(rng.choice(WORDS, size=rng.integers(4, 14))) for _ in range(n)]

    x = minilm.embed(sentences(6000), batch_size=128)
    fresh = minilm.embed(sentences(100), batch_size=128)
    coll = vector_collection(tmp_path / "real.idx", x)
    info = build_index(coll, kind="ivf-flat", target_recall=0.9)
    assert info["recall_at_10"] >= 0.9
    assert fresh_recall(coll, fresh) >= 0.88


def test_auto_falls_back_to_a_kind_that_reaches_the_target(tmp_path, monkeypatch):
    """Near-uniform vectors defeat a small HNSW search: auto moves on to IVF (any recall as nprobe grows)
    rather than settling below the target."""
    from indexer.index import tuning

    monkeypatch.setattr(tuning, "FLAT_BELOW", 1000)
    monkeypatch.setattr(tuning, "EF_SWEEP", (1,))  # an HNSW search this narrow cannot reach 0.95
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 64)).astype(np.float32)
    coll = vector_collection(tmp_path / "u.idx", x / np.linalg.norm(x, axis=1, keepdims=True))
    info = build_index(coll, kind="auto", target_recall=0.95)
    assert info["kind"] == "ivf-flat" and info["recall_at_10"] >= 0.95
    assert build_index(coll, kind="hnsw", target_recall=0.95)["kind"] == "hnsw"  # an explicit kind is kept


def test_hits_read_by_row_address_stay_right_after_writes_and_compaction(tmp_path, data, caplog, monkeypatch):
    """Hits' fields come from one read by Lance row address, or from memory once a process has searched
    enough (index/resident.py), and broad filters match rows by address; updates, deletes (dedup --apply),
    restores and compaction move rows, and every catch-up refreshes the addresses: each hit carries its
    own row's data, and a filter matches exactly its rows."""
    from indexer.index import resident
    from indexer.tasks import search as search_module
    from indexer.tasks.dedup.apply import delete, restore

    monkeypatch.setattr(resident, "WARM_QUERIES", 1)
    monkeypatch.setattr(search_module, "EXACT_FILTER_ROWS", 0)  # broad filters on the index, not exactly
    reads = []  # reads by address
    take_rows = Collection.take_rows
    monkeypatch.setattr(Collection, "take_rows", lambda self, *a, **kw: reads.append(1) or take_rows(self, *a, **kw))
    x, q = data
    coll = vector_collection(tmp_path / "addr.idx", x[:3000])
    for start in range(3000, 4000, 250):  # several fragments, for compaction to merge
        add_rows(coll, x[start : start + 250], start)
    build_index(coll, kind="flat")
    assert current_index(coll).row_ids is not None

    def settled() -> FaissIndex:
        index = current_index(coll)  # a catch-up's index is reopened by the next search: each keeps its own
        index.wait_for_resident_fields()
        return index

    def check(expected_rows: int) -> None:
        drop_score = lambda r: [{k: v for k, v in h.items() if k != "score"} for h in r]  # noqa: E731
        for where in (None, "label = 'odd'"):
            exact = search_batch(coll, [Query(vector=v) for v in q[:40]], k=10, engine="exact", fields="all",
                                 where=where)
            for _ in range(3):  # by address, then (the searches made it so) from memory
                takes = len(reads)
                hits = search_batch(coll, [Query(vector=v) for v in q[:40]], k=10, engine="faiss", fields="all",
                                    where=where)
                # The same rows and fields as the exact path, which finds rows by scanning the table.
                assert [drop_score(r) for r in hits] == [drop_score(r) for r in exact]
                for h in (h for r in hits for h in r):
                    assert h["n"] == int(h["id"][1:]) and h["label"] == ["even", "odd"][h["n"] % 2]
                    assert h["content_hash"] == ("v2" if 100 <= h["n"] < 200 else "v1")
                    assert where is None or h["label"] == "odd"
                settled()
            assert len(reads) == takes  # the last round was served from memory
        assert int(current_index(coll).live.sum()) == coll.count() == expected_rows
        assert "moved rows" not in caplog.text  # the addresses were current: no lookup by id was needed

    add_rows(coll, x[100:200] * -1, start=100, upsert=True, tag="v2")  # updated rows move to a new fragment
    check(4000)
    before = coll.version()
    near = {h["id"] for r in search_batch(coll, [Query(vector=v) for v in q[:40]], k=3, engine="exact") for h in r}
    delete(coll, sorted(near))  # what dedup --apply does
    check(4000 - len(near))
    coll.table.to_lance().optimize.compact_files(target_rows_per_fragment=100_000)  # rewrites every address
    check(4000 - len(near))
    restore(coll, before)
    check(4000)


@pytest.mark.parametrize("resident", [False, True], ids=["by-address", "from-memory"])
def test_a_stale_row_address_is_never_returned_as_another_row(tmp_path, data, monkeypatch, resident):
    from indexer.index import resident as resident_module

    monkeypatch.setattr(resident_module, "WARM_QUERIES", 1 if resident else 10**9)
    coll = vector_collection(tmp_path / "stale.idx", data[0][:500])
    build_index(coll, kind="flat")
    index = current_index(coll)
    index.row_ids[[3, 7]] = index.row_ids[[7, 3]]  # two addresses that name each other's rows
    for _ in range(2):
        rows = index.rows_at(coll, np.arange(10), ["id", "n"])
        assert sorted(rows) == sorted(index.ids_at(np.arange(10)))
        assert all(r["n"] == int(i[1:]) for i, r in rows.items())
        index.wait_for_resident_fields()
    assert bool(index._resident.tables) == resident


def test_hit_fields_too_large_to_keep_are_read_by_address(tmp_path, data, monkeypatch):
    from indexer.index import resident

    monkeypatch.setattr(resident, "WARM_QUERIES", 1)
    monkeypatch.setattr(resident, "RESIDENT_BYTES", 1000)
    coll = vector_collection(tmp_path / "big.idx", data[0][:500])
    build_index(coll, kind="flat")
    for _ in range(3):
        hits = search(coll, vector=data[1][0], k=5, engine="faiss", fields="n")
        assert len(hits) == 5 and all(h["n"] == int(h["id"][1:]) for h in hits)
        current_index(coll).wait_for_resident_fields()
    assert not current_index(coll)._resident.tables and current_index(coll)._resident.too_large


def test_one_query_reads_one_version_while_another_process_commits(tmp_path, data):
    coll = vector_collection(tmp_path / "pin.idx", data[0][:300])
    writer = Collection.open(coll.path)  # another handle, as another process would have
    with coll.one_version():
        before = coll.count()
        add_rows(writer, data[0][300:400], 300)
        assert coll.count() == before == 300
        assert len(list(coll.scan(["id"]))) and sum(b.num_rows for b in coll.scan(["id"])) == 300
    assert coll.count() == 400


def test_an_index_saved_before_row_addresses_still_serves_fields(tmp_path, data):
    import pyarrow.parquet as pq

    from indexer.files import fingerprint

    coll = vector_collection(tmp_path / "old.idx", data[0][:500])
    build_index(coll, kind="flat")
    rows_file = coll.path / "index" / "rows.parquet"
    pq.write_table(pq.read_table(rows_file).drop_columns(["row_id"]), rows_file)  # as an older release wrote it
    meta = json.loads((coll.path / "index" / "index.json").read_text())
    meta["files"]["rows.parquet"] = fingerprint(rows_file)
    (coll.path / "index" / "index.json").write_text(json.dumps(meta))
    index = FaissIndex.open(coll)
    assert index.row_ids is None
    hits = search(coll, vector=data[1][0], k=5, engine="faiss", fields="n")
    assert len(hits) == 5 and all(h["n"] == int(h["id"][1:]) for h in hits)
    add_rows(coll, data[0][500:510], 500)  # the next catch-up records the addresses
    search(coll, vector=data[1][0], k=5, engine="faiss")
    assert current_index(coll).row_ids is not None


def test_address_map_finds_every_address_across_fragments():
    from indexer.index.addresses import AddressMap

    rng = np.random.default_rng(3)
    addresses = np.concatenate([(np.uint64(f) << np.uint64(32)) + rng.choice(5000, 700, replace=False).astype(np.uint64)
                                for f in (0, 4, 9, 130)])
    rng.shuffle(addresses)
    lookup = AddressMap(addresses)
    assert lookup.positions(addresses).tolist() == list(range(len(addresses)))
    strangers = np.array([(5 << 32) | 1, (4 << 32) | 6000, (200 << 32), 2**64 - 1], dtype=np.uint64)
    assert lookup.positions(strangers).tolist() == [-1] * 4
    assert AddressMap(np.zeros(0, np.uint64)).positions(addresses[:3]).tolist() == [-1] * 3
