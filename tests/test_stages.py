"""Every ingest reports where its time went: seconds and items/s per stage, the slowest one named."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from indexer.cli import cli
from indexer.ingest import ingest
from indexer.timing import STAGES, Stages


def _check_stages(summary: dict) -> None:
    stages = summary["stages"]
    assert set(stages) == set(STAGES)
    assert all(s["seconds"] >= 0 and s["items_per_s"] >= 0 for s in stages.values())
    # read, preprocess and embed run one after another in the run; write overlaps them in its own thread
    slack = 0.05
    assert sum(stages[s]["seconds"] for s in ("read", "preprocess", "embed")) <= summary["seconds"] + slack
    assert stages["write"]["seconds"] <= summary["seconds"] + slack
    assert stages["embed"]["seconds"] > 0 and stages["write"]["seconds"] > 0
    assert summary["bottleneck"] == max(stages, key=lambda s: stages[s]["seconds"])


def test_text_ingest_json_reports_stages(tmp_path, sample_corpus):
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "t.idx"), str(sample_corpus["texts"]),
                                      "--model", "minilm", "-q", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    _check_stages(summary)
    # 48 texts: each stage saw every one of them
    stages = summary["stages"]
    assert stages["embed"]["items_per_s"] == pytest.approx(48 / stages["embed"]["seconds"], rel=0.01)


def test_image_ingest_reports_stages_and_human_line_names_slowest(tmp_path, sample_corpus, resnet18_weights):
    s = ingest(tmp_path / "i.idx", [str(sample_corpus["images"])], model="resnet18",
               weights=str(resnet18_weights), progress=False)
    _check_stages(s.to_dict())
    assert s.stages["read"]["seconds"] > 0 and s.stages["preprocess"]["seconds"] > 0
    assert f"slowest stage: {s.bottleneck}" in s.line()


def test_verbose_logs_stages(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("cats chase mice")
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "c.idx"), str(docs), "--model", "minilm", "-v"])
    assert result.exit_code == 0, result.output
    assert "stages: read " in result.stderr and "slowest stage" in result.stdout


def test_stages_iterate_counts_items():
    stages = Stages()
    assert list(stages.iterate("read", range(5))) == [0, 1, 2, 3, 4]
    assert stages.items["read"] == 5 and stages.bottleneck() == "read"
    assert Stages().bottleneck() is None


def test_read_ahead_keeps_order_raises_in_place_and_stops_when_closed():
    import threading

    from indexer.ingest.loader import read_ahead

    assert list(read_ahead(range(1000), 64, chunk=16)) == list(range(1000))

    def broken():
        yield from range(40)
        raise ValueError("row 40 is broken")

    got = []
    with pytest.raises(ValueError, match="row 40"):
        for item in read_ahead(broken(), 64, chunk=16):
            got.append(item)
    assert got == list(range(40))  # every row before the failure, then the failure

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    reader = read_ahead(endless(), 64, chunk=16)
    assert [next(reader) for _ in range(100)] == list(range(100))
    reader.close()  # a consumer that stops early: the thread stops and closes the source
    assert closed.wait(5) and not any(t.name == "read-ahead" for t in threading.enumerate())


def test_text_ingest_reading_ahead_stores_the_same(tmp_path, sample_corpus, monkeypatch):
    """The GPU's way of reading text (a thread ahead of the model), forced on the CPU, in chunks of 4
    rows at most 8 ahead so that the reader waits for the consumer many times: the same rows as reading
    in line."""
    import numpy as np

    from indexer.ingest import loader, local
    from indexer.store import Collection

    def stored(path):
        coll = Collection.open(path)
        return {r["id"]: r["vector"] for b in coll.scan(["id", "vector"]) for r in b.to_pylist()}

    plain = ingest(tmp_path / "plain.idx", [str(sample_corpus["texts"])], model="minilm", batch_size=4,
                   progress=False)
    monkeypatch.setattr(local, "_reads_ahead", lambda embedder: True)
    monkeypatch.setattr(local, "read_ahead", lambda items, ahead: loader.read_ahead(items, 8, chunk=4))
    ahead = ingest(tmp_path / "ahead.idx", [str(sample_corpus["texts"])], model="minilm", batch_size=4,
                   progress=False)
    assert (ahead.added, ahead.errors) == (plain.added, plain.errors) == (48, 0)
    a, b = stored(tmp_path / "plain.idx"), stored(tmp_path / "ahead.idx")
    assert a.keys() == b.keys() and all(np.allclose(a[i], b[i], atol=1e-5) for i in a)
