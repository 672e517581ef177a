"""Backends and precisions: ONNX Runtime fp32/int8 against torch fp32 on the packaged MiniLM, the export
cache, what the manifest records, and queries embedded the collection's way."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from indexer import IndexerError, load_embedder
from indexer.cli import cli
from indexer.ingest import ingest
from indexer.ingest.drift import measure, neighbour_overlap
from indexer.models import device, query_runtime, resolve_runtime
from indexer.models.runtimes import cache, onnx
from indexer.models.runtimes.per_token import PER_TENSOR, PER_TOKEN, PER_TOKEN_PLAIN
from indexer.store import Collection
from indexer.tasks.search import query_embedder, search

TEXTS = [json.loads(line)["text"] for line in open(os.path.join(os.path.dirname(__file__), "..", "indexer", "data",
                                                                   "sample_texts.jsonl"))]


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    """One export cache for the module: the first onnx load exports (seconds), the others reuse it."""
    old = os.environ.get("INDEXER_CACHE")
    os.environ["INDEXER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield cache.cache_root()
    if old is None:
        del os.environ["INDEXER_CACHE"]
    else:
        os.environ["INDEXER_CACHE"] = old


@pytest.fixture(scope="module")
def fp32_vectors(minilm):
    return minilm.embed(TEXTS)


@pytest.mark.parametrize("backend, precision, min_cosine", [
    ("onnx", "fp32", 0.9999), ("onnx", "int8", 0.998), ("openvino", "fp32", 0.9999), ("openvino", "int8", 0.999)])
def test_vectors_match_torch_fp32(export_cache, fp32_vectors, backend, precision, min_cosine):
    """Measured on the 48 sample texts: mean cosine onnx int8 0.9988 (per token; 0.993 per tensor),
    openvino int8 0.9995, fp32 1.0."""
    emb = load_embedder("minilm", resolve_runtime("cpu", precision, backend))
    assert (emb.spec.backend, emb.spec.precision) == (backend, precision)
    vectors = emb.embed(TEXTS, batch_size=16)
    cosine = (vectors * fp32_vectors).sum(1)
    assert cosine.min() >= min_cosine - 0.02 and cosine.mean() >= min_cosine
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_export_cache_is_reused(export_cache, monkeypatch):
    load_embedder("minilm", resolve_runtime("cpu", "fp32", "onnx"))  # exported and fused (by now, or here)
    models = sorted(export_cache.glob("exports/minilm-onnx-fp32-*/model.onnx"))
    assert [m.parent.name.count(onnx.FUSED) for m in models] == [0, 1]  # the plain export, and its rewrite
    mtimes = [m.stat().st_mtime_ns for m in models]

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx, "export_onnx", no_export)
    monkeypatch.setattr(onnx, "_fuse", no_export)
    load_embedder("minilm", resolve_runtime("cpu", "fp32", "onnx"))
    assert [m.stat().st_mtime_ns for m in models] == mtimes


def _op_types(model: Path) -> set[str]:
    import onnx as onnx_format

    return {node.op_type for node in onnx_format.load(model).graph.node}


def test_onnx_runs_a_transformers_fp32_on_fused_kernels(export_cache):
    fp32 = load_embedder("minilm", resolve_runtime("cpu", "fp32", "onnx")).features.path
    assert onnx.FUSED in fp32.parent.name
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= _op_types(fp32)
    # Per-token int8 quantises the fused graph's other matrix products.
    int8 = load_embedder("minilm", resolve_runtime("cpu", "int8", "onnx"))
    assert int8.spec.quantization == int8.features.quantization == PER_TOKEN
    assert {"MatMulIntegerToFloat", "Attention"} <= _op_types(int8.features.path)
    assert "MatMul" not in _op_types(int8.features.path)


def test_per_token_int8_records_the_graph_it_quantised(export_cache, monkeypatch):
    """Where the fused kernels are not used, int8 quantises the plain export: other vectors, so another
    recipe; vectors made on the fused kernels are not embedded there on the plain graph."""
    fused_spec = load_embedder("minilm", resolve_runtime("cpu", "int8", "onnx")).spec
    monkeypatch.setattr(onnx, "_fused_graph", lambda *args: None)
    plain = load_embedder("minilm", resolve_runtime("cpu", "int8", "onnx"))
    assert plain.spec.quantization == PER_TOKEN_PLAIN
    assert "MatMulIntegerToFloat" in _op_types(plain.features.path) and "Attention" not in _op_types(plain.features.path)
    assert (plain.embed(TEXTS[:8]) * load_embedder("minilm").embed(TEXTS[:8])).sum(1).min() > 0.99
    with pytest.raises(IndexerError, match="made on ONNX Runtime's fused kernels, which do not run here"):
        load_embedder(fused_spec, resolve_runtime("cpu", "int8", "onnx"))
    with pytest.raises(IndexerError, match="unknown to this version"):
        load_embedder(replace(fused_spec, quantization="per-group"), resolve_runtime("cpu", "int8", "onnx"))


def test_a_collection_made_per_tensor_keeps_its_int8_model(export_cache, tmp_path, sample_corpus):
    """A manifest written before per-token int8 (no `quantization`) holds ONNX Runtime's per-tensor int8
    vectors: its queries and re-runs use that model, and per-token vectors are refused, never mixed in."""
    path = tmp_path / "old.idx"
    ingest(path, [str(sample_corpus["texts"])], model="minilm", backend="onnx", precision="int8", progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"].pop("quantization") == PER_TOKEN
    (path / "manifest.json").write_text(json.dumps(manifest))
    coll = Collection.open(path)
    assert coll.spec.quantization == PER_TENSOR and "onnx int8 per-tensor" in coll.spec.describe()
    emb = query_embedder(coll, "auto")
    assert emb.spec.quantization == PER_TENSOR
    assert "MatMulInteger" in _op_types(emb.features.path) and "Attention" not in _op_types(emb.features.path)
    for flags in ({}, {"model": "minilm", "backend": "onnx", "precision": "int8"}):
        assert ingest(path, [str(sample_corpus["texts"])], progress=False, **flags).skipped == 48
    per_token = load_embedder("minilm", resolve_runtime("cpu", "int8", "onnx")).spec
    with pytest.raises(IndexerError, match="quantization: per-tensor here vs per-token"):
        coll.check_compatible(per_token)


@pytest.mark.parametrize("pooling, layer", [("cls", None), ("max", None), ("pooler", None), ("mean", "1")])
def test_fused_kernels_give_torchs_features_for_every_pooling(tmp_path, monkeypatch, caplog, tiny_bert_dir,
                                                              pooling, layer):
    """An intermediate layer's states and every pooling, through the rewritten graph (a random 3-layer BERT)."""
    monkeypatch.setenv("INDEXER_CACHE", str(tmp_path))
    monkeypatch.setattr(logging.getLogger("indexer"), "propagate", True)  # a CLI run in this process cut it
    texts = TEXTS[:12]
    options = {"pooling": pooling, "layer": layer}
    expected = load_embedder(f"hf:{tiny_bert_dir}", **options).embed(texts)
    with caplog.at_level(logging.INFO, logger="indexer"):
        emb = load_embedder(f"hf:{tiny_bert_dir}", resolve_runtime("cpu", "fp32", "onnx"), **options)
    assert {"Attention", "SkipLayerNormalization"} <= _op_types(emb.features.path)
    assert "fused kernels: {" in caplog.text and "plain export" not in caplog.text
    assert np.abs(emb.embed(texts) - expected).max() < 1e-4


