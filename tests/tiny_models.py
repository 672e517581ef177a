"""Tiny random models saved as model directories, for the tests and the reliability report (which runs
outside pytest): offline, built in a second, real transformers models."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a cat dog sat on mat ran fast slow red blue green house tree car road sun moon star water fire "
         "stone market price bank loan river city music song game ball team win lose").split()


def tiny_bert(d: Path) -> Path:
    """A randomly initialised 3-layer BERT with its own WordPiece vocabulary, saved in `d`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"],
             *"abcdefghijklmnopqrstuvwxyz"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"), model_max_length=32)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_vit(d: Path) -> Path:
    """A randomly initialised 2-layer ViT on 32x32 images (8x8 patches), saved in `d`."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64)
    ViTModel(cfg).eval().save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d
