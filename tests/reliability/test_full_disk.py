"""Storage that refuses writes, for real: a tmpfs of 1 MB that `ingest` and `index` fill, and a collection on
a read-only mount. Each command fails with one line (no traceback), the collection stays readable at its
last committed version, and once the storage takes writes again the same command completes with exactly
the expected rows. Mounting needs root (skipped with the reason elsewhere)."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

import indexer
from indexer.store import Collection

from ..tiny_models import tiny_bert
from .faults import CLI, ENV, index_problems, run_cli, stored


def mount(point: Path, options: str) -> None:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({(proc.stderr or proc.stdout).strip() or 'not permitted'}): "
                    "the full-disk and read-only tests need root")


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs, unmounted at the end whatever happens."""
    point = tmp_path / "disk"
    point.mkdir()
    mount(point, "size=1m")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return f"hf:{tiny_bert(tmp_path_factory.mktemp('tiny-bert'))}"


def long_texts(path: Path, n: int) -> tuple[Path, set[str]]:
    """n texts of ~3 KB of random letters (Lance compresses them little): 256 of them fill most of 1 MB."""
    rng = random.Random(0)
    rows = [{"id": f"d{i}", "text": " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=7))
                                             for _ in range(375))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {r["id"] for r in rows}


def ingest_args(coll: Path, source: Path, model: str) -> list[str]:
    # Batches of 4: a commit every 256 texts, so the first commits land before the disk fills.
    return ["ingest", str(coll), str(source), "--model", model, "--pooling", "mean", "--batch-size", "4",
            "--device", "cpu", "-q"]


def fails_in_one_line(args: list[str], says: str) -> str:
    proc = subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: ") and says in lines[-1], proc.stderr[-3000:]
    return lines[-1]


def readable(coll: Path) -> list[str]:
    """The collection opens, counts, and answers a search by a stored item; its ids."""
    ids = [r["id"] for r in stored(coll, ("id",))]
    opened = Collection.open(coll)
    assert opened.count() == len(ids) > 0
    hits = indexer.search(opened, id=ids[0], k=3)
    assert hits and all(h["id"] in set(ids) for h in hits)
    return ids


@pytest.mark.slow
def test_ingest_on_a_full_disk_fails_in_one_line_and_resumes_once_there_is_space(tmp_path, small_disk, model):
    source, expected = long_texts(tmp_path / "texts.jsonl", 700)
    coll = small_disk / "texts.idx"
    line = fails_in_one_line(ingest_args(coll, source, model), "no space left")
    assert "run the same command again" in line
    ids = readable(coll)  # at its last committed version: whole commits of 256, nothing half-written
    assert len(ids) % 256 == 0 and len(set(ids)) == len(ids) and set(ids) <= expected
    remount(small_disk, "size=64m")
    run_cli(ingest_args(coll, source, model))
    ids = [r["id"] for r in stored(coll, ("id",))]
    assert sorted(ids) == sorted(expected)


@pytest.mark.slow
def test_index_on_a_full_disk_fails_in_one_line_and_builds_once_there_is_space(tmp_path, small_disk, model):
    source, expected = long_texts(tmp_path / "texts.jsonl", 200)
    coll = small_disk / "texts.idx"
    remount(small_disk, "size=64m")
    run_cli(ingest_args(coll, source, model))
    used = sum(f.stat().st_size for f in small_disk.rglob("*") if f.is_file())
    remount(small_disk, f"size={used + 64 * 1024}")  # room for a little, not for the index files
    fails_in_one_line(["index", str(coll), "--kind", "flat", "-q"], "no space left")
    assert sorted(readable(coll)) == sorted(expected)
    remount(small_disk, "size=64m")
    run_cli(["index", str(coll), "--kind", "flat", "-q"])
    assert index_problems(coll) == []


@pytest.mark.slow
def test_a_read_only_collection_refuses_writes_in_one_line_and_still_answers(tmp_path, small_disk, model):
    source, expected = long_texts(tmp_path / "texts.jsonl", 40)
    more, _ = long_texts(tmp_path / "more.jsonl", 60)
    coll = small_disk / "texts.idx"
    remount(small_disk, "size=64m")
    run_cli(ingest_args(coll, source, model))
    run_cli(["index", str(coll), "--kind", "flat", "-q"])
    remount(small_disk, "ro")
    fails_in_one_line(ingest_args(coll, more, model), "read-only file system")
    fails_in_one_line(["index", str(coll), "--kind", "flat", "-q"], "read-only file system")
    fails_in_one_line(["dedup", str(coll), "--threshold", "0.5", "--apply", "-q"], "read-only file system")
    assert sorted(readable(coll)) == sorted(expected)
    for args in (["search", str(coll), "--id", "d1", "-k", "3", "--json"], ["info", str(coll), "--json"]):
        proc = subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        json.loads(proc.stdout)
    remount(small_disk, "rw")
    run_cli(ingest_args(coll, more, model))
    assert {r["id"] for r in stored(coll, ("id",))} == expected | {f"d{i}" for i in range(60)}
