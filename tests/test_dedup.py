"""Dedup on generated near-duplicate sets with known ground truth: real photos under transformations,
texts with small edits, and planted near-duplicates among random vectors."""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import indexer
from indexer.cli import cli
from indexer.errors import IndexerError
from indexer.index import FaissIndex, build_index
from indexer.spec import ModelSpec
from indexer.store import Collection
from indexer.tasks.dedup import (
    DEFAULT_THRESHOLDS,
    Vectors,
    calibrate,
    components,
    dedup,
    find_pairs,
    find_pairs_against,
    load_item,
    pair_scores,
    phash_pair,
    phash_similarity,
    typos,
    write_near_duplicate_sets,
)
from indexer.tasks.dedup import pairs as dedup_module

from .conftest import write_jsonl


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def found_pairs(report) -> set[tuple[str, str]]:
    return {(p["a"], p["b"]) for p in report.pairs}


def vectors_collection(path, x: np.ndarray, hashes: list[str] | None = None) -> Collection:
    """Rows r0, r1, ... with these vectors; each its own content hash unless `hashes` says otherwise."""
    coll = Collection.create(path, ModelSpec(name="none", modality="vector", dim=x.shape[1]))
    hashes = hashes or [f"h{k}" for k in range(len(x))]
    rows = [{"id": f"r{k}", "content_hash": h, "record_hash": f"rec{k}", "source": "test"} for k, h in enumerate(hashes)]
    coll.write(rows, np.asarray(x, dtype=np.float32), upsert=False)
    return coll


