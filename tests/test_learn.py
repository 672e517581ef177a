"""Learning on frozen features: k-NN (DINO protocol), linear probe, layer sweep; on real models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps

from indexer import ingest
from indexer.cli import cli
from indexer.store import Collection
from indexer.tasks.features import load_labelled, stratified_folds
from indexer.tasks.knn import knn_eval, knn_eval_arrays, knn_predict
from indexer.tasks.probe import ProbeHead, probe_eval, probe_eval_arrays

from .conftest import write_jsonl

CHANCE = 1 / 6  # the sample corpus: 48 sentences in 6 topics


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def texts_idx(tmp_path_factory, sample_corpus):
    """The 48 labelled sample sentences plus 3 unlabelled ones."""
    root = tmp_path_factory.mktemp("learn")
    extra = write_jsonl(root / "unlabelled.jsonl", [{"id": f"u{i}", "text": t} for i, t in enumerate(
        ["a note without a topic", "something else entirely", "yet another line"])])
    coll = root / "t.idx"
    ingest(coll, [str(sample_corpus["texts"]), str(extra)], model="minilm", progress=False)
    return coll


def dino_reference(train_x, train_y, test_x, k, T, n_classes):
    """The DINO repository's knn_classifier (eval_knn.py), in one block: mm, topk, one-hot, exp(sim/T)."""
    train = torch.nn.functional.normalize(torch.from_numpy(train_x), dim=1)
    test = torch.nn.functional.normalize(torch.from_numpy(test_x), dim=1)
    labels = torch.from_numpy(train_y)
    similarity = torch.mm(test, train.t())
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    retrieved = torch.gather(labels.view(1, -1).expand(len(test), -1), 1, indices)
    one_hot = torch.zeros(len(test) * k, n_classes).scatter_(1, retrieved.view(-1, 1), 1)
    weights = distances.clone().div_(T).exp_()
    probs = torch.sum(one_hot.view(len(test), -1, n_classes) * weights.view(len(test), -1, 1), 1)
    return probs.argmax(1).numpy(), (probs / probs.sum(1, keepdim=True)).numpy()


def test_knn_equals_the_dino_reference_on_real_features(texts_idx):
    data = load_labelled(Collection.open(texts_idx))
    classes = sorted(set(data.labels))
    y = np.array([classes.index(c) for c in data.labels])
    fold = stratified_folds(data.labels, 4)
    result = knn_eval(texts_idx, folds=4, k=10, temperature=0.07, engine="exact")
    expected = np.empty(len(y), dtype=object)
    for f in range(4):
        pred, _ = dino_reference(data.vectors[fold != f], y[fold != f], data.vectors[fold == f], 10, 0.07, 6)
        expected[fold == f] = [classes[i] for i in pred]
    assert result["accuracy"] == pytest.approx(float(np.mean(expected == data.labels)), abs=0)
    assert result["accuracy"] > 3 * CHANCE

    # Probabilities too, through the array API and the Reference used by predictions.
    train, test = fold != 0, fold == 0
    pred, probs = dino_reference(data.vectors[train], y[train], data.vectors[test], 10, 0.07, 6)
    from indexer.tasks.features import LabelledVectors
    from indexer.tasks.knn import KnnSettings, Reference

    ref = Reference(LabelledVectors([str(i) for i in np.flatnonzero(train)], data.vectors[train],
                                    data.labels[train], 0))
    ours, _, _ = ref.probabilities(data.vectors[test], KnnSettings(10, 0.07, "weighted"))
    np.testing.assert_array_equal(ours.argmax(1), pred)
    np.testing.assert_allclose(ours, probs, rtol=1e-5, atol=1e-7)


def test_majority_vote_matches_scikit_learn(texts_idx):
    from sklearn.neighbors import KNeighborsClassifier

    data = load_labelled(Collection.open(texts_idx))
    fold = stratified_folds(data.labels, 3)
    train, test = fold != 0, fold == 0
    for k in (1, 5, 9):
        ours = knn_eval_arrays(data.vectors[train], data.labels[train], data.vectors[test], data.labels[test],
                               k=k, vote="majority")
        sk = KNeighborsClassifier(n_neighbors=k, weights="uniform", algorithm="brute", metric="cosine")
        sk.fit(data.vectors[train], data.labels[train])
        assert ours["accuracy"] == pytest.approx(float(np.mean(sk.predict(data.vectors[test]) == data.labels[test])))


