"""Damaged files in a collection: each is detected with a message that names the file and the command
that recovers (`indexer index COLL` for the derived FAISS files, `indexer restore COLL --version N` for
the Lance table), exit 1, no traceback; and the recovery works. Precomputed vectors keep this fast."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from indexer.cli import cli

FIRST, SECOND = 300, 40


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _damage(path, how: str) -> None:
    """Cut the file in half, or flip 16 bytes in its middle keeping its size (only a checksum tells).
    (The FAISS files are re-hashed when their mtime moves: bit rot that keeps the mtime is not caught on
    every open, which would cost a full read of a GB index.)"""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A collection of two commits (300 vectors, then 40 more) with a FAISS index."""
    d = tmp_path_factory.mktemp("damage")
    rng = np.random.default_rng(0)
    np.save(d / "a.npy", rng.standard_normal((FIRST, 16)).astype(np.float32))
    np.save(d / "b.npy", rng.standard_normal((SECOND, 16)).astype(np.float32))
    coll = d / "c.idx"
    for src in ("a.npy", "b.npy"):
        result = run("ingest", coll, d / src, "--model", "none", "-q")
        assert result.exit_code == 0, result.output
    assert run("index", coll, "--kind", "flat", "-q").exit_code == 0
    return coll


@pytest.fixture
def coll(pristine, tmp_path):
    copy = tmp_path / "c.idx"
    shutil.copytree(pristine, copy)
    return copy


def _search(coll, rid="a.npy:1"):
    from indexer.index import _OPEN
    from indexer.index.exact import _RESIDENT
    from indexer.store.collection import _OPENED

    for kept in (_OPEN, _OPENED, _RESIDENT):  # each CLI run is a new process: nothing kept open from the last one
        kept.clear()
    return run("search", coll, "--id", rid, "-k", 3, "--json")


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    message = result.output.strip().splitlines()[-1]
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _versions(coll):
    return json.loads(run("restore", coll, "--list", "--json").stdout)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_manifest_json(coll, how):
    _damage(coll / "manifest.json", how)
    _one_line_error(_search(coll), "manifest.json is damaged")


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("name", ["faiss.index", "rows.parquet"])
def test_damaged_index_files_name_the_rebuild(coll, name, how):
    before = json.loads(_search(coll).stdout)
    _damage(coll / "index" / name, how)
    _one_line_error(_search(coll), f"index/{name}", f"indexer index {coll}")
    assert run("index", coll, "--kind", "flat", "-q").exit_code == 0
    assert json.loads(_search(coll).stdout) == before


def test_damaged_latest_lance_manifest_restores_the_previous_version(coll):
    before = json.loads(_search(coll).stdout)
    latest = max(_versions(coll), key=lambda v: v["version"])
    manifest = coll / latest["file"]
    _damage(manifest, "truncate")
    _one_line_error(_search(coll), latest["file"], f"indexer restore {coll} --list", "--version N")
    _one_line_error(run("info", coll), latest["file"])
    listed = _versions(coll)
    assert [v["readable"] for v in listed] == [False] + [True] * (len(listed) - 1)
    good = listed[1]
    assert good["rows"] == FIRST + SECOND
    result = run("restore", coll, "--version", good["version"], "--json")
    assert result.exit_code == 0, result.output
    restored = json.loads(result.stdout)
    assert restored["rows"] == FIRST + SECOND and restored["moved"] == [f"damaged/{manifest.name}"]
    assert (coll / "damaged" / manifest.name).exists()
    assert json.loads(_search(coll).stdout) == before
    info = json.loads(run("info", coll, "--json").stdout)
    assert info["rows"] == FIRST + SECOND and info["index"]["current"]


def test_damaged_lance_data_file_restores_a_version_without_it(coll, pristine):
    """The second commit's data file cut in half: reads fail naming it; the first commit's version has
    every row it had, and the collection carries on from there (the next ingest re-adds the rest)."""
    import lance

    pristine_dir = pristine.parent
    before = json.loads(_search(coll).stdout)
    ds = lance.dataset(str(coll / "lance" / "items.lance"))
    first = {f.data_files()[0].path for f in ds.checkout_version(1).get_fragments()}
    newer = [f.data_files()[0].path for f in ds.get_fragments() if f.data_files()[0].path not in first]
    assert len(newer) == 1
    data_file = f"lance/items.lance/data/{newer[0]}"
    _damage(coll / data_file, "truncate")
    _one_line_error(_search(coll), data_file, f"indexer restore {coll}")
    result = run("restore", coll, "--version", 1, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == FIRST
    hits = json.loads(_search(coll).stdout)
    assert len(hits) == 3 and all(h["id"].startswith("a.npy:") for h in hits)
    # The collection carries on from there: the next ingest adds the lost commit's rows again.
    again = run("ingest", coll, pristine_dir / "b.npy", "-q", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["rows"] == FIRST + SECOND
    assert [h["id"] for h in json.loads(_search(coll).stdout)] == [h["id"] for h in before]


def test_restore_usage_errors(coll):
    assert run("restore", coll).exit_code == 2
    _one_line_error(run("restore", coll, "--version", 99), "has no version 99")


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_finetuned_weights(tmp_path, tiny_bert_dir, how):
    """A fine-tuned model directory's weights are checked against the sha256 its manifest recorded."""
    import indexer

    from ..conftest import WORDS, write_jsonl

    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(WORDS[i * 8 : i * 8 + 8], 5)), "label": f"topic{i}"}
            for i in range(3) for _ in range(12)]
    data = write_jsonl(tmp_path / "topics.jsonl", rows)
    out = tmp_path / "ft"
    indexer.finetune([str(data)], "label", model=f"hf:{tiny_bert_dir}", pooling="mean", unfreeze=0, out=out, epochs=1,
                     batch_size=8, device="cpu", progress=False)
    assert run("ingest", tmp_path / "ok.idx", data, "--model", out, "-q").exit_code == 0
    _damage(out / "model.safetensors", how)
    _one_line_error(run("ingest", tmp_path / "c.idx", data, "--model", out, "-q"), "model.safetensors",
                    "damaged", "fine-tune again")