@pytest.mark.parametrize("fault", ["changes the features", "raises", "matches nothing"])
def test_a_rewrite_that_fails_changes_features_or_matches_nothing_is_not_used(tmp_path, monkeypatch, caplog,
                                                                             tiny_bert_dir, fault):
    import onnx as onnx_format
    import onnxscript.rewriter.ort_fusions as ort_fusions
    from onnxscript import ir

    def doubling(model):
        proto = ir.serde.serialize_model(model)
        out = proto.graph.output[0].name
        [producer] = [n for n in proto.graph.node if out in n.output]
        producer.output[list(producer.output).index(out)] = "undoubled"
        proto.graph.initializer.append(onnx_format.numpy_helper.from_array(np.array(2, np.float32), "two"))
        proto.graph.node.append(onnx_format.helper.make_node("Mul", ["undoubled", "two"], [out]))
        return ir.serde.deserialize_model(proto), {"attention": 1}

    def raising(model):
        raise ValueError("no pattern\nfor this graph")

    rewrites = {"changes the features": (doubling, "changed its features", "WARNING"),
                "raises": (raising, r"failed: no pattern\nfor this graph", "WARNING"),
                "matches nothing": (lambda model: (model, {"attention": 0}), onnx.NO_MATCH, "INFO")}
    rewrite, reason, level = rewrites[fault]
    monkeypatch.setenv("INDEXER_CACHE", str(tmp_path))
    monkeypatch.setattr(logging.getLogger("indexer"), "propagate", True)  # a CLI run in this process cut it
    monkeypatch.setattr(ort_fusions, "optimize_for_ort", rewrite)
    expected = load_embedder(f"hf:{tiny_bert_dir}", pooling="mean").embed(TEXTS[:12])
    for _ in range(2):  # built once; said again on every later load
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="indexer"):
            emb = load_embedder(f"hf:{tiny_bert_dir}", resolve_runtime("cpu", "fp32", "onnx"), pooling="mean")
        # distinct: a record can reach the capture twice once a CLI run in this process set up logging
        [(said_level, said)] = {(r.levelname, r.message) for r in caplog.records if "running the plain export" in r.message}
        assert reason in said and said_level == level
        assert onnx.FUSED not in emb.features.path.parent.name
    [fused_dir] = tmp_path.glob(f"exports/*-onnx-fp32-{onnx.FUSED}-*")
    assert [p.name for p in fused_dir.iterdir()] == [onnx.UNFUSED_FILE]
    assert np.abs(emb.embed(TEXTS[:12]) - expected).max() < 1e-4