def test_knn_cli_eval_reports_and_index(texts_idx, tmp_path):
    out = tmp_path / "rep"
    result = run("knn", texts_idx, "--eval", "--json", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["accuracy"] > 3 * CHANCE and report["macro_f1"] > 3 * CHANCE
    assert (report["k"], report["temperature"], report["vote"], report["folds"]) == (20, 0.07, "weighted", 5)
    assert report["n_test"] == 48 and report["unlabelled"] == 3 and report["engine"] == "exact"
    assert set(report["per_class"]) == {"astronomy", "biology", "computing", "cooking", "finance", "sports"}
    assert Image.open(report["files"]["confusion_png"]).size[0] > 200
    assert json.loads((out / "knn.json").read_text())["accuracy"] == report["accuracy"]

    # With a (flat, exact) FAISS index the neighbours come from it; the votes are the same.
    assert run("index", texts_idx, "-q").exit_code == 0
    indexed = json.loads(run("knn", texts_idx, "--eval", "--json").stdout)
    assert indexed["engine"].startswith("faiss") and indexed["accuracy"] == report["accuracy"]
    majority = json.loads(run("knn", texts_idx, "--eval", "--json", "--vote", "majority", "-k", "5").stdout)
    assert majority["vote"] == "majority" and majority["accuracy"] > 3 * CHANCE


def test_knn_predict_gives_label_probabilities_and_neighbours(texts_idx):
    queries = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in (
        ("q1", "The telescope observed a distant galaxy and its stars."),
        ("q2", "Simmer the sauce with garlic and fresh basil.")))
    result = run("knn", texts_idx, "--predict", "-", "--json", "-k", "5", input=queries)
    assert result.exit_code == 0, result.output
    preds = json.loads(result.stdout)
    assert [p["label"] for p in preds] == ["astronomy", "cooking"]
    for p in preds:
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert len(p["neighbours"]) == 5 and all(n["id"] and n["label"] for n in p["neighbours"])
    api = knn_predict(texts_idx, items=["Interest rates and stock prices moved today."], k=5)
    assert api[0]["label"] == "finance"


def test_knn_on_a_test_collection_and_its_errors(texts_idx, tmp_path, sample_corpus):
    test_coll = tmp_path / "test.idx"
    rows = [{"id": "a", "text": "Saturn has bright rings made of ice.", "label": "astronomy"},
            {"id": "b", "text": "The striker scored a goal in the final minute.", "label": "sports"}]
    ingest(test_coll, [str(write_jsonl(tmp_path / "t.jsonl", rows))], model="minilm", progress=False)
    report = knn_eval(texts_idx, test=test_coll, k=5)
    assert report["test"] == str(test_coll) and report["n_test"] == 2 and report["accuracy"] == 1.0

    images = tmp_path / "img.idx"
    ingest(images, [str(sample_corpus["images"])], progress=False)
    wrong = run("knn", texts_idx, "--eval", "--test", images)
    assert wrong.exit_code == 1 and "Traceback" not in wrong.output
    nolabel = run("knn", images, "--eval")
    assert nolabel.exit_code == 1 and "no row" in nolabel.output
    single = tmp_path / "one.idx"
    ingest(single, [str(write_jsonl(tmp_path / "o.jsonl", [{**r, "label": "x"} for r in rows]))], model="minilm",
           progress=False)
    one = run("knn", single, "--eval")
    assert one.exit_code == 1 and "at least two" in one.output