def ids_of(path) -> set[str]:
    return {r["id"] for b in Collection.open(path).scan(["id"]) for r in b.to_pylist()}


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("near-dups")
    s = write_near_duplicate_sets(root)
    s["image_idx"] = root / "img.idx"
    s["text_idx"] = root / "txt.idx"
    indexer.ingest(s["image_idx"], [str(s["images"])], model="efficientnet-lite0", progress=False)
    indexer.ingest(s["text_idx"], [str(s["texts"])], model="minilm", progress=False)
    return s


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """2000 random 64-d vectors; 100 of them copied with noise (cosine ~0.95-0.99) and 5 copied exactly."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(2000, 105, replace=False)
    noise = rng.standard_normal((100, 64)).astype(np.float32)
    noise *= (rng.uniform(0.15, 0.3, 100) / np.linalg.norm(noise, axis=1))[:, None]
    dups = np.concatenate([x[src[:100]] + noise, x[src[100:]]])
    np.save(root / "v.npy", np.concatenate([x, dups]))
    indexer.ingest(root / "v.idx", [str(root / "v.npy")], model="none", progress=False)
    truth = {tuple(sorted((f"v.npy:{s + 1}", f"v.npy:{2001 + k}"))) for k, s in enumerate(src)}
    return {"idx": root / "v.idx", "truth": truth, "root": root}


# ---- quality at the default thresholds -------------------------------------------------------------------

def test_photos_under_transformations_at_default_threshold(sets):
    r = dedup(sets["image_idx"])
    assert r.threshold == DEFAULT_THRESHOLDS["image"] and r.threshold_source == "default for image embeddings"
    scores = pair_scores(found_pairs(r), sets["image_groups"])
    assert scores["precision"] >= 0.99 and scores["recall"] >= 0.95, scores
    # Groups are the transitive closure: each photo with all six of its transformed copies.
    assert sorted(map(sorted, r.groups)) == sorted(map(sorted, sets["image_groups"]))
    assert len(r.drop) == sum(len(g) - 1 for g in sets["image_groups"])


def test_edited_texts_at_default_threshold(sets):
    r = dedup(sets["text_idx"])
    assert r.threshold == DEFAULT_THRESHOLDS["text"] and r.modality == "text"
    scores = pair_scores(found_pairs(r), sets["text_groups"])
    assert scores["precision"] >= 0.99 and scores["recall"] >= 0.8, scores
    truth_of = {i: k for k, g in enumerate(sets["text_groups"]) for i in g}
    for g in r.groups:  # never merges distinct documents (same-topic siblings sit right next to them)
        assert len({truth_of[i] for i in g}) == 1, g
    copies = sum(len(g) - 1 for g in sets["text_groups"])
    assert len(r.drop) >= 0.9 * copies


def test_exact_copies_come_from_content_hash(sets, tmp_path):
    coll = tmp_path / "t.idx"
    rows = [{"id": "a", "text": "The river floods every spring."}, {"id": "b", "text": "The river floods every spring."},
            {"id": "c", "text": "Quarterly earnings beat expectations."}]
    indexer.ingest(coll, [str(write_jsonl(tmp_path / "t.jsonl", rows))], model="minilm", progress=False)
    r = dedup(coll, threshold=1.0)  # nothing but identical content can reach 1.0 reliably
    assert r.pairs == [{"a": "a", "b": "b", "score": pytest.approx(1.0, abs=1e-5), "exact": True}]
    assert r.drop == ["b"]
    # A copy ingested later under a smaller id: `first` keeps the smaller id, `oldest` the earlier one.
    later = [{"id": "0-late", "text": "Quarterly earnings beat expectations."}]
    indexer.ingest(coll, [str(write_jsonl(tmp_path / "later.jsonl", later))], model="minilm", progress=False)
    assert dedup(coll, keep="first").groups[-1] == ["0-late", "c"]
    assert dedup(coll, keep="oldest").groups[-1] == ["c", "0-late"]


# ---- methods, groups, keep policies -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["exact", "knn", "semdedup"])
def test_methods_find_the_planted_pairs(planted, method):
    r = dedup(planted["idx"], method=method, threshold=0.9)
    assert r.method == method
    found = {tuple(sorted(p)) for p in found_pairs(r)}
    recall = len(found & planted["truth"]) / len(planted["truth"])
    assert found <= planted["truth"]  # random 64-d vectors never reach 0.9 by chance
    assert recall == 1.0 if method != "semdedup" else recall >= 0.8
    assert {p["exact"] for p in r.pairs if p["score"] > 0.99999} == {True}


def test_knn_partitions_and_still_finds_the_pairs(tmp_path):
    """21k clustered vectors in ~42 lists: the tuned spread must stay below the list count (else it is brute
    force) while finding >= 99% of the exact pairs."""
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((64, 32)).astype(np.float32)
    x = centers[rng.integers(0, 64, 20_000)] + 0.6 * rng.standard_normal((20_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(20_000, 1000, replace=False)
    noise = rng.standard_normal((1000, 32)).astype(np.float32)
    noise *= (rng.uniform(0.1, 0.45, 1000) / np.linalg.norm(noise, axis=1))[:, None]
    x = np.concatenate([x, x[src] + noise])
    vecs = Vectors([str(k) for k in range(len(x))], [str(k) for k in range(len(x))],
                   x / np.linalg.norm(x, axis=1, keepdims=True))
    (ei, ej, _, _), _, _ = find_pairs(vecs, 0.9, "exact")
    (ki, kj, _, _), used, stats = find_pairs(vecs, 0.9, "knn")
    assert used == "knn" and stats["lists"] >= 40 and stats["spread"] < stats["lists"], stats
    exact, knn = set(zip(ei.tolist(), ej.tolist())), set(zip(ki.tolist(), kj.tolist()))
    assert len(exact) >= 900 and knn <= exact
    assert len(knn & exact) / len(exact) >= 0.99, (len(knn & exact), len(exact), stats)


def test_exact_and_knn_agree_at_the_threshold(tmp_path):
    # Identical vectors under distinct ids and content hashes: cosine exactly 1.0, so threshold 1.0 keeps them.
    x = np.random.default_rng(1).standard_normal((600, 16)).astype(np.float32)
    x[[10, 20, 30]] = np.eye(16)[0]
    x[[40, 50]] = np.eye(16)[1]
    coll = vectors_collection(tmp_path / "v.idx", x)
    want = {("r10", "r20"), ("r10", "r30"), ("r20", "r30"), ("r40", "r50")}
    for method in ("exact", "knn"):
        r = dedup(coll, threshold=1.0, method=method)
        assert found_pairs(r) == want and not any(p["exact"] for p in r.pairs), method


def test_exact_copies_give_linear_pairs(tmp_path):
    """300 copies of one item (one content hash) next to 200 distinct items: 299 links, one group."""
    rng = np.random.default_rng(2)
    x = np.concatenate([np.repeat(rng.standard_normal((1, 24)), 300, axis=0), rng.standard_normal((200, 24))])
    coll = vectors_collection(tmp_path / "v.idx", x, ["same"] * 300 + [f"h{k}" for k in range(200)])
    for method in ("exact", "knn"):
        r = dedup(coll, threshold=0.95, method=method)
        assert r.pair_count == 299 and all(p["exact"] for p in r.pairs) and r.stats["searched"] == 201
        assert r.groups == [["r0"] + [f"r{k}" for k in range(1, 300)]] and len(r.drop) == 299


@pytest.mark.parametrize("method", ["exact", "knn"])
def test_a_threshold_too_low_is_refused_before_memory_runs_out(planted, method, monkeypatch):
    monkeypatch.setattr(dedup_module, "MAX_PAIRS", 10_000)
    with pytest.raises(IndexerError, match="too low to mean 'duplicate'"):
        dedup(planted["idx"], threshold=0.0, method=method)  # ~1.1M pairs among 2105 random vectors
    assert dedup(planted["idx"], threshold=0.9, method=method).pair_count == len(planted["truth"])
    out = run("dedup", planted["idx"], "--threshold", "0", "--method", method)
    assert out.exit_code == 1 and "Raise --threshold" in out.output and "Traceback" not in out.output


def test_against_one_item_is_exact_whatever_the_reference_size(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    ref = Vectors([f"r{k}" for k in range(3000)], [f"h{k}" for k in range(3000)],
                  x / np.linalg.norm(x, axis=1, keepdims=True))
    one = Vectors(["q"], ["hq"], ref.x[:1].copy())
    monkeypatch.setattr(dedup_module, "EXACT_BELOW", 100)  # a "large" reference for the old size-only rule
    (i, j, _, _), used, _ = find_pairs_against(one, ref, 0.999)
    assert used == "exact" and j.tolist() == [0]
    monkeypatch.setattr(dedup_module, "EXACT_PRODUCTS", 1000)  # many queries x a large reference: the lists
    many = Vectors([f"q{k}" for k in range(500)], [f"hq{k}" for k in range(500)], ref.x[:500].copy())
    assert find_pairs_against(many, ref, 0.999)[1] == "knn"


def test_groups_are_transitive(tmp_path):
    # a ~ b and b ~ c above 0.9, a and c below it: one group of three.
    a = np.array([1.0, 0.0, 0.0, 0.0])
    b = np.array([np.cos(0.4), np.sin(0.4), 0, 0])
    c = np.array([np.cos(0.8), np.sin(0.8), 0, 0])
    d = np.array([0.0, 0.0, 1.0, 0.0])
    np.save(tmp_path / "v.npy", np.stack([a, b, c, d]).astype(np.float32))
    indexer.ingest(tmp_path / "v.idx", [str(tmp_path / "v.npy")], model="none", progress=False)
    r = dedup(tmp_path / "v.idx", threshold=0.9)
    assert {(p["a"], p["b"]) for p in r.pairs} == {("v.npy:1", "v.npy:2"), ("v.npy:2", "v.npy:3")}
    assert r.groups == [["v.npy:1", "v.npy:2", "v.npy:3"]]
    via = {d["id"]: d for d in r.dropped}
    assert via["v.npy:3"]["via"] == "v.npy:2" and via["v.npy:3"]["score"] < 0.9 <= via["v.npy:3"]["via_score"]
    assert [g.tolist() for g in components(6, np.array([0, 3, 4]), np.array([1, 4, 5]))] == [[0, 1], [3, 4, 5]]


def test_keep_policies_choose_as_documented(sets):
    coll = Collection.open(sets["text_idx"])
    texts = {r["id"]: r["text"] for b in coll.scan(["id", "text"]) for r in b.to_pylist()}
    stored_order = [r["id"] for b in coll.scan(["id"]) for r in b.to_pylist()]
    vectors = {r["id"]: np.asarray(r["vector"]) for b in coll.scan(["id", "vector"]) for r in b.to_pylist()}
    for keep in ("first", "oldest", "longest", "central"):
        r = dedup(coll, keep=keep)
        for g in r.groups:
            if keep == "first":
                want = min(g)
            elif keep == "oldest":
                want = min(g, key=stored_order.index)
            elif keep == "longest":
                want = max(g, key=lambda i: (len(texts[i]), [-ord(ch) for ch in i]))
            else:
                total = {i: sum(float(vectors[i] @ vectors[j]) for j in g) for i in g}
                want = max(g, key=lambda i: (total[i], [-ord(ch) for ch in i]))
            assert g[0] == want, (keep, g)
            assert set(g[1:]) <= set(r.drop) and g[0] not in r.drop
    assert all(g[0].endswith("--boilerplate") for g in dedup(coll, keep="longest").groups if len(g) == 4)


def test_keep_largest_prefers_most_pixels_then_bytes(sets):
    r = dedup(sets["image_idx"], keep="largest")
    folder = Path(sets["images"])

    def size(i):
        with Image.open(folder / i) as img:
            return img.size[0] * img.size[1], (folder / i).stat().st_size

    for g in r.groups:
        assert g[0] == max(g, key=size)
    with pytest.raises(IndexerError, match="longest compares texts"):
        dedup(sets["image_idx"], keep="longest")


# ---- --apply, --restore, the index ------------------------------------------------------------------------

def test_apply_deletes_as_a_new_version_and_restore_brings_it_back(sets, tmp_path):
    path = tmp_path / "t.idx"
    shutil.copytree(sets["text_idx"], path)
    build_index(path, kind="flat")
    coll = Collection.open(path)
    before_ids = {r["id"] for b in coll.scan(["id"]) for r in b.to_pylist()}
    result = run("dedup", path, "--apply", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert {"pairs", "groups", "drop", "threshold"} <= r.keys() and r["applied"]
    coll = Collection.open(path)
    after_ids = {x["id"] for b in coll.scan(["id"]) for x in b.to_pylist()}
    assert after_ids == before_ids - set(r["drop"]) and r["version_after"] > r["version_before"]
    index = FaissIndex.open(coll)  # the saved index reflects the deletion: no stale hits
    assert index.is_current(coll) and int(index.live.sum()) == len(after_ids)
    hits = indexer.search(path, id=r["groups"][0][0], k=len(before_ids), engine="faiss")
    assert not {h["id"] for h in hits} & set(r["drop"])
    assert dedup(path).drop == []  # nothing left to drop
    # Something ingested after the apply survives the undo (restore is not a rollback).
    late = [{"id": "late-1", "text": "Tide pools hold anemones, crabs and small fish between the rocks."}]
    indexer.ingest(path, [str(write_jsonl(tmp_path / "late.jsonl", late))], model="minilm", progress=False)
    result = run("dedup", path, "--restore", r["version_before"], "--json")
    assert result.exit_code == 0, result.output
    undo = json.loads(result.stdout)
    assert undo["rows_restored"] == len(r["drop"]) and undo["version_after"] > undo["version_before"]
    coll = Collection.open(path)
    assert ids_of(path) == before_ids | {"late-1"} and coll.count() == len(before_ids) + 1
    index = FaissIndex.open(coll)
    assert index.is_current(coll) and int(index.live.sum()) == len(before_ids) + 1
    hits = indexer.search(path, id=r["groups"][0][0], k=len(before_ids), engine="faiss")
    assert set(r["groups"][0][1:]) <= {h["id"] for h in hits}  # restored rows are searchable again
    assert sorted(dedup(path).drop) == sorted(r["drop"])
    # Restoring again brings nothing back twice.
    again = json.loads(run("dedup", path, "--restore", r["version_before"], "--json").stdout)
    assert again["rows_restored"] == 0 and Collection.open(path).count() == len(before_ids) + 1


def test_user_errors_stop_before_anything_is_deleted(sets, tmp_path):
    path = tmp_path / "img.idx"
    shutil.copytree(sets["image_idx"], path)
    version, rows = Collection.open(path).version(), Collection.open(path).count()
    for args in (["--keep", "longest"], ["--out", tmp_path / "r.txt"]):
        out = run("dedup", path, "--apply", *args)
        assert out.exit_code == 1 and "Traceback" not in out.output, out.output
        assert Collection.open(path).version() == version and Collection.open(path).count() == rows
    vec = vectors_collection(tmp_path / "v.idx", np.eye(4))
    with pytest.raises(IndexerError, match="--keep largest needs texts or image files"):
        dedup(vec, keep="largest", apply=True)
    # --apply with an HTML page: its sample is taken before the delete, so the dropped photos still show.
    out = run("dedup", path, "--apply", "--out", tmp_path / "r.html", "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    page = (tmp_path / "r.html").read_text()
    assert r["applied"] and "deleted as Lance version" in page
    assert page.count("data:image/jpeg;base64,") >= 4 and any(html.escape(d) in page for d in r["drop"])


def test_without_apply_nothing_changes(sets):
    coll = Collection.open(sets["text_idx"])
    version, rows = coll.version(), coll.count()
    r = dedup(coll)
    assert r.drop and not r.applied and Collection.open(sets["text_idx"]).version() == version
    assert Collection.open(sets["text_idx"]).count() == rows


def test_apply_waits_for_the_write_lock(sets, tmp_path):
    """Another writer holds the lock: --apply waits for it, saying once whom it waits for, then applies."""
    path = tmp_path / "t.idx"
    shutil.copytree(sets["text_idx"], path)
    version = Collection.open(path).version()
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with Collection.open(path).write_lock("ingest"):
            held.set()
            release.wait(60)

    class Released(logging.Handler):  # the other writer finishes once --apply says it is waiting
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())
            release.set()

    messages: list[str] = []
    thread = threading.Thread(target=writer)
    thread.start()
    held.wait(60)
    with pytest.raises(IndexerError, match=r"being written by process \d+ \(ingest, since"):
        with Collection.open(path).write_lock("index catch-up", wait=False):
            pass
    handler, lock_log = Released(level=logging.WARNING), logging.getLogger("indexer.store.location")
    lock_log.addHandler(handler)
    try:
        report = dedup(path, apply=True)
    finally:
        lock_log.removeHandler(handler)
        release.set()
        thread.join()
    assert report.applied and Collection.open(path).version() > version
    assert len(messages) == 1 and f"by process {os.getpid()} (ingest, since" in messages[0]
    assert "waiting for it to finish" in messages[0]


# ---- --against (leakage) ------------------------------------------------------------------------------------

def test_against_finds_leaked_items(sets, tmp_path):
    rows = [json.loads(line) for line in Path(sets["texts"]).read_text().splitlines()]
    train = [r for r in rows if "--" not in r["id"]]  # the original documents
    originals = sorted({r["id"] for r in train})
    leaked = [r for r in rows if r["id"].endswith("--boilerplate") and r["id"].split("--")[0] in originals[:6]]
    fresh = [{"id": f"new-{k}", "text": t} for k, t in enumerate([
        "Glaciers carve U-shaped valleys as they slowly move downhill under their own weight.",
        "A sourdough starter is a culture of wild yeast and lactic acid bacteria kept in flour and water.",
        "Index funds track a market benchmark instead of trying to beat it.",
    ])]
    indexer.ingest(tmp_path / "train.idx", [str(write_jsonl(tmp_path / "train.jsonl", train))], model="minilm",
                   progress=False)
    indexer.ingest(tmp_path / "test.idx", [str(write_jsonl(tmp_path / "test.jsonl", leaked + fresh))],
                   model="minilm", progress=False)
    r = dedup(tmp_path / "test.idx", against=tmp_path / "train.idx")
    assert sorted(r.drop) == sorted(x["id"] for x in leaked)
    assert {d["id"]: d["kept"] for d in r.dropped} == {x["id"]: x["id"].split("--")[0] for x in leaked}
    assert all(p["a"] in r.drop for p in r.pairs)
    out = run("dedup", tmp_path / "test.idx", "--against", tmp_path / "train.idx", "--json")
    assert sorted(json.loads(out.stdout)["drop"]) == sorted(r.drop)


# ---- bad input ------------------------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors(sets, tmp_path):
    out = run("dedup", tmp_path / "missing.idx")
    assert out.exit_code == 1 and "collection not found" in out.output and "Traceback" not in out.output
    out = run("dedup", sets["text_idx"], "--threshold", "1.5")
    assert out.exit_code == 1 and "[-1, 1]" in out.output
    out = run("dedup", sets["text_idx"], "--against", sets["image_idx"])
    assert out.exit_code == 1 and "refusing" in out.output
    out = run("dedup", sets["text_idx"], "--signal", "combined")
    assert out.exit_code == 1 and "image files" in out.output
    out = run("dedup", sets["text_idx"], "--out", tmp_path / "r.txt")
    assert out.exit_code == 1 and ".json, .csv or .html" in out.output
    out = run("dedup", sets["text_idx"], "--restore", 999)
    assert out.exit_code == 1 and "no Lance version 999" in out.output


# ---- reports and calibration -----------------------------------------------------------------------------------

def test_outputs_json_csv_html(sets, tmp_path):
    for name in ("r.json", "r.csv", "r.html"):
        out = run("dedup", sets["image_idx"], "--out", tmp_path / name, "-q")
        assert out.exit_code == 0, out.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["threshold"] == DEFAULT_THRESHOLDS["image"] and data["groups"]
    assert len((tmp_path / "r.csv").read_text().splitlines()) == len(data["pairs"]) + 1
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and page.count("data:image/jpeg;base64,") >= 4
    assert "below the threshold" in page and "above the threshold" in page
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    text_page = run("dedup", sets["text_idx"], "--out", tmp_path / "t.html", "-q")
    texts = [json.loads(line)["text"] for line in Path(sets["texts"]).read_text().splitlines()]
    page = (tmp_path / "t.html").read_text()
    assert text_page.exit_code == 0 and sum(html.escape(t[:40]) in page for t in texts) >= 4  # snippets


def test_phash_is_robust_to_edits_and_flips(sets):
    folder = Path(sets["images"])
    h = {p.name: phash_pair(Image.open(p).convert("RGB")) for p in folder.glob("c*")}
    assert phash_similarity(h["cat.jpg"], h["cat--flip.jpg"]) >= 0.95  # mirrored hash compared too
    for t in ("resize.jpg", "jpeg.jpg", "brightness.jpg", "png.png"):
        assert phash_similarity(h["cat.jpg"], h[f"cat--{t}"]) >= 0.9, t
    assert phash_similarity(h["cat.jpg"], h["coffee.jpg"]) < 0.75


def test_unreadable_or_odd_inputs_do_not_raise(tmp_path):
    import random

    rng = random.Random(0)
    assert typos("2023", rng) == "2023" and typos("", rng) == "" and typos("abc def", rng) != "abc def"
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert load_item(str(tmp_path / "broken.jpg"), "image") is None
    assert load_item(str(tmp_path / "missing.jpg"), "image") is None
    # EXIF orientation is applied, as at ingest: a 40x20 photo tagged "rotate 90" reads as 20x40.
    img = Image.new("RGB", (40, 20), "red")
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_item(str(tmp_path / "rot.jpg"), "image").size == (20, 40)


def test_combined_signal_finds_every_pair_above_the_threshold(sets):
    """Below 0.85 the candidates must come from cosine >= 2T - 1 (pHash can add at most 1): checked
    against brute force over all image pairs."""
    coll = Collection.open(sets["image_idx"])
    rows = [r for b in coll.scan(["id", "path", "vector"]) for r in b.to_pylist()]
    x = np.array([r["vector"] for r in rows], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = [phash_pair(load_item(r["path"], "image")) for r in rows]
    t = 0.6
    truth = {tuple(sorted((rows[a]["id"], rows[b]["id"]))) for a in range(len(rows)) for b in range(a + 1, len(rows))
             if (float(x[a] @ x[b]) + phash_similarity(hashes[a], hashes[b])) / 2 >= t + 1e-4}
    r = dedup(coll, signal="combined", threshold=t)
    found = {tuple(sorted(p)) for p in found_pairs(r)}
    assert truth and truth <= found, truth - found


def test_calibrate_text_estimates_precision_and_recall(sets):
    cal = calibrate(sets["text_idx"], sample=24)
    assert cal.transforms == ["typos", "reorder", "boilerplate"] and cal.sample == 24
    best = cal.best
    assert best["signal"] == "embedding" and 0.5 <= best["threshold"] <= 0.95
    assert best["recall"] >= 0.9 and best["precision"] >= 0.9
    curve = cal.signals["embedding"]["curve"]
    assert [p["recall"] for p in curve] == sorted((p["recall"] for p in curve), reverse=True)
    out = run("dedup", sets["text_idx"], "--calibrate", "--sample", "8")
    assert out.exit_code == 0 and "best: embedding" in out.output


@pytest.mark.slow
def test_calibrate_images_compares_signals(sets):
    cal = calibrate(sets["image_idx"], sample=8)
    assert {"embedding", "phash", "combined"} <= cal.signals.keys()
    assert "grayscale" in cal.transforms and cal.best["signal"] in ("embedding", "combined")
    assert cal.best["recall"] >= 0.9
    # The combined signal it can recommend is one dedup accepts.
    r = dedup(sets["image_idx"], signal="combined", threshold=cal.signals["combined"]["best"]["threshold"])
    assert pair_scores(found_pairs(r), sets["image_groups"])["precision"] >= 0.99


@pytest.mark.parametrize("method", ["exact", "knn", "semdedup"])
def test_ray_engine_gives_the_local_groups(planted, method, ray_cluster):
    """--engine ray joins the lists in Ray tasks: the same pairs and groups as the local run."""
    local = dedup(planted["idx"], threshold=0.9, method=method)
    result = run("dedup", planted["idx"], "--threshold", 0.9, "--method", method, "--engine", "ray", "--json", "-q")
    assert result.exit_code == 0, result.output
    distributed = json.loads(result.stdout)
    assert distributed["stats"]["engine"] == "ray" and distributed["method"] == method
    assert distributed["groups"] == local.groups and distributed["drop"] == local.drop
    assert {(p["a"], p["b"]) for p in distributed["pairs"]} == found_pairs(local)
    assert len(local.groups) >= 90
