"""Concurrency on real processes and a real LanceDB collection: two writers at once (the second waits for
the first, saying once which process it waits for; both land), and searches during writes (the Python API
in another process, HTTP against a real `indexer serve`) during an ingest and during `dedup --apply`:
every answer valid, no 5xx, and each the exact top k of one committed version."""

from __future__ import annotations

import json
import re
import subprocess
import time

import numpy as np
import pytest

import indexer
from indexer.store import Collection
from indexer.tasks import search as search_module

from ..serving import running_server
from .faults import stored
from .load import (
    K,
    Searchers,
    cli,
    committed_versions,
    exact_top,
    finish,
    problems,
    query_vectors,
    rows_file,
    vector,
)

WAITED = re.compile(r"is being written by process \d+ \(([\w ]+), since [\d:]+\); waiting for it to finish")


@pytest.mark.slow
def test_two_ingests_at_once_one_waits_and_both_land(tmp_path, record_property):
    """A second ingest into a new collection started while the first holds it: it waits for the first
    (saying so once), then adds its own rows; the ids both share are stored once. The first reads its
    rows from stdin, held open until the second says it waits: started freely, the first sometimes
    finished before the second reached the lock, and neither waited."""
    shared = [f"s{i}" for i in range(2000)]
    sources = {name: rows_file(tmp_path / f"{name}.jsonl", [f"{name}{i}" for i in range(10000)] + shared)
               for name in ("a", "b")}
    coll = tmp_path / "c.idx"
    args = ("--vector-field", "vector", "--model", "none", "--json", "-q")
    first = cli("ingest", str(coll), "-", *args, stdin=True)
    second = None
    head, rest = sources["a"].read_text().split("\n", 1)
    try:
        first.stdin.write(head + "\n")  # its vector's dim, read before the collection is made
        first.stdin.flush()
        _wait_for_holder(coll, first)
        second = cli("ingest", str(coll), str(sources["b"]), *args)
        assert _first_wait(second) == "ingest"
        results = [finish(first, stdin=rest), finish(second)]
    finally:
        for p in (first, second):
            if p is not None:
                p.kill()
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert not any(WAITED.search(err) for _, _, err in results)  # the second said it once: the line read above
    ids = [r["id"] for r in stored(coll)]
    union = {f"{n}{i}" for n in "ab" for i in range(10000)} | set(shared)
    record_property("rows_lost", len(union - set(ids)))
    assert len(ids) == len(set(ids)) == len(union) and set(ids) == union
    added = [json.loads(out)["added"] for _, out, _ in results]
    assert added == [12000, 10000]  # the second found the shared rows stored, unchanged


def _wait_for_holder(coll, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Return once `proc` holds the collection's write lock (the lock file names the holder)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        try:
            if json.loads((coll / ".lock").read_text() or "{}").get("pid") == proc.pid:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"process {proc.pid} did not take the write lock in {timeout} s")


def _first_wait(proc: subprocess.Popen) -> str:
    """The purpose `proc` says it waits for: its first stderr line must say so (read while it runs)."""
    line = proc.stderr.readline()
    found = WAITED.findall(line)
    assert len(found) == 1, line + proc.stderr.read()[-2000:]
    return found[0]


@pytest.mark.slow
def test_index_and_ingest_at_once(tmp_path, record_property):
    """`indexer index` and `indexer ingest` (new rows and changed ones) started while another writer holds
    the collection: both wait for it, then run one after the other (either may go first; started
    freely, the index often finished before the ingest began, and neither waited), and the index ends
    current, holding every row at its newest version."""
    base = [f"r{i}" for i in range(12000)]
    coll = tmp_path / "c.idx"
    rc, _, err = finish(cli("ingest", str(coll), str(rows_file(tmp_path / "base.jsonl", base)),
                            "--vector-field", "vector", "--model", "none", "-q"))
    assert rc == 0, err
    changed, new = base[:500], [f"n{i}" for i in range(3000)]
    update = rows_file(tmp_path / "update.jsonl", changed + new, gen=1)
    procs = []
    try:
        with Collection.open(coll).write_lock("a test"):
            procs = [cli("index", str(coll), "--json", "-q"),
                     cli("ingest", str(coll), str(update), "--vector-field", "vector", "-q")]
            assert [_first_wait(p) for p in procs] == ["a test", "a test"]
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert not any(WAITED.search(err) for _, _, err in results)  # each said it once, not again for the other
    info = indexer.info(coll)
    assert info["index"]["current"] and info["rows"] == len(base) + len(new)
    record_property("rows_lost", len(base) + len(new) - info["rows"])
    for item_id, gen in [(i, 1) for i in changed[:20] + new[-20:]] + [(i, 0) for i in base[-20:]]:
        top = indexer.search(coll, vector=vector(item_id, gen).tolist(), k=1, engine="faiss", fields="text")[0]
        assert top["id"] == item_id and top["text"] == f"{item_id} gen {gen}" and top["score"] > 0.9999