def test_probe_cross_validation_save_and_predict_end_to_end(texts_idx, tmp_path):
    head_path = tmp_path / "topic.npz"
    result = run("probe", texts_idx, "--json", "--save", head_path, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["accuracy"] > 3 * CHANCE and report["folds"] == 5 and len(report["C"]) == 5
    assert (tmp_path / "rep" / "probe_confusion.png").exists()

    head = ProbeHead.load(head_path)
    assert head.classes == sorted(head.classes) and len(head.classes) == 6 and head.spec["name"] == "minilm"
    queries = "".join(json.dumps({"text": t}) + "\n" for t in (
        "Photosynthesis in the leaf cells turns light into sugar.", "The compiler optimises the loop."))
    cli_preds = json.loads(run("probe", head_path, "--predict", "-", "--json", input=queries).stdout)
    assert [p["label"] for p in cli_preds] == ["biology", "computing"]
    api = head.classify(items=["Photosynthesis in the leaf cells turns light into sugar."])
    assert api[0]["label"] == "biology"
    assert api[0]["probabilities"]["biology"] == pytest.approx(cli_preds[0]["probabilities"]["biology"], abs=1e-5)

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a head")
    out = run("probe", bad, "--predict", "-", input=queries)
    assert out.exit_code == 1 and "not a probe head" in out.output


def test_probe_arrays_binary_and_separable():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    y = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "pos", "neg")
    result = probe_eval_arrays(x[:150], y[:150], x[150:], y[150:])
    assert result["accuracy"] >= 0.9 and set(result["per_class"]) == {"neg", "pos"}
    knn = knn_eval_arrays(x[:150], y[:150], x[150:], y[150:], k=10)
    assert knn["accuracy"] > 0.7


def test_probe_on_a_test_collection(texts_idx, tmp_path):
    rows = [{"id": "a", "text": "Saturn has bright rings made of ice.", "label": "astronomy"},
            {"id": "b", "text": "Knead the dough and let it rise before baking.", "label": "cooking"}]
    test_coll = tmp_path / "test.idx"
    ingest(test_coll, [str(write_jsonl(tmp_path / "t.jsonl", rows))], model="minilm", progress=False)
    report = probe_eval(texts_idx, test=test_coll)
    assert report["n_test"] == 2 and report["accuracy"] == 1.0


def test_layer_sweep_text_one_row_per_layer_and_pooling(sample_corpus, tmp_path, minilm):
    from indexer.models.layers import available_layers

    assert len(available_layers(minilm)) == 7 * 3  # hidden states 0..6 x cls/mean/max
    result = run("layers", sample_corpus["texts"], "--layers", "0,3,-1", "--pooling", "cls,mean", "--folds", "4",
                 "--json", "-q", "--out", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(r["layer"], r["pooling"]) for r in report["rows"]] == [
        (0, "cls"), (0, "mean"), (3, "cls"), (3, "mean"), (6, "cls"), (6, "mean")]
    assert sum(r["best"] for r in report["rows"]) == 1
    best = next(r for r in report["rows"] if r["best"])
    assert report["best"]["flags"] == f"--model minilm --layer {best['layer']} --pooling {best['pooling']}"
    assert best["knn_accuracy"] > 3 * CHANCE and best["probe_accuracy"] > 3 * CHANCE
    assert (tmp_path / "sweep" / "layers.png").exists() and (tmp_path / "sweep" / "layers.json").exists()


