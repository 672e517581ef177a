"""Joint text-image models (clip:): tiny random CLIP and SigLIP checked against their own towers, words
searching pictures and pictures searching words, and the manifest refusing another model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from indexer import Collection, ingest, search
from indexer.cli import cli
from indexer.errors import IndexerError
from indexer.models import load_embedder

WORDS = ["a red bicycle", "a cat asleep on a sofa", "the moon at night", "coins on a table"]


class Towers:
    """The model's own features, computed the way its processor and model card say: the reference."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModel, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self.siglip = self.model.config.model_type == "siglip"

    @torch.inference_mode()
    def text(self, texts: list[str]) -> np.ndarray:
        enc = self.processor.tokenizer(texts, padding="max_length" if self.siglip else True,
                                          truncation=True, return_tensors="pt")
        return F.normalize(self.model.get_text_features(**enc).pooler_output, dim=-1).numpy()

    @torch.inference_mode()
    def image(self, paths: list[Path]) -> np.ndarray:
        images = [Image.open(p).convert("RGB") for p in paths]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1).numpy()

    @torch.inference_mode()
    def logits(self, images: list[Path], texts: list[str]) -> np.ndarray:
        """(images, texts) logits of the model's own forward pass."""
        enc = self.processor.tokenizer(texts, padding="max_length" if self.siglip else True,
                                          truncation=True, return_tensors="pt")
        pixels = self.processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
        return self.model(**enc, pixel_values=pixels["pixel_values"]).logits_per_image.numpy()


@pytest.fixture(scope="module", params=["clip", "siglip"])
def family(request, tiny_clip_dirs):
    return request.param, tiny_clip_dirs[request.param]


@pytest.fixture(scope="module")
def photos(sample_corpus) -> list[Path]:
    return sorted(sample_corpus["images"].glob("*.jpg"))


@pytest.fixture(scope="module")
def image_coll(tmp_path_factory, family, sample_corpus) -> Path:
    """The sample photos embedded with the family's image tower."""
    name, model_dir = family
    path = tmp_path_factory.mktemp(f"{name}-images") / "photos.idx"
    ingest(path, [str(sample_corpus["images"])], model=f"clip:{model_dir}", progress=False)
    return path


def test_vectors_equal_the_models_own_features(family, photos):
    _, model_dir = family
    emb = load_embedder(f"clip:{model_dir}")
    ref = Towers(model_dir)
    np.testing.assert_allclose(emb.embed(WORDS), ref.text(WORDS), atol=1e-5)
    np.testing.assert_allclose(emb.embed([Image.open(p).convert("RGB") for p in photos[:5]]),
                               ref.image(photos[:5]), atol=1e-5)
    # A mixed batch goes through both towers and keeps its order.
    mixed = emb.embed([WORDS[0], Image.open(photos[0]).convert("RGB"), WORDS[1]])
    np.testing.assert_allclose(mixed, np.stack([ref.text(WORDS[:1])[0], ref.image(photos[:1])[0],
                                                ref.text(WORDS[1:2])[0]]), atol=1e-5)
    assert emb.spec.joint and set(emb.spec.towers) == {"text", "image"}
    assert emb.spec.dim == emb.embed(WORDS[:1]).shape[1]


def test_the_manifest_records_both_towers(image_coll, family):
    manifest = json.loads((image_coll / "manifest.json").read_text())["model"]
    assert manifest["name"] == f"clip:{family[1]}" and manifest["modality"] == "image"
    assert manifest["layer"] == "projection"
    assert manifest["towers"]["text"]["max_length"] == 64
    assert manifest["towers"]["image"]["size"] in ({"height": 32, "width": 32}, {"shortest_edge": 32})


def test_words_find_the_picture_whose_tower_output_is_nearest(image_coll, family, photos):
    ref = Towers(family[1])
    images = ref.image(photos)
    for words in WORDS:
        expected = images @ ref.text([words])[0]
        hits = search(image_coll, words, k=3)
        assert [h["id"] for h in hits] == [photos[i].name for i in np.argsort(-expected)[:3]]
        assert hits[0]["score"] == pytest.approx(expected.max(), abs=1e-5)


def test_pictures_find_words_in_a_text_collection(tmp_path, family, sample_corpus, photos):
    _, model_dir = family
    path = tmp_path / "notes.idx"
    ingest(path, [str(sample_corpus["texts"])], model=f"clip:{model_dir}", progress=False)
    assert Collection.open(path).spec.modality == "text"
    rows = [json.loads(line) for line in sample_corpus["texts"].read_text().splitlines()]
    ref = Towers(model_dir)
    expected = ref.text([r["text"] for r in rows]) @ ref.image(photos[:1])[0]
    hits = search(path, image=str(photos[0]), k=1)
    assert hits[0]["id"] == str(rows[int(np.argmax(expected))]["id"])
    assert hits[0]["score"] == pytest.approx(expected.max(), abs=1e-5)


