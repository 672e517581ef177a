"""Dedup on generated near-duplicate sets with known ground truth: real photos under transformations,
texts with small edits, and planted near-duplicates among random vectors."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import indexer
from indexer.cli import cli
from indexer.errors import IndexerError
from indexer.index import FaissIndex, build_index
from indexer.store import Collection
from indexer.tasks.dedup import DEFAULT_THRESHOLDS, components, dedup
from indexer.tasks.dedup_calibrate import (
    calibrate,
    pair_scores,
    phash_pair,
    phash_similarity,
    write_near_duplicate_sets,
)

from .conftest import write_jsonl


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def found_pairs(report) -> set[tuple[str, str]]:
    return {(p["a"], p["b"]) for p in report.pairs}


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
    # Undo.
    result = run("dedup", path, "--restore", r["version_before"], "--json")
    assert result.exit_code == 0, result.output
    coll = Collection.open(path)
    assert {x["id"] for b in coll.scan(["id"]) for x in b.to_pylist()} == before_ids
    index = FaissIndex.open(coll)
    assert index.is_current(coll) and int(index.live.sum()) == len(before_ids)
    assert sorted(dedup(path).drop) == sorted(r["drop"])


def test_without_apply_nothing_changes(sets):
    coll = Collection.open(sets["text_idx"])
    version, rows = coll.version(), coll.count()
    r = dedup(coll)
    assert r.drop and not r.applied and Collection.open(sets["text_idx"]).version() == version
    assert Collection.open(sets["text_idx"]).count() == rows


def test_apply_takes_the_write_lock(sets, tmp_path):
    path = tmp_path / "t.idx"
    shutil.copytree(sets["text_idx"], path)
    with Collection.open(path).write_lock(), pytest.raises(IndexerError, match="being written"):
        dedup(path, apply=True)


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