@pytest.mark.slow
def test_searches_during_ingest_and_dedup_apply(tmp_path, record_property):
    """API and HTTP searches in a loop while an ingest adds and replaces rows (several commits, a
    compaction, which moves rows) and while `dedup --apply` deletes duplicates; the collection has a FAISS index, so answers
    come from the exact path during the writes and from the caught-up index between them."""
    base = [f"r{i}" for i in range(6000)]  # 12 commits of 512: the update's commits pass 16 fragments
    same_as = {f"d{i}": f"r{i}" for i in range(100)}  # d_i duplicates r_i
    coll = tmp_path / "c.idx"
    rc, _, err = finish(cli("ingest", str(coll), str(rows_file(tmp_path / "base.jsonl", base + list(same_as), 0,
                                                               same_as)),
                            "--vector-field", "vector", "--model", "none", "--batch-size", "8", "-q"))
    assert rc == 0, err
    assert finish(cli("index", str(coll), "-q"))[0] == 0
    changed, new = base[1000:2000], [f"n{i}" for i in range(1500)]
    update = rows_file(tmp_path / "update.jsonl", changed + new, gen=1)
    phases = {}
    with running_server([coll]) as url:
        searchers = Searchers(coll, tmp_path, url)
        searchers.wait_for_answers()
        before = len(searchers.api()), len(searchers.http)
        rc, _, err = finish(cli("ingest", str(coll), str(update), "--vector-field", "vector", "--batch-size", "8", "-q"))
        assert rc == 0, err
        after_ingest = len(searchers.api()), len(searchers.http)
        rc, out, err = finish(cli("dedup", str(coll), "--threshold", "0.9999", "--apply", "--json", "-q"))
        assert rc == 0, err
        after_dedup = len(searchers.api()), len(searchers.http)
        api, http = searchers.stop()
    phases = {"during ingest": np.subtract(after_ingest, before), "during dedup": np.subtract(after_dedup, after_ingest)}
    report = json.loads(out)
    versions, fragments = committed_versions(coll)
    tops = [exact_top(v, query_vectors(), same_as) for v in versions]
    bad = [(n, p) for n, a in enumerate(api + http) for p in problems(a, query_vectors(), versions, tops, same_as)]
    five = sum(1 for a in http if (a["status"] or 500) >= 500)
    final = {r["id"] for r in stored(coll)}
    expected = (set(base) | set(same_as) | set(new)) - set(report["drop"])
    record_property("answers", len(api) + len(http))
    record_property("5xx", five)
    record_property("rows_lost", len(expected - final))
    assert not bad, f"{len(bad)} problems in {len(api) + len(http)} answers, first: {bad[:5]}"
    assert five == 0 and all(a["status"] == 200 for a in http)
    assert final == expected and report["applied"] and len(report["drop"]) == len(same_as)
    for phase, counts in phases.items():  # each searcher answered while each writer ran
        assert min(counts) >= 3, (phase, counts)
    assert max(fragments) > 16 and fragments[-1] < 4  # the ingest compacted while searched: rows moved


def test_a_commit_between_ranking_and_reading_the_hits_changes_nothing(tmp_path, monkeypatch):
    """The window a writer's commit can fall into, made certain: right after the exact ranking, another
    handle deletes the best hit and compacts the table (every row moves). The answer is still the ranked
    version's, fields and all (reading them at the latest version made Lance's take panic: an error no
    `except Exception` catches, which stopped the server's search loop)."""
    base = [f"r{i}" for i in range(3000)]
    coll = tmp_path / "c.idx"
    indexer.ingest(coll, [str(rows_file(tmp_path / "base.jsonl", base))], vector_field="vector", model="none",
                   batch_size=8, progress=False)
    q = query_vectors()[0].tolist()
    expected = indexer.search(coll, vector=q, k=K, fields="text,gen", engine="exact")
    ranked = search_module.exact_search

    def ranked_then_written(*args, **kwargs):
        out = ranked(*args, **kwargs)
        other = Collection.open(coll)
        with other.write_lock("test"):
            other.delete([expected[0]["id"]])
            other.table.compact_files()
        return out

    monkeypatch.setattr(search_module, "exact_search", ranked_then_written)
    assert indexer.search(coll, vector=q, k=K, fields="text,gen", engine="exact") == expected
    monkeypatch.undo()
    latest = indexer.search(coll, vector=q, k=K, fields="text,gen", engine="exact")
    assert latest[: K - 1] == expected[1:]  # the delete did land