@pytest.mark.slow
def test_layer_sweep_cnn_stages_on_transformed_photos(sample_corpus, tmp_path):
    """Classes are transformations of the same photos: low-level, so an early stage should win."""
    root = tmp_path / "photos"
    transforms = {"gray": lambda im: ImageOps.grayscale(im).convert("RGB"), "inverted": ImageOps.invert,
                  "blurred": lambda im: im.resize((16, 16)).resize(im.size)}
    for path in sorted(sample_corpus["images"].glob("*.jpg")):
        im = Image.open(path).convert("RGB")
        im.thumbnail((256, 256))
        for name, fn in transforms.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            fn(im).save(root / name / path.name)
    result = run("layers", root, "--label-field", "folder", "--folds", "3", "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    layers = [r["layer"] for r in report["rows"]]
    assert layers[-1] == "penultimate" and len(layers) >= 5 and all(r["pooling"] == "avg" for r in report["rows"])
    assert report["n_classes"] == 3
    best = report["best"]
    assert max(best["knn_accuracy"], best["probe_accuracy"]) > 2 / 3
    assert best["flags"].startswith("--model efficientnet-lite0")


def test_layer_sweep_errors(sample_corpus, tmp_path):
    bad = run("layers", sample_corpus["texts"], "--layers", "9")
    assert bad.exit_code == 1 and "hidden states 0..6" in bad.output
    pooling = run("layers", sample_corpus["texts"], "--pooling", "median")
    assert pooling.exit_code == 1 and "--pooling median" in pooling.output
    pooler = run("layers", sample_corpus["texts"], "--layers", "3", "--pooling", "pooler")
    assert pooler.exit_code == 1 and "pooler" in pooler.output and "Traceback" not in pooler.output
    unlabelled = write_jsonl(tmp_path / "u.jsonl", [{"text": "one"}, {"text": "two"}])
    none = run("layers", unlabelled)
    assert none.exit_code == 1 and "class" in none.output


def test_layer_keys_and_one_pass_features_for_each_family(tiny_vit_dir, resnet18_weights, sample_corpus):
    from indexer.models import load_embedder
    from indexer.models.layers import available_layers, embed_layers

    photos = [Image.open(p).convert("RGB") for p in sorted(sample_corpus["images"].glob("*.jpg"))[:3]]
    resnet = load_embedder("resnet18", weights=str(resnet18_weights))
    keys = available_layers(resnet)
    assert [k[0] for k in keys] == ["layer1", "layer2", "layer3", "layer4", "penultimate"]
    calls = []
    hook = resnet.model.register_forward_hook(lambda *_: calls.append(1))
    feats = embed_layers(resnet, photos, keys, batch_size=2)
    hook.remove()
    assert len(calls) == 2  # every layer from one forward pass per batch (3 photos, batches of 2)
    assert [feats[k].shape for k in keys] == [(3, 64), (3, 128), (3, 256), (3, 512), (3, 512)]
    # The penultimate row is exactly what the embedder itself produces.
    np.testing.assert_allclose(feats[("penultimate", "avg")], resnet.embed(photos), atol=1e-5)

    vit = load_embedder(f"hf:{tiny_vit_dir}")
    keys = available_layers(vit)
    assert keys == [(i, p) for i in range(3) for p in ("cls", "mean")]
    feats = embed_layers(vit, photos, keys)
    np.testing.assert_allclose(feats[(2, "cls")], vit.embed(photos), atol=1e-5)
    assert all(np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-5) for f in feats.values())


def test_votes_stay_finite_at_any_temperature():
    from indexer.tasks.knn import vote_probabilities

    sims = np.array([[0.95, 0.94, 0.2], [0.5, 0.1, -0.3]])
    classes = np.array([[1, 0, 0], [0, 1, -1]])  # -1: a missing neighbour
    for t, first in ((1e-4, 1), (0.07, 1), (10.0, 0)):  # a high T approaches a majority vote
        p = vote_probabilities(sims, classes, 2, temperature=t)
        assert np.isfinite(p).all() and np.allclose(p.sum(1), 1)
        assert p[0].argmax() == first and p[1].argmax() == 0
    assert np.allclose(vote_probabilities(sims, classes, 2, how="majority"), [[2 / 3, 1 / 3], [0.5, 0.5]])


def test_knn_through_an_hnsw_index_matches_exact(tmp_path, monkeypatch):
    """Neighbours from a tuned HNSW index (folds exclude their own rows through the ID selector),
    predictions of new vectors through it, and unlabelled rows never voting."""
    from indexer.index import build_index, tuning
    from indexer.spec import ModelSpec

    monkeypatch.setattr(tuning, "FLAT_BELOW", 1000)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 32)).astype(np.float32)
    y = rng.integers(0, 4, 3000)
    x = centres[y] + 0.8 * rng.standard_normal((3000, 32)).astype(np.float32)
    coll = Collection.create(tmp_path / "v.idx", ModelSpec(name="none", modality="vector", dim=32))
    rows = [{"id": f"r{i}", "content_hash": str(i), "record_hash": str(i), "source": "test",
             "label": None if i % 50 == 0 else f"c{y[i]}"} for i in range(3000)]
    coll.write(rows, x / np.linalg.norm(x, axis=1, keepdims=True), upsert=False)
    assert build_index(coll)["kind"] == "hnsw"
    exact = knn_eval(coll, folds=3, engine="exact")
    indexed = knn_eval(coll, folds=3)
    assert indexed["engine"] == "faiss hnsw" and indexed["unlabelled"] == 60
    assert abs(indexed["accuracy"] - exact["accuracy"]) <= 0.01 and exact["accuracy"] > 0.9
    preds = knn_predict(coll, vectors=centres, k=7)
    assert [p["label"] for p in preds] == ["c0", "c1", "c2", "c3"]
    assert all(len(p["neighbours"]) == 7 and int(n["id"][1:]) % 50 for p in preds for n in p["neighbours"])