def test_killed_export_leaves_nothing_behind(tmp_path):
    target = tmp_path / "exports" / "m-onnx-fp32-0"

    def killed(directory):
        (directory / "model.onnx").write_bytes(b"half an export")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.cached(target, killed)
    assert not target.exists() and list(target.parent.iterdir()) == []
    built = cache.cached(target, lambda d: (d / "model.onnx").write_bytes(b"whole"))
    assert built == target and (target / "model.onnx").read_bytes() == b"whole"


def test_missing_openvino_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(IndexerError, match=r"pip install 'indexer-lancedb\[openvino\]'"):
        load_embedder("minilm", resolve_runtime("cpu", "int8", "openvino"))


def test_missing_onnxruntime_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(IndexerError, match=r"pip install 'indexer-lancedb\[onnx\]'"):
        load_embedder("minilm", resolve_runtime("cpu", "fp32", "onnx"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("cats chase mice")
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "c.idx"), str(docs), "--backend", "onnx", "-q"])
    assert result.exit_code == 1 and "indexer-lancedb[onnx]" in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, ImportError)


def test_onnx_int8_collection_records_and_queries_the_same_way(export_cache, tmp_path, sample_corpus):
    path = tmp_path / "q.idx"
    ingest(path, [str(sample_corpus["texts"])], model="minilm", backend="onnx", precision="int8", progress=False)
    coll = Collection.open(path)
    model = json.loads((path / "manifest.json").read_text())["model"]
    assert (model["backend"], model["precision"]) == ("onnx", "int8")
    assert "onnx int8" in coll.spec.describe()
    # Queries: embedded with the collection's backend and precision, and they find what fp32 would.
    emb = query_embedder(coll, "auto")
    assert (emb.spec.backend, emb.spec.precision) == ("onnx", "int8")
    hits = search(coll, "galaxies and telescopes", k=3)
    assert hits[0]["label"] == "astronomy"
    # A re-run without flags keeps the collection's way; another backend is refused, never mixed in.
    again = ingest(path, [str(sample_corpus["texts"])], progress=False)
    assert again.skipped == 48 and again.added == 0
    with pytest.raises(IndexerError, match="backend"):
        ingest(path, [str(sample_corpus["texts"])], backend="torch", progress=False)
    torch_fp32 = load_embedder("minilm").spec
    with pytest.raises(IndexerError, match="backend: onnx here vs torch"):
        coll.check_compatible(torch_fp32)