def test_cli_searches_pictures_with_words(image_coll, family, photos):
    res = CliRunner().invoke(cli, ["search", str(image_coll), WORDS[0], "-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    ref = Towers(family[1])
    best = int(np.argmax(ref.image(photos) @ ref.text(WORDS[:1])[0]))
    assert json.loads(res.output)[0]["id"] == photos[best].name


def test_another_model_is_refused(image_coll, family, tiny_clip_dirs, sample_corpus):
    other = tiny_clip_dirs["siglip" if family[0] == "clip" else "clip"]
    with pytest.raises(IndexerError, match="refusing"):
        ingest(image_coll, [str(sample_corpus["images"])], model=f"clip:{other}", progress=False)


def test_a_hidden_layer_is_its_towers_own(tmp_path, tiny_clip_dirs, photos):
    emb = load_embedder(f"clip:{tiny_clip_dirs['clip']}", layer="1", pooling="cls")
    assert (emb.spec.layer, emb.spec.pooling, emb.spec.dim, emb.spec.joint) == (1, "cls", 32, False)
    assert not emb.spec.accepts("text")
    ref = Towers(tiny_clip_dirs["clip"])
    pixels = ref.processor(images=[Image.open(photos[0]).convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        hidden = ref.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[1][:, 0]
    np.testing.assert_allclose(emb.embed([Image.open(photos[0]).convert("RGB")]),
                               F.normalize(hidden, dim=-1).numpy(), atol=1e-5)
    with pytest.raises(IndexerError, match="image tower"):
        emb.embed(["words"])


def test_single_tower_models_still_refuse_the_other_modality(tmp_path, tiny_vit_dir, sample_corpus):
    path = tmp_path / "vit.idx"
    ingest(path, [str(sample_corpus["images"])], model=f"hf:{tiny_vit_dir}", progress=False)
    with pytest.raises(IndexerError, match="search it with --image"):
        search(path, "a red bicycle")


def test_a_model_without_two_towers_is_refused(tiny_vit_dir):
    with pytest.raises(IndexerError, match="processor|not a joint"):
        load_embedder(f"clip:{tiny_vit_dir}")


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> tuple[str, Path]:
    """A tiny open_clip architecture registered in this process, and a random checkpoint of it."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is in the clip extra")
    d = tmp_path_factory.mktemp("open-clip")
    (d / "tiny-open-clip.json").write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(d / "tiny-open-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-open-clip")
    torch.save(model.state_dict(), d / "weights.pt")
    return "tiny-open-clip", d / "weights.pt"


def test_open_clip_vectors_and_words_searching_pictures(tiny_open_clip, tmp_path, sample_corpus, photos):
    import open_clip

    arch, weights = tiny_open_clip
    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    with torch.inference_mode():
        text = F.normalize(model.eval().encode_text(open_clip.get_tokenizer(arch)(WORDS)), dim=-1).numpy()
        images = F.normalize(model.encode_image(torch.stack([transform(Image.open(p)) for p in photos])),
                             dim=-1).numpy()
    emb = load_embedder(f"open_clip:{arch}", weights=str(weights))
    np.testing.assert_allclose(emb.embed(WORDS), text, atol=1e-5)
    path = tmp_path / "photos.idx"
    ingest(path, [str(sample_corpus["images"])], model=f"open_clip:{arch}", weights=str(weights), progress=False)
    stored = Collection.open(path).rows_by_id([photos[3].name], columns=["id", "vector"])[photos[3].name]["vector"]
    np.testing.assert_allclose(stored, images[3], atol=1e-5)
    hits = search(path, WORDS[2], k=1)
    assert hits[0]["id"] == photos[int(np.argmax(images @ text[2]))].name


def test_open_clip_names_its_weights(tiny_open_clip):
    pytest.importorskip("open_clip")
    with pytest.raises(IndexerError, match="--weights FILE"):
        load_embedder(f"open_clip:{tiny_open_clip[0]}")
    with pytest.raises(IndexerError, match="unknown open_clip architecture"):
        load_embedder("open_clip:no-such-arch/laion")


def test_serve_answers_words_on_pictures_and_pictures_on_words(image_coll, family, photos, tmp_path, sample_corpus):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from indexer.serve.app import create_app

    notes = tmp_path / "notes.idx"
    ingest(notes, [str(sample_corpus["texts"])], model=f"clip:{family[1]}", progress=False)
    ref = Towers(family[1])
    with TestClient(create_app([image_coll, notes]), base_url="http://127.0.0.1") as client:
        colls = {c["name"]: c for c in client.get("/collections").json()["collections"]}
        assert colls["photos"]["queries"] == colls["notes"]["queries"] == ["text", "image"]
        r = client.post("/search", json={"collection": "photos", "query": WORDS[0], "k": 3})
        assert r.status_code == 200, r.text
        best = int(np.argmax(ref.image(photos) @ ref.text(WORDS[:1])[0]))
        top = r.json()["results"][0]
        assert top["id"] == photos[best].name and top["image_url"]  # the page shows it as a thumbnail
        r = client.post("/search", files={"image": ("q.jpg", photos[0].read_bytes(), "image/jpeg")},
                        data={"collection": "notes", "k": "1"})
        assert r.status_code == 200, r.text
        r = client.post("/embed", json={"collection": "photos", "input": WORDS[:2]})
        np.testing.assert_allclose(np.array(r.json()["embeddings"]), ref.text(WORDS[:2]), atol=1e-5)


CLASSES = ["cat", "moon", "coins", "flower"]


def test_zero_shot_labels_are_the_argmax_of_the_models_own_logits(image_coll, family, photos):
    from indexer import zero_shot_predict

    ref = Towers(family[1])
    logits = ref.logits(photos, [f"a photo of a {c}" for c in CLASSES])
    preds = {p["id"]: p for p in zero_shot_predict(image_coll, ",".join(CLASSES))}
    assert len(preds) == len(photos)
    for path, row in zip(photos, logits):
        assert preds[path.name]["label"] == CLASSES[int(np.argmax(row))]
        # The model's own head: softmax over the prompts for CLIP, a sigmoid per prompt for SigLIP.
        expected = 1 / (1 + np.exp(-row)) if family[0] == "siglip" else np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        got = np.array([preds[path.name]["probabilities"][c] for c in CLASSES])
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_zero_shot_eval_scores_against_stored_labels(tmp_path, family, photos):
    """Labelled photos in a table; --eval --json has the k-NN report's keys and counts the model's own argmax."""
    names = CLASSES + ["cells"]
    rows = [{"id": p.stem, "image": str(p), "kind": p.stem} for p in photos if p.stem in names]
    table = tmp_path / "photos.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    coll = tmp_path / "labelled.idx"
    runner = CliRunner()
    res = runner.invoke(cli, ["ingest", str(coll), str(table), "--model", f"clip:{family[1]}", "--label-field", "kind",
                              "-q"])
    assert res.exit_code == 0, res.output
    (tmp_path / "classes.txt").write_text("# the photos' subjects\n" + "\n".join(names) + "\n")
    res = runner.invoke(cli, ["knn", str(coll), "--eval", "--zero-shot", str(tmp_path / "classes.txt"),
                              "--label-field", "kind", "--template", "a photo of a {}", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    knn_keys = {"accuracy", "macro_f1", "per_class", "classes", "confusion", "k", "temperature", "vote", "n_train",
                "n_test", "unlabelled", "engine", "label_field"}
    assert knn_keys <= report.keys()
    ref = Towers(family[1])
    picked = [p for p in photos if p.stem in names]
    logits = ref.logits(picked, [f"a photo of a {c}" for c in names])
    expected = np.mean([names[int(np.argmax(row))] == p.stem for p, row in zip(picked, logits)])
    assert report["n_test"] == len(names) and report["accuracy"] == pytest.approx(expected)


def test_zero_shot_needs_a_joint_model_and_a_template_slot(tmp_path, tiny_vit_dir, sample_corpus, image_coll):
    path = tmp_path / "vit.idx"
    ingest(path, [str(sample_corpus["images"])], model=f"hf:{tiny_vit_dir}", progress=False)
    runner = CliRunner()
    res = runner.invoke(cli, ["knn", str(path), "--zero-shot", "cat,dog"])
    assert res.exit_code == 1 and "joint text-image model" in res.output
    res = runner.invoke(cli, ["knn", str(image_coll), "--zero-shot", "cat,dog", "--template", "a photo"])
    assert res.exit_code == 1 and "has no {}" in res.output
    res = runner.invoke(cli, ["knn", str(image_coll), "--zero-shot", "cat"])
    assert res.exit_code == 1 and "at least two" in res.output


@pytest.fixture(scope="module")
def labelled_photos(tmp_path_factory, tiny_clip_dirs, photos) -> tuple[Path, Path]:
    """The photos in a table labelled by an arbitrary half split (8 + 8), and their CLIP collection."""
    root = tmp_path_factory.mktemp("labelled")
    table = root / "photos.jsonl"
    table.write_text("".join(json.dumps({"id": p.stem, "image": str(p), "label": "ab"[i % 2]}) + "\n"
                             for i, p in enumerate(photos)))
    coll = root / "photos.idx"
    ingest(coll, [str(table)], model=f"clip:{tiny_clip_dirs['clip']}", progress=False)
    return table, coll


def test_layer_sweep_reads_the_image_tower_and_its_projection(labelled_photos, tiny_clip_dirs, photos):
    from indexer import sweep_layers
    from indexer.models.layers import embed_layers, parse_layers

    table, coll = labelled_photos
    emb = load_embedder(f"clip:{tiny_clip_dirs['clip']}")
    keys = parse_layers("1,projection", emb)
    assert keys == [(1, "cls"), (1, "mean"), ("projection", "projection")]
    images = [Image.open(p).convert("RGB") for p in photos]
    feats = embed_layers(emb, images, keys)
    np.testing.assert_allclose(feats[("projection", "projection")], Towers(tiny_clip_dirs["clip"]).image(photos), atol=1e-5)
    ref = Towers(tiny_clip_dirs["clip"])
    pixels = ref.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        hidden = ref.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
    np.testing.assert_allclose(feats[(1, "cls")], F.normalize(hidden[:, 0], dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(feats[(1, "mean")], F.normalize(hidden.mean(1), dim=-1).numpy(), atol=1e-5)

    result = sweep_layers([str(table)], "label", model=f"clip:{tiny_clip_dirs['clip']}", folds=2, k=3)
    assert result["modality"] == "image"
    assert [(r["layer"], r["pooling"]) for r in result["rows"]] == [
        *((i, p) for i in range(3) for p in ("cls", "mean")), ("projection", "projection")]
    assert result["best"]["flags"].startswith(f"--model clip:{tiny_clip_dirs['clip']}")


def test_knn_predict_probe_and_dedup_against_on_a_clip_collection(labelled_photos, tiny_clip_dirs, photos, tmp_path):
    from indexer import dedup, knn_predict, probe_eval, probe_predict

    _, coll = labelled_photos
    # Pictures are their own nearest neighbours; words are classified by the pictures nearest them.
    preds = knn_predict(coll, [str(photos[0]), str(photos[1])], k=3)
    assert [p["neighbours"][0]["id"] for p in preds] == [photos[0].stem, photos[1].stem]
    assert preds[0]["neighbours"][0]["score"] == pytest.approx(1, abs=1e-5)
    words = knn_predict(coll, items=[WORDS[0]], k=3)[0]
    assert [n["id"] for n in words["neighbours"]] == [h["id"] for h in search(coll, WORDS[0], k=3)]
    assert probe_eval(coll, "label", folds=2)["n_test"] == len(photos)
    assert probe_predict(coll, items=[WORDS[0], Image.open(photos[0]).convert("RGB")])[1]["label"] in ("a", "b")
    # A few of the photos again, alone: every one is a duplicate of its copy in the full collection.
    few = tmp_path / "few"
    few.mkdir()
    for p in photos[:3]:
        (few / p.name).write_bytes(p.read_bytes())
    ingest(tmp_path / "few.idx", [str(few)], model=f"clip:{tiny_clip_dirs['clip']}", progress=False)
    report = dedup(tmp_path / "few.idx", against=coll, threshold=0.99)
    copies = [(p["a"], p["b"]) for p in report.pairs if p["score"] > 1 - 1e-5]
    assert sorted(copies) == sorted((p.name, p.stem) for p in photos[:3])


def test_a_queries_file_mixes_words_and_pictures(image_coll, photos, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query": WORDS[1]}) + "\n" + json.dumps({"image": str(photos[2])}) + "\n"
                       + json.dumps({"query": WORDS[3]}) + "\n")
    res = CliRunner().invoke(cli, ["search", str(image_coll), "--queries", str(queries), "-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.output.splitlines()]
    alone = [search(image_coll, WORDS[1], k=2), search(image_coll, image=str(photos[2]), k=2),
             search(image_coll, WORDS[3], k=2)]
    for line, hits in zip(lines, alone):  # batched with the other kind, each as it is alone
        assert [h["id"] for h in line["results"]] == [h["id"] for h in hits]
        np.testing.assert_allclose([h["score"] for h in line["results"]], [h["score"] for h in hits], atol=1e-5)
    info = CliRunner().invoke(cli, ["info", str(image_coll)])
    assert info.exit_code == 0 and "clip:" in info.output


def test_open_clip_missing_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an install without the extra sees
    with pytest.raises(IndexerError, match=r"\[clip\]"):
        load_embedder("open_clip:ViT-B-32/laion2b_s34b_b79k")
