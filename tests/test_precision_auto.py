"""--precision auto on the packaged MiniLM: candidates measured on the inputs, the fastest that keeps
overlap@10 >= 0.95 taken, the decision cached and recorded; plain ingests never measure."""

from __future__ import annotations

import os

import pytest

from indexer import IndexerError
from indexer.ingest import autotune, ingest
from indexer.models.runtimes import cache
from indexer.store import Collection


@pytest.fixture
def export_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INDEXER_CACHE", str(tmp_path / "cache"))
    return cache.cache_root()


def test_cpu_candidates_start_with_the_reference_and_list_installed_backends():
    import torch

    ways = autotune.candidates(torch.device("cpu"))
    assert ways[0] == ("torch", "fp32")  # the reference every other way is compared with
    assert ("torch", "int8") in ways and all(p in ("fp32", "int8") for _, p in ways)
    assert (("onnx", "int8") in ways) == (autotune.importlib.util.find_spec("onnxruntime") is not None)


def test_a_cpus_name_tells_apart_what_decides_int8(tmp_path, monkeypatch):
    """Two CPUs a VM calls "AMD EPYC", with and without VNNI, do not share a cached decision."""
    import torch

    from indexer.models import device

    names = []
    for flags in ("fpu avx avx2 fma", "fpu avx2 avx512f avx512_vnni"):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n")
        monkeypatch.setattr(device, "CPUINFO", tmp_path / "cpuinfo")
        names.append(autotune._device_name(torch.device("cpu")))
    assert names[0].startswith("AMD EPYC x") and names[0].endswith("(avx2)")
    assert names[1].endswith("(avx2 avx512f avx512_vnni)")


def test_auto_is_refused_where_it_cannot_measure(tmp_path, sample_corpus):
    texts = [str(sample_corpus["texts"])]
    with pytest.raises(IndexerError, match="local engine only"):
        ingest(tmp_path / "r.idx", texts, precision="auto", engine="ray", progress=False)
    with pytest.raises(IndexerError, match="leave out --backend"):
        ingest(tmp_path / "b.idx", texts, precision="auto", backend="onnx", progress=False)
    with pytest.raises(IndexerError, match="not on stdin"):
        autotune.sample_inputs(["-"], None)


@pytest.mark.slow
def test_auto_measures_picks_the_fastest_that_keeps_neighbours_and_caches(tmp_path, sample_corpus, export_cache,
                                                                          monkeypatch):
    # Three of the CPU's candidates (the others only add export time): the reference, a lossy one, an exact one.
    ways = [("torch", "fp32"), ("torch", "int8"), ("onnx", "fp32")]
    monkeypatch.setattr(autotune, "candidates", lambda device: ways)
    texts = [str(sample_corpus["texts"])]
    s = ingest(tmp_path / "a.idx", texts, model="minilm", precision="auto", progress=False)
    tuned = s.auto_precision
    measured = tuned["measurements"]
    assert [(m["backend"], m["precision"]) for m in measured] == ways
    assert measured[0]["overlap_at_10"] == 1.0 and measured[2]["overlap_at_10"] >= 0.99  # fp32 export: exact
    assert all(m["items_per_s"] > 0 and 0 <= m["overlap_at_10"] <= 1 for m in measured)
    kept = [m for m in measured if m["overlap_at_10"] >= 0.95]
    best = max(kept, key=lambda m: m["items_per_s"])
    assert (tuned["backend"], tuned["precision"]) == (best["backend"], best["precision"])
    assert tuned["sample"] == 48 and tuned["cached"] is None and tuned["min_overlap"] == 0.95
    assert f"{best['backend']} {best['precision']}" in tuned["reason"]

    coll = Collection.open(tmp_path / "a.idx")
    assert (coll.spec.backend, coll.spec.precision) == (best["backend"], best["precision"])  # what the vectors are
    assert coll.manifest.auto_precision["measurements"] == measured and s.added == 48
    [cached] = (export_cache / "precision").glob("minilm-*.json")
    from click.testing import CliRunner

    from indexer.cli import cli

    info = CliRunner().invoke(cli, ["info", str(tmp_path / "a.idx")])
    assert f"--precision auto: {tuned['reason']}" in info.output

    # The decision is read back, not measured again; a plain ingest never measures.
    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(autotune, "_measure", no_measuring)
    again = ingest(tmp_path / "b.idx", texts, model="minilm", precision="auto", progress=False)
    assert again.auto_precision["cached"] == str(cached)
    assert (again.auto_precision["backend"], again.auto_precision["precision"]) == (best["backend"], best["precision"])
    plain = ingest(tmp_path / "a.idx", texts, progress=False)
    assert plain.skipped == 48 and plain.auto_precision is None
    os.remove(cached)
    kept_way = ingest(tmp_path / "a.idx", texts, precision="auto", progress=False)  # a collection keeps its way
    assert kept_way.skipped == 48 and kept_way.auto_precision is None


@pytest.mark.slow  # a CNN's static int8: an export and a quantisation (~30 s on two cores), torch fp32 timed
def test_auto_calibrates_a_cnns_static_int8_as_the_ingest_does(tmp_path, sample_corpus, export_cache, lite0,
                                                               monkeypatch):
    """A CNN's onnx int8 is a candidate too: calibrated on the first images of the ingest's own sources,
    measured, and, once chosen, the very model the ingest runs (quantised once, recorded in the spec)."""
    from PIL import Image, ImageOps

    from indexer.ingest.calibration import draw_sample
    from indexer.models.runtimes import onnx
    from indexer.models.runtimes.cache import calibration_key, int8_weight_bits
    from indexer.sources import SourceOptions

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(sample_corpus["images"].glob("*.jpg")):  # 32 images: more than the 20 measured at least
        with Image.open(path) as img:
            img.convert("RGB").save(photos / path.name)
            ImageOps.mirror(img.convert("RGB")).save(photos / f"mirrored-{path.name}")
    ways = [("torch", "fp32"), ("onnx", "int8")]
    monkeypatch.setattr(autotune, "candidates", lambda device: ways)
    monkeypatch.setattr(autotune, "MIN_OVERLAP", 0.5)  # the choice under test is the faster way, int8
    quantised = []
    quantize_static = onnx._quantize_static
    monkeypatch.setattr(onnx, "_quantize_static", lambda *a: quantised.append(1) or quantize_static(*a))
    s = ingest(tmp_path / "auto.idx", [str(photos)], model="efficientnet-lite0", precision="auto", progress=False)
    fp32, int8 = s.auto_precision["measurements"]
    assert "skipped" not in int8 and int8["items_per_s"] > fp32["items_per_s"] and int8["overlap_at_10"] > 0.5
    assert (s.auto_precision["backend"], s.auto_precision["precision"]) == ("onnx", "int8") and s.added == 32
    coll = Collection.open(tmp_path / "auto.idx")
    key = calibration_key(draw_sample(lite0, [str(photos)], SourceOptions(modality="image"), 64)[0],
                          int8_weight_bits())
    assert (coll.spec.backend, coll.spec.precision, coll.spec.calibration) == ("onnx", "int8", key)
    assert quantised == [1]  # measured and ingested with one model