def test_torch_int8_is_recorded_and_queried_as_int8():
    runtime = query_runtime("torch", "int8", "auto")
    assert (runtime.backend, runtime.precision, runtime.device.type) == ("torch", "int8", "cpu")
    assert query_runtime("torch", "fp16", "cpu").precision == "fp32"  # float vectors: any float query
    with pytest.raises(IndexerError, match="runs fp32 or int8"):
        resolve_runtime("cpu", "fp16", "onnx")
    with pytest.raises(IndexerError, match="unknown backend"):
        resolve_runtime("cpu", "fp32", "tensorrt")


@pytest.mark.slow  # two exports of a CNN: a minute or more on two busy cores
def test_cnn_features_through_onnx_and_openvino(export_cache, lite0, sample_corpus):
    """EfficientNet-Lite0's penultimate features, fp32: the same as torch's."""
    from PIL import Image

    paths = sorted(sample_corpus["images"].glob("*.jpg"))[:6]
    pixels = torch.stack([lite0.transform(Image.open(p).convert("RGB")) for p in paths])
    reference = lite0.embed_batch(pixels)
    for backend in ("onnx", "openvino"):
        emb = load_embedder("efficientnet-lite0", resolve_runtime("cpu", "fp32", backend))
        assert (emb.spec.backend, emb.spec.dim) == (backend, 1280)
        assert (emb.embed_batch(pixels) * reference).sum(1).min() > 0.9999


