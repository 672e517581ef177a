"""The Ray engine against the local engine on the same inputs: same ids, rows, vectors, error counts;
incremental re-runs; a killed embedding worker and a killed driver. A local Ray cluster (2 CPUs, no
dashboard) is started for this module and shut down after it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from indexer import ingest  # noqa: E402
from indexer.store import Collection  # noqa: E402

from .conftest import WORDS, write_jsonl  # noqa: E402

IGNORED = {"vector"}  # compared separately, to 1e-5


@pytest.fixture
def ray_address(ray_cluster):
    """The session's local cluster (conftest), shared with the index and dedup tests."""
    return ray_cluster


def _table(path) -> dict[str, dict]:
    rows = Collection.open(path).dataset().to_table().to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate ids in the collection"
    return {r["id"]: r for r in rows}


def assert_same_collection(local, remote) -> None:
    a, b = _table(local), _table(remote)
    assert sorted(a) == sorted(b)
    for rid, row in a.items():
        assert {k: v for k, v in row.items() if k not in IGNORED} == \
               {k: v for k, v in b[rid].items() if k not in IGNORED}, rid
        np.testing.assert_allclose(row["vector"], b[rid]["vector"], atol=1e-5)
    errors = lambda p: sorted((e["source"], e["id"], e["reason"]) for e in Collection.open(p).errors())  # noqa: E731
    assert errors(local) == errors(remote)
    assert Collection.open(local).spec.identity() == Collection.open(remote).spec.identity()


def assert_stages_plausible(summary, workers: int) -> None:
    """The Ray engine reports the local engine's stage split: seconds summed over its workers (each
    stage's tasks run in parallel with the others', so at most the wall time times the processes that
    can run them: the embedding workers, the light tasks' pool of 4, the driver's commits), and the items
    each stage saw."""
    from indexer.timing import STAGES

    stages = summary.stages
    assert set(stages) == set(STAGES)
    embedded = summary.added + summary.updated
    for name in STAGES:
        assert stages[name]["seconds"] > 0, name
        assert stages[name]["items_per_s"] > 0, name
    assert sum(s["seconds"] for s in stages.values()) <= summary.seconds * (workers + 4 + 1)
    assert stages["embed"]["seconds"] <= summary.seconds * workers
    # every embedded row went through the model, and was written by a write task
    assert stages["embed"]["items_per_s"] == pytest.approx(embedded / stages["embed"]["seconds"], rel=0.01)
    assert stages["write"]["items_per_s"] == pytest.approx(embedded / stages["write"]["seconds"], rel=0.01)
    assert summary.bottleneck == max(stages, key=lambda s: stages[s]["seconds"])


def _counts(summary) -> tuple:
    return summary.added, summary.updated, summary.skipped, summary.errors, summary.rows