def _clustered(n: int, classes: int, spread: float, noise: float, seed: int = 0):
    """Unit-norm 64-d rows around a few centres per class, `noise` of the labels replaced at random."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes * 3, 64)).astype(np.float32)
    topic = rng.integers(0, len(centres), n)
    x = centres[topic] + spread * rng.standard_normal((n, 64)).astype(np.float32)
    y = topic // 3
    flip = rng.random(n) < noise
    y[flip] = rng.integers(0, classes, int(flip.sum()))
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.array([f"c{v}" for v in y])


def test_probe_solver_matches_scikit_learn_at_the_same_c():
    """Our L-BFGS minimises scikit-learn's objective: the same C gives the same probabilities."""
    from sklearn.linear_model import LogisticRegression

    from indexer.tasks.probe import fit_probe

    x, y = _clustered(600, 5, 1.5, 0.1)
    for C in (0.003, 0.1):
        head = fit_probe(x, y, C=C)
        z = (x / np.linalg.norm(x, axis=1, keepdims=True) - head.mean) / head.scale
        ref = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(z, y)
        assert head.classes == list(ref.classes_)
        assert np.abs(head.predict_proba(x) - ref.predict_proba(z)).max() < 2e-3


def test_probe_path_extends_past_the_grid_while_the_best_c_is_at_its_end(monkeypatch):
    from indexer.tasks import probe

    # Noisy overlapping classes want strong regularisation: below a grid set at weaker C.
    monkeypatch.setattr(probe, "C_GRID", (-2.0, 1.0))
    x, y = _clustered(1500, 6, 3.0, 0.3)
    noisy = probe.fit_probe(x, y)
    accuracy = {float(c): a for c, a in noisy.info["validation_accuracy_by_C"].items()}
    assert noisy.C < 0.01 and min(accuracy) < noisy.C  # walked down past the optimum
    assert accuracy[min(accuracy, key=lambda c: abs(c - noisy.C))] == max(accuracy.values())
    # Cleanly separated classes want almost none: above a grid set at strong C.
    monkeypatch.setattr(probe, "C_GRID", (-3.0, -2.5))
    x, y = _clustered(600, 3, 0.05, 0.0)
    clean = probe.fit_probe(x, y)
    assert clean.C > 10 ** -2.5
    assert (np.array(clean.predict(x)) == y).all() and clean.predict_proba(x).max(axis=1).min() > 0.9


def test_probe_is_as_accurate_as_scikit_learn_and_faster():
    """scripts/bench_probe.py in small: the whole fit, C search included, against one default
    LogisticRegression fit on one BLAS thread, on held-out rows."""
    import time

    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from indexer.tasks.probe import fit_probe

    x, y = _clustered(3000, 8, 2.0, 0.2)
    train, test = slice(0, 2400), slice(2400, None)
    fit_probe(x[train], y[train])  # warm up imports
    start = time.perf_counter()
    head = fit_probe(x[train], y[train])
    ours = time.perf_counter() - start
    with threadpool_limits(1, user_api="blas"):
        start = time.perf_counter()
        ref = LogisticRegression(max_iter=1000).fit(x[train], y[train])
        theirs = time.perf_counter() - start
    ours_acc = np.mean(np.array(head.predict(x[test])) == y[test])
    assert ours_acc >= np.mean(ref.predict(x[test]) == y[test]) - 0.01
    assert ours < 3 * theirs + 0.2  # a loose bound: a shared machine's timings jump


# ---- labels named the way the user named them --------------------------------------------------------