@pytest.mark.slow  # per backend: a static quantisation (~10 s) and a drift check in torch fp32 (~10 s)
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_cnn_static_int8(export_cache, lite0, tmp_path, sample_corpus, backend, monkeypatch):
    """Lite0 int8, calibrated on the ingest's own images: vectors within the recorded drift of torch fp32,
    the calibration recorded and reused (no second quantisation), queries through the same model."""
    import nncf

    from indexer.ingest.calibration import draw_sample
    from indexer.models.runtimes.cache import ExportMissing, export_dir
    from indexer.sources.images import decode_image

    images = sample_corpus["images"]
    path = tmp_path / "int8.idx"
    nncf_calls = []
    real_quantize = nncf.quantize
    monkeypatch.setattr(nncf, "quantize", lambda *a, **kw: nncf_calls.append(kw) or real_quantize(*a, **kw))
    s = ingest(path, [str(images)], model="efficientnet-lite0", backend=backend, precision="int8", progress=False)
    assert [kw["fast_bias_correction"] for kw in nncf_calls] == ([False] if backend == "openvino" else [])
    coll = Collection.open(path)
    model = json.loads((path / "manifest.json").read_text())["model"]
    key = model["calibration"]  # the sample's digest, and "-w7" if this CPU (no VNNI) gets 7-bit weights
    assert (model["backend"], model["precision"]) == (backend, "int8")
    assert key == cache.calibration_key(key[:16], cache.int8_weight_bits())
    # The drift recorded is what the stored vectors are: torch fp32 of the same images, compared here.
    drift = s.drift
    assert (drift["backend"], drift["sample"]) == (backend, s.added) and drift["mean_cosine"] > 0.97
    stored = {r["id"]: r["vector"] for b in coll.scan(["id", "vector"]) for r in b.to_pylist()}
    paths = sorted(images.glob("*.jpg"))
    pixels = torch.stack([lite0.transform(decode_image(p.read_bytes(), 256)) for p in paths])
    fp32 = lite0.embed_batch(pixels)
    ours = np.array([stored[p.name] for p in paths])
    assert abs(float((ours * fp32).sum(1).mean()) - drift["mean_cosine"]) < 1e-3
    assert abs(neighbour_overlap(ours, fp32) - drift["overlap_at_10"]) < 1e-3
    # The key is the first images' content: the same inputs give the same key, fewer images another one.
    assert draw_sample(lite0, [str(images)], _image_opts(), 64)[0] == key[:16]
    assert draw_sample(lite0, [str(images)], _image_opts(), 8)[0] != key[:16]

    def no_quantisation(*args, **kwargs):
        raise AssertionError("quantised again")

    monkeypatch.setattr(onnx, "_quantize_static", no_quantisation)
    monkeypatch.setattr("nncf.quantize", no_quantisation)
    # A second collection of the same images and a re-run reuse the export; queries run that model.
    again = ingest(tmp_path / "again.idx", [str(images)], model="efficientnet-lite0", backend=backend,
                   precision="int8", progress=False)
    assert Collection.open(tmp_path / "again.idx").spec.calibration == key and again.added == len(paths)
    assert ingest(path, [str(images)], progress=False).skipped == len(paths)
    emb = query_embedder(coll, "auto")
    assert (emb.spec.backend, emb.spec.calibration) == (backend, key)
    assert np.allclose(emb.embed_batch(pixels), ours, atol=1e-4)
    hits = search(coll, image=str(paths[3]), k=1)
    assert hits[0]["id"] == paths[3].name and hits[0]["score"] > 0.9999
    # Gone from the cache: a query says how to rebuild it; the same ingest rebuilds the same model.
    import shutil

    shutil.rmtree(export_dir(coll.spec, backend, "int8"))
    with pytest.raises(ExportMissing, match="run the same indexer ingest again"):
        load_embedder(coll.spec, resolve_runtime("cpu", "int8", backend))
    # Other first images cannot rebuild it: refused in one line, before anything is quantised or stored.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(paths[0], other / paths[0].name)
    with pytest.raises(IndexerError, match="do not start with the same 64 images"):
        ingest(path, [str(other)], progress=False)
    monkeypatch.undo()
    assert ingest(path, [str(images)], progress=False).skipped == len(paths)
    rebuilt = load_embedder(coll.spec, resolve_runtime("cpu", "int8", backend))
    assert np.allclose(rebuilt.embed_batch(pixels), ours, atol=1e-3)


def _int8_weight_ranges(backend: str, export: Path) -> list[int]:
    """The largest |value| of each int8 weight tensor of a convolution in an exported int8 CNN."""
    if backend == "onnx":
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(export / "model.onnx").graph
        return [int(np.abs(numpy_helper.to_array(t)).max()) for t in graph.initializer
                if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) == 4]
    import openvino as ov

    def feeds_a_convolution(node) -> bool:
        users = [t.get_node() for out in node.outputs() for t in out.get_target_inputs()]
        return any(u.get_type_name() == "Convolution" or (u.get_type_name() in ("Convert", "Subtract", "Multiply")
                                                         and feeds_a_convolution(u)) for u in users)

    model = ov.Core().read_model(export / "model.xml")
    return [int(np.abs(op.get_data()).max()) for op in model.get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8 and feeds_a_convolution(op)]