@pytest.fixture
def text_sources(tmp_path, sample_corpus) -> list[str]:
    """The sample texts, a JSONL with labels, user fields and bad rows, and a folder of documents."""
    rng = np.random.default_rng(0)
    rows = [{"id": f"r{i}", "text": " ".join(rng.choice(WORDS, 12)), "label": ["x", "y"][i % 2],
             "score": i, "tags": ["a", "b"][: i % 3]} for i in range(150)]
    rows += [{"id": "r3", "text": "a duplicate id: the first occurrence is kept"}, {"id": "empty", "text": " "},
             {"id": "no-text", "body": "where is the text"}]
    extra = write_jsonl(tmp_path / "extra.jsonl", rows)
    with open(extra, "a") as fh:
        fh.write("{not json\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(5):
        (docs / f"note{i}.md").write_text(f"# Note {i}\n\n" + " ".join(rng.choice(WORDS, 30)) + "\n")
    (docs / "empty.txt").write_text("")
    return [str(sample_corpus["texts"]), str(extra), str(docs)]


def test_texts_match_the_local_engine_and_rerun_incrementally(tmp_path, ray_address, text_sources):
    local, remote = tmp_path / "local.idx", tmp_path / "ray.idx"
    s_local = ingest(local, text_sources, model="minilm", progress=False, batch_size=16)
    s_ray = ingest(remote, text_sources, model="minilm", progress=False, batch_size=16, engine="ray", workers=2)
    assert _counts(s_ray) == _counts(s_local)
    assert s_ray.errors == 5 and s_ray.added == 48 + 150 + 5
    assert_same_collection(local, remote)
    assert_stages_plausible(s_ray, workers=2)

    # Re-run after edits: one text changed, one label changed, one row new, the rest unchanged.
    extra = Path(text_sources[1])
    lines = extra.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace('"text": "', '"text": "changed ')
    lines[1] = lines[1].replace('"label": "y"', '"label": "z"')
    lines.insert(5, '{"id": "new", "text": "a row added later"}\n')
    extra.write_text("".join(lines))
    s_local = ingest(local, text_sources, progress=False, batch_size=16)
    s_ray = ingest(remote, text_sources, progress=False, batch_size=16, engine="ray", workers=2)
    assert _counts(s_ray) == _counts(s_local)
    assert (s_ray.added, s_ray.updated, s_ray.skipped) == (1, 2, 48 + 148 + 5)
    assert_same_collection(local, remote)
    assert _table(remote)["r1"]["label"] == "z"


def test_images_match_the_local_engine(tmp_path, ray_address, sample_corpus):
    folder = tmp_path / "imgs"
    shutil.copytree(sample_corpus["images"], folder)
    (folder / "zero.jpg").write_bytes(b"")
    good = (folder / "cat.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "text.png").write_text("not a png")
    local, remote = tmp_path / "local.idx", tmp_path / "ray.idx"
    s_local = ingest(local, [str(folder)], model="efficientnet-lite0", progress=False, workers=0)
    s_ray = ingest(remote, [str(folder)], model="efficientnet-lite0", progress=False, engine="ray", workers=1)
    assert _counts(s_ray) == _counts(s_local)
    assert s_ray.errors == 3
    assert_same_collection(local, remote)
    assert_stages_plausible(s_ray, workers=1)
    # images are decoded in a stage of their own, before the model
    assert s_ray.stages["preprocess"]["items_per_s"] == pytest.approx(
        s_ray.added / s_ray.stages["preprocess"]["seconds"], rel=0.01)


@pytest.mark.slow
def test_jpegs_left_to_the_embedding_workers_decoder(tmp_path, ray_address, sample_corpus, monkeypatch):
    """The Ray engine's GPU path (decode tasks pass plain JPEGs on undecoded; each embedding actor decodes
    them where its model runs, with torchvision's decoder), forced on the CPU: the same rows, vectors and
    error lines as the local engine's GPU path, and not PIL's vectors (which shrinks large JPEGs)."""
    import torch

    from indexer.ingest import local, ray_engine

    folder = tmp_path / "imgs"
    shutil.copytree(sample_corpus["images"], folder)
    good = (folder / "cat.jpg").read_bytes()
    (folder / "garbage.jpg").write_bytes(good[:700] + np.random.default_rng(0).bytes(3000) + b"\xff\xd9")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "text.png").write_text("not a png")
    kw = {"model": "efficientnet-lite0", "progress": False}
    pil = tmp_path / "pil.idx"
    ingest(pil, [str(folder)], workers=0, **kw)
    monkeypatch.setattr(local, "_jpeg_device", lambda embedder: torch.device("cpu"))
    monkeypatch.setattr(ray_engine, "_gpu_decodes_jpegs", lambda plan, gpus_per_worker: True)
    local_path, remote = tmp_path / "local.idx", tmp_path / "ray.idx"
    s_local = ingest(local_path, [str(folder)], workers=0, **kw)
    s_ray = ingest(remote, [str(folder)], engine="ray", workers=1, **kw)
    assert _counts(s_ray) == _counts(s_local) and s_ray.added == 16 and s_ray.errors == 3
    assert_same_collection(local_path, remote)
    decoded_whole, shrunk = _table(remote), _table(pil)
    assert max(1 - float(np.dot(decoded_whole[i]["vector"], shrunk[i]["vector"])) for i in shrunk) > 1e-4


def test_ray_flags_and_sources_it_refuses(tmp_path, ray_address, text_sources):
    from indexer.errors import IndexerError

    with pytest.raises(IndexerError, match="--address: only for another --engine than local"):
        ingest(tmp_path / "a.idx", text_sources, model="minilm", address="auto", progress=False)
    with pytest.raises(IndexerError, match="stdin"):
        ingest(tmp_path / "c.idx", ["-"], model="minilm", engine="ray", progress=False)
    with pytest.raises(IndexerError, match="unknown engine 'spark'; known: local, ray"):
        ingest(tmp_path / "d.idx", text_sources, engine="spark", progress=False)
    with pytest.raises(IndexerError, match="2 CPUs and 0 GPUs: 3 workers of 1 CPUs and 0 GPUs do not fit"):
        ingest(tmp_path / "e.idx", text_sources, model="minilm", engine="ray", workers=3, progress=False)


def test_precomputed_vectors_match_the_local_engine(tmp_path, ray_address):
    vectors = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    rows = [{"id": f"p{i}", "emb": v.tolist(), "text": f"row {i}"} for i, v in enumerate(vectors[:50])]
    rows.append({"id": "short", "emb": [1.0, 2.0]})  # wrong dimension: an error line
    table = write_jsonl(tmp_path / "v.jsonl", rows)
    local, remote = tmp_path / "local.idx", tmp_path / "ray.idx"
    for coll, engine in ((local, "local"), (remote, "ray")):
        ingest(coll, [str(tmp_path / "v.npy")], model="none", progress=False, engine=engine)
        s = ingest(coll, [str(table)], vector_field="emb", progress=False, engine=engine)
        assert (s.added, s.errors) == (50, 1)
    assert_same_collection(local, remote)


def _many_texts(path: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    return write_jsonl(path, [{"id": f"t{i}", "text": " ".join(rng.choice(WORDS, 40))} for i in range(n)])


def _embedding_workers() -> list:
    """The embedding actors' processes of the cluster this test session started (its descendants)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "MapBatches(_Embed)" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_a_killed_embedding_worker_is_retried(tmp_path, ray_address, minilm):
    src = _many_texts(tmp_path / "many.jsonl", 1500)
    killed: list[int] = []

    def kill_one_worker():
        deadline = time.time() + 300
        while time.time() < deadline:
            workers = _embedding_workers()
            if workers and Collection.open(coll).count() > 0:
                workers[0].send_signal(signal.SIGKILL)
                killed.append(workers[0].pid)
                return
            time.sleep(0.5)

    coll = tmp_path / "k.idx"
    Collection.create(coll, minilm.spec)  # so the killer thread can watch its row count
    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    s = ingest(coll, [str(src)], model="minilm", progress=False, batch_size=16, engine="ray", workers=2)
    killer.join()
    assert killed, "no embedding worker was found to kill"
    assert (s.added, s.errors, s.rows) == (1500, 0, 1500)
    rows = _table(coll)
    assert sorted(rows) == sorted(f"t{i}" for i in range(1500))
    texts = [r["text"] for r in rows.values()]
    np.testing.assert_allclose(np.stack([r["vector"] for r in rows.values()])[:64], minilm.embed(texts[:64]),
                               atol=1e-5)


@pytest.mark.slow
def test_a_killed_driver_resumes_exactly(tmp_path, ray_address):
    src = _many_texts(tmp_path / "many.jsonl", 3000)
    coll = tmp_path / "d.idx"
    cmd = [sys.executable, "-m", "indexer.cli", "ingest", str(coll), str(src), "--model", "minilm", "-q",
           "--batch-size", "16", "--engine", "ray", "--address", ray_address, "--workers", "2"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and child.poll() is None:
            if Collection.exists(coll) and Collection.open(coll).count() > 0:
                break
            time.sleep(0.3)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    partial = Collection.open(coll).count()
    assert 0 < partial < 3000
    done = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _table(coll)
    assert sorted(rows) == sorted(f"t{i}" for i in range(3000))
    summary = json.loads(done.stdout)
    assert (summary["skipped"], summary["added"]) == (partial, 3000 - partial)


def test_chunked_documents_match_the_local_engine(tmp_path, ray_address):
    """Documents cut into passages on the cluster: the same passages, offsets and vectors; a shorter new
    version of a document leaves no stale passage behind, as locally."""
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        sections = [f"## Part {k}\n\n" + " ".join(rng.choice(WORDS, 60)) for k in range(3)]
        (docs / f"doc{i}.md").write_text(f"# Doc {i}\n\n" + "\n\n".join(sections) + "\n")
    (docs / "blank.md").write_text("   ")
    local, remote = tmp_path / "local.idx", tmp_path / "ray.idx"
    kw = {"model": "minilm", "progress": False, "chunk_tokens": 48, "chunk_overlap": 8}
    s_local = ingest(local, [str(docs)], **kw)
    s_ray = ingest(remote, [str(docs)], engine="ray", workers=1, **kw)
    assert _counts(s_ray) == _counts(s_local) and s_local.rows > 4 * 3
    assert_same_collection(local, remote)
    assert Collection.open(remote).manifest.chunking == {"tokens": 48, "overlap": 8}

    (docs / "doc0.md").write_text("# Doc 0\n\nNow only one short paragraph.\n")
    s_local = ingest(local, [str(docs)], progress=False)
    s_ray = ingest(remote, [str(docs)], engine="ray", workers=1, progress=False)
    assert _counts(s_ray) == _counts(s_local) and s_ray.removed == s_local.removed > 0
    assert_same_collection(local, remote)
    assert [i for i in _table(remote) if i.startswith("doc0.md#")] == ["doc0.md#0"]