@pytest.fixture(scope="module")
def topic_jsonl(tmp_path_factory, sample_corpus):
    """The sample sentences with their label in a `topic` field."""
    rows = [json.loads(line) for line in sample_corpus["texts"].read_text().splitlines()]
    return write_jsonl(tmp_path_factory.mktemp("topic") / "notes.jsonl",
                       [{"id": r["id"], "text": r["text"], "topic": r["label"]} for r in rows])


@pytest.fixture(scope="module")
def notes_idx(topic_jsonl):
    coll = topic_jsonl.parent / "notes.idx"
    result = run("ingest", coll, topic_jsonl, "--model", "minilm", "--label-field", "topic", "-q")
    assert result.exit_code == 0, result.output
    return coll


def test_ingest_keeps_the_label_column_and_records_the_users_name(notes_idx, topic_jsonl):
    coll = Collection.open(notes_idx)
    assert coll.manifest.label_field == "topic" and coll.info()["label_field"] == "topic"
    assert "label" in coll.table.schema.names and "topic" not in coll.table.schema.names  # the layout contract
    assert load_labelled(coll, "topic").labels.tolist() == load_labelled(coll, "label").labels.tolist()
    # A re-run without --label-field reads labels where the first run did: nothing changes.
    again = json.loads(run("ingest", notes_idx, topic_jsonl, "--json", "-q").stdout)
    assert again["skipped"] == 48 and again["updated"] == 0
    other = run("ingest", notes_idx, topic_jsonl, "--label-field", "kind", "-q")
    assert other.exit_code == 1 and "'topic'" in other.output and "--label-field 'kind'" in other.output
    unknown = run("knn", notes_idx, "--eval", "--label-field", "kind")
    assert unknown.exit_code == 1 and "no label field 'kind'" in unknown.output
    assert "'topic' (stored as 'label')" in unknown.output and "Traceback" not in unknown.output


def test_knn_and_probe_read_labels_by_the_users_name(notes_idx, tmp_path):
    knn = run("knn", notes_idx, "--eval", "--label-field", "topic", "--json")
    assert knn.exit_code == 0, knn.output
    report = json.loads(knn.stdout)
    assert report["label_field"] == "topic" and report["accuracy"] > 3 * CHANCE and report["n_test"] == 48
    queries = json.dumps({"text": "Photosynthesis in the leaf cells turns light into sugar."}) + "\n"
    preds = json.loads(run("knn", notes_idx, "--predict", "-", "--label-field", "topic", "--json",
                           input=queries).stdout)
    assert preds[0]["label"] == "biology"

    head = tmp_path / "topic.npz"
    probe = run("probe", notes_idx, "--label-field", "topic", "--save", head, "--json")
    assert probe.exit_code == 0, probe.output
    assert json.loads(probe.stdout)["accuracy"] > 3 * CHANCE and ProbeHead.load(head).label_field == "topic"
    preds = json.loads(run("probe", head, "--predict", "-", "--json", input=queries).stdout)
    assert preds[0]["label"] == "biology" and preds[0]["probabilities"]["biology"] > 0.5
    # A labelled test collection ingested the same way.
    test_rows = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": "Saturn has bright rings of ice.",
                                                    "topic": "astronomy"}])
    run("ingest", tmp_path / "test.idx", test_rows, "--label-field", "topic", "-q")
    on_test = json.loads(run("probe", notes_idx, "--label-field", "topic", "--test", tmp_path / "test.idx",
                             "--json").stdout)
    assert on_test["n_test"] == 1 and on_test["accuracy"] == 1.0


def test_layers_and_finetune_read_labels_by_the_users_name(topic_jsonl, tmp_path):
    sweep = run("layers", topic_jsonl, "--label-field", "topic", "--model", "minilm", "--layers", "6",
                "--pooling", "mean", "--folds", 3, "--json", "-q")
    assert sweep.exit_code == 0, sweep.output
    result = json.loads(sweep.stdout)
    assert result["label_field"] == "topic" and result["n_classes"] == 6 and result["unlabelled"] == 0
    ft = run("finetune", topic_jsonl, "--label-field", "topic", "--model", "minilm", "--unfreeze", 0,
             "--epochs", 1, "--out", tmp_path / "head-only", "--device", "cpu", "--json", "-q")
    assert ft.exit_code == 0, ft.output
    assert len(json.loads(ft.stdout)["labels"]) == 6
