"""The benchmarks' shared module (scripts/benchlib.py): what it measures and writes is what the scripts report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import indexer
import indexer.index

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchlib  # noqa: E402


def test_latency_ms_reports_percentiles_mean_and_max_in_milliseconds():
    lat = benchlib.latency_ms([0.001 * k for k in range(1, 101)], (50, 90, 99))
    assert lat["p50_ms"] == pytest.approx(50.5) and lat["p90_ms"] == pytest.approx(90.1)
    assert lat["p99_ms"] == pytest.approx(99.01) and lat["mean_ms"] == pytest.approx(50.5)
    assert lat["max_ms"] == pytest.approx(100.0)
    assert np.isnan(benchlib.latency_ms([])["p50_ms"])  # no successful call: NaN, not an exception


def test_timed_and_measured_return_the_result_and_the_time():
    out, seconds = benchlib.timed(sorted, [3, 1, 2])
    assert out == [1, 2, 3] and seconds >= 0
    out, seconds, rss = benchlib.measured(np.ones, (1000, 1000))
    assert out.shape == (1000, 1000) and seconds >= 0 and (rss is None or rss >= 0)


def test_clustered_vectors_are_unit_length_and_near_their_centre():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 16)).astype(np.float32)
    x, topic = benchlib.clustered(1000, centres, 0.1, rng, chunk=300)  # several chunks
    assert x.shape == (1000, 16) and x.dtype == np.float32 and topic.shape == (1000,)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    nearest = np.argmax(x @ benchlib.unit_rows(centres).T, axis=1)
    assert np.mean(nearest == topic) > 0.99


def test_a_vector_parquet_ingests_as_precomputed_embeddings(tmp_path, monkeypatch):
    monkeypatch.setattr(indexer.index, "AUTO_INDEX_ROWS", indexer.index.AUTO_INDEX_ROWS)  # restored afterwards
    benchlib.no_auto_index()
    assert indexer.index.AUTO_INDEX_ROWS > 10**12
    x = benchlib.unit_rows(np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32))
    src = benchlib.write_parquet(tmp_path / "v.parquet", [f"r{i}" for i in range(20)], x, "emb",
                                 label=["a", "b"] * 10)
    summary = indexer.ingest(tmp_path / "v.idx", [str(src)], model="none", vector_field="emb", progress=False)
    assert summary.added == 20
    hit = indexer.search(tmp_path / "v.idx", vector=x[7], k=1)[0]
    assert hit["id"] == "r7" and hit["label"] == "b" and hit["score"] == pytest.approx(1.0, abs=1e-5)


def test_write_report_makes_the_folder_and_writes_what_json_cannot_hold_as_text(tmp_path):
    out = benchlib.write_report(tmp_path / "deep" / "r.json", {"path": tmp_path, "machine": benchlib.machine()})
    data = json.loads(out.read_text())
    assert data["path"] == str(tmp_path) and data["machine"]["cpus"] >= 1 and len(data["machine"]["load_avg"]) == 3


def test_sample_sentences_groups_the_bundled_corpus_by_label():
    by_label = benchlib.sample_sentences()
    assert len(by_label) >= 2 and all(texts and all(isinstance(t, str) and t for t in texts)
                                      for texts in by_label.values())
