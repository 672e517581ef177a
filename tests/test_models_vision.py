"""Image embedders: penultimate and named-layer features, HF vision transformers, and meaning."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageEnhance

from indexer import IndexerError, load_embedder
from indexer.models.vision import ImageTransform


def _photos(sample_corpus, *names):
    return [Image.open(sample_corpus["images"] / f"{n}.jpg").convert("RGB") for n in names]


def _reference_resnet(weights_path):
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    return model.eval()


def test_penultimate_equals_classifier_input(resnet18_weights, sample_corpus):
    emb = load_embedder("resnet18", weights=str(resnet18_weights), normalize=False)
    images = _photos(sample_corpus, "cat", "coffee", "rocket")
    ref, captured = _reference_resnet(resnet18_weights), {}
    ref.fc.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    batch = torch.stack([emb.transform(im) for im in images])
    with torch.no_grad():
        ref(batch)
    assert emb.spec.dim == 512 and emb.spec.layer == "penultimate"
    np.testing.assert_allclose(emb.embed(images), captured["x"].numpy(), atol=1e-4)


def test_named_layer_is_global_average_pooled(resnet18_weights, sample_corpus):
    emb = load_embedder("torchvision:resnet18", weights=str(resnet18_weights), layer="layer3", normalize=False)
    images = _photos(sample_corpus, "cat", "moon")
    ref, captured = _reference_resnet(resnet18_weights), {}
    ref.layer3.register_forward_hook(lambda m, inp, out: captured.update(x=out))
    with torch.no_grad():
        ref(torch.stack([emb.transform(im) for im in images]))
    assert emb.spec.dim == 256
    np.testing.assert_allclose(emb.embed(images), captured["x"].mean(dim=(2, 3)).numpy(), atol=1e-4)


def test_unknown_layer_lists_modules(resnet18_weights):
    with pytest.raises(IndexerError, match="layer4"):
        load_embedder("resnet18", weights=str(resnet18_weights), layer="layer9")


def test_weights_that_do_not_fit_are_refused(resnet18_weights):
    with pytest.raises(IndexerError, match="do not fit"):
        load_embedder("resnet34", weights=str(resnet18_weights))


def test_torchvision_preprocessing_comes_from_the_weights(resnet18_weights):
    emb = load_embedder("resnet18", weights=str(resnet18_weights))
    assert emb.transform == ImageTransform(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")


def _recompressed(image: Image.Image) -> Image.Image:
    small = ImageEnhance.Brightness(image.resize((image.width // 2, image.height // 2))).enhance(1.1)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=50)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_edited_photo_is_nearer_its_original(lite0, sample_corpus):
    names = ["cat", "coffee", "rocket", "astronaut", "palace", "flower", "motorcycle"]
    originals = lite0.embed(_photos(sample_corpus, *names))
    edited = lite0.embed([_recompressed(im) for im in _photos(sample_corpus, *names)])
    sims = edited @ originals.T
    assert lite0.spec.dim == 1280
    assert (sims.argmax(axis=1) == np.arange(len(names))).all()
    assert np.diag(sims).min() > 0.8


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_hf_vision_transformer_pooling(tiny_vit_dir, sample_corpus, pooling):
    from transformers import ViTImageProcessor, ViTModel

    emb = load_embedder(f"hf:{tiny_vit_dir}", pooling=pooling, normalize=False)
    images = _photos(sample_corpus, "cat", "flower")
    proc, model = ViTImageProcessor.from_pretrained(tiny_vit_dir), ViTModel.from_pretrained(tiny_vit_dir).eval()
    with torch.no_grad():
        out = model(**proc(images=images, return_tensors="pt"))
    h = out.last_hidden_state
    ref = {"cls": h[:, 0], "mean": h[:, 1:].mean(1), "pooler": out.pooler_output}[pooling]
    assert emb.modality == "image" and emb.spec.dim == 32
    np.testing.assert_allclose(emb.embed(images), ref.numpy(), atol=1e-5)