@pytest.mark.slow  # per backend: two static quantisations (~10 s each) and a drift check
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_cnn_int8_has_7_bit_weights_on_a_cpu_without_vnni(export_cache, tmp_path, sample_corpus, backend,
                                                          monkeypatch):
    """Where u8 x s8 products saturate (x86 without VNNI) a CNN's int8 weights take 7 bits; the key records
    it, so queries and a rebuild on a CPU with VNNI run that same model."""
    from indexer.ingest import calibration
    from indexer.models.runtimes.cache import export_dir

    images = [str(sample_corpus["images"])]
    path = tmp_path / "w7.idx"
    monkeypatch.setattr(calibration, "int8_weight_bits", lambda: 7)
    s = ingest(path, images, model="efficientnet-lite0", backend=backend, precision="int8", progress=False)
    coll = Collection.open(path)
    assert cache.Calibration.keyed(coll.spec.calibration).weight_bits == 7 and s.drift["mean_cosine"] > 0.97
    ranges = _int8_weight_ranges(backend, export_dir(coll.spec, backend, "int8"))
    assert len(ranges) > 20 and max(ranges) <= 64
    # On a CPU with VNNI, with the export gone: the same ingest rebuilds the 7-bit model, not an 8-bit one.
    import shutil

    shutil.rmtree(export_dir(coll.spec, backend, "int8"))
    monkeypatch.setattr(calibration, "int8_weight_bits", lambda: 8)
    assert ingest(path, images, progress=False).skipped == s.added
    assert max(_int8_weight_ranges(backend, export_dir(coll.spec, backend, "int8"))) <= 64
    fresh = ingest(tmp_path / "w8.idx", images, model="efficientnet-lite0", backend=backend, precision="int8",
                   progress=False)
    w8 = Collection.open(tmp_path / "w8.idx").spec.calibration
    assert w8 == cache.calibration_key(cache.calibration_sample(coll.spec.calibration), 8) and fresh.added == s.added
    assert max(_int8_weight_ranges(backend, export_dir(Collection.open(tmp_path / "w8.idx").spec, backend,
                                                       "int8"))) > 64
    hits = search(coll, image=str(sorted(sample_corpus["images"].glob("*.jpg"))[3]), k=1)
    assert hits[0]["score"] > 0.999  # the query ran the collection's 7-bit model


def test_a_calibration_key_records_the_recipe_its_model_is_rebuilt_with():
    digest = "0123456789abcdef"
    assert cache.calibration_key(digest, 7) == digest + "-w7-bc" and cache.calibration_key(digest, 8) == digest + "-bc"
    recipes = {key: (c.weight_bits, c.full_bias_correction) for key in (digest, digest + "-w7", digest + "-bc",
                                                                         digest + "-w7-bc")
               for c in [cache.Calibration.keyed(key)]}
    # keys made before full bias correction (no -bc) keep the fast one when their model is rebuilt
    assert recipes == {digest: (8, False), digest + "-w7": (7, False), digest + "-bc": (8, True),
                       digest + "-w7-bc": (7, True)}
    assert {cache.calibration_sample(key) for key in recipes} == {digest}


@pytest.mark.parametrize("machine, flags, bits", [
    ("x86_64", "fpu avx2 avx512f avx512_vnni", 8), ("x86_64", "fpu avx avx2 fma", 7), ("AMD64", "avx_vnni", 8),
    ("aarch64", "fp asimd asimddp", 8), ("x86_64", None, 7)])
def test_int8_weight_bits_follow_the_cpu(monkeypatch, tmp_path, machine, flags, bits):
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(device, "CPUINFO", cpuinfo)
    monkeypatch.setattr(cache.platform, "machine", lambda: machine)
    assert cache.int8_weight_bits() == bits


def test_text_batches_on_a_cpu_are_small(export_cache, minilm):
    """Length-sorted small batches: less padding, activations in cache (see TextEmbedder.default_batch_size)."""
    assert minilm.default_batch_size == 16
    assert load_embedder("minilm", resolve_runtime("cpu", "fp32", "onnx")).default_batch_size == 8


def _image_opts():
    from indexer.sources import SourceOptions

    return SourceOptions(modality="image")


def test_what_other_backends_do_not_run(resnet18_weights):
    uncalibrated = load_embedder("efficientnet-lite0", resolve_runtime("cpu", "int8", "onnx"))
    assert uncalibrated.needs_calibration  # never torch fp32 vectors labelled int8
    with pytest.raises(IndexerError, match="only once calibrated"):
        uncalibrated.embed_batch(torch.zeros(1, 3, 224, 224))
    with pytest.raises(IndexerError, match="add --backend onnx or openvino"):
        load_embedder("efficientnet-lite0", resolve_runtime("cpu", "int8"))
    with pytest.raises(IndexerError, match="--layer layer3 needs --backend torch"):
        load_embedder("resnet18", resolve_runtime("cpu", "fp32", "onnx"), weights=str(resnet18_weights),
                      layer="layer3")


def test_neighbour_overlap():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 16)).astype(np.float32)
    assert neighbour_overlap(a, a) == 1.0
    assert neighbour_overlap(a, rng.normal(size=(50, 16))) < 0.5
    noisy = a + 0.01 * rng.normal(size=a.shape)
    assert measure(a / np.linalg.norm(a, axis=1, keepdims=True),
                   noisy / np.linalg.norm(noisy, axis=1, keepdims=True))["overlap_at_10"] > 0.95


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_int8_drift_is_measured_recorded_and_shown(export_cache, tmp_path, sample_corpus, backend, caplog,
                                                   monkeypatch):
    path = tmp_path / f"{backend}.idx"
    monkeypatch.setattr(logging.getLogger("indexer"), "propagate", True)  # a CLI run in this process cut it
    with caplog.at_level("INFO", logger="indexer"):
        s = ingest(path, [str(sample_corpus["texts"])], model="minilm", backend=backend, precision="int8",
                   progress=False)
    drift = json.loads((path / "manifest.json").read_text())["drift"]
    assert s.drift == drift and (drift["backend"], drift["precision"], drift["sample"]) == (backend, "int8", 48)
    assert 0.9 < drift["mean_cosine"] < 1 and 0 < drift["overlap_at_10"] <= 1
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "drifts from torch fp32" in r.message]
    assert bool(warned) == (drift["overlap_at_10"] < 0.95)
    info = CliRunner().invoke(cli, ["info", str(path)]).stdout
    assert f"runtime      {backend} int8; vs torch fp32 on 48 items: mean cosine {drift['mean_cosine']:.4f}" in info
    # Measured once per (backend, precision): a later run does not measure again.
    assert ingest(path, [str(sample_corpus["texts"])], progress=False).drift is None


def test_fp32_collections_need_no_drift_check(tmp_path, sample_corpus):
    path = tmp_path / "plain.idx"
    assert ingest(path, [str(sample_corpus["texts"])], model="minilm", progress=False).drift is None
    assert json.loads((path / "manifest.json").read_text())["drift"] is None
    assert "runtime" not in CliRunner().invoke(cli, ["info", str(path)]).stdout


def test_layers_compares_the_precision_it_recommends(sample_corpus):
    """`layers --precision int8` sweeps the int8 model (torch, dynamic) and recommends ingesting with it;
    the exported backends have no layers to sweep and say so in one line."""
    args = ["layers", str(sample_corpus["texts"]), "--model", "minilm", "--layers", "6", "--pooling", "mean",
            "--folds", "2", "-k", "3"]
    result = CliRunner().invoke(cli, [*args, "--precision", "int8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["best"]["flags"] == "--model minilm --layer 6 --pooling mean --precision int8"
    refused = CliRunner().invoke(cli, [*args, "--backend", "onnx"])
    assert refused.exit_code == 1 and "one torch forward pass" in refused.output
    assert "Traceback" not in refused.output
