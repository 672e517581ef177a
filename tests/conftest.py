"""Shared fixtures: real packaged models, tiny random models (tests/tiny_models.py), and the sample corpus.
Everything is offline; slow objects are built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch

from indexer.models import load_embedder

from .tiny_models import WORDS, tiny_bert, tiny_vit  # noqa: F401 - WORDS: test modules import it from here


@pytest.fixture(scope="session")
def minilm():
    return load_embedder("minilm")


@pytest.fixture(scope="session")
def lite0():
    return load_embedder("efficientnet-lite0")


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> dict[str, Path]:
    from indexer.sample import write_sample_corpus

    return write_sample_corpus(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A randomly initialised 3-layer BERT with its own WordPiece vocabulary, saved as a model directory."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory) -> Path:
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    return tiny_vit(tmp_path_factory.mktemp("tiny-vit"))


def _byte_level_clip_tokenizer(max_length: int):
    """A CLIP BPE tokenizer whose vocabulary is the 256 byte symbols (alone and word-final) and no merges:
    real tokenisation, 514 tokens, built offline."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length), vocab


@pytest.fixture(scope="session")
def tiny_clip_dirs(tmp_path_factory) -> dict[str, Path]:
    """A random 2-layer CLIPModel and SiglipModel (32x32 images, 8x8 patches) with their processors, saved as
    model directories: {"clip": dir, "siglip": dir}."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
    )

    tok, vocab = _byte_level_clip_tokenizer(64)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(tower, vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(tower, image_size=32, patch_size=8)
    out = {}
    torch.manual_seed(0)
    d = out["clip"] = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval().save_pretrained(d)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(d)
    d = out["siglip"] = tmp_path_factory.mktemp("tiny-siglip")
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval().save_pretrained(d)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
                    tokenizer=tok).save_pretrained(d)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def served_collections(tmp_path_factory, sample_corpus) -> dict[str, Path]:
    """The sample texts (minilm), photos (efficientnet-lite0), chunked Markdown documents (minilm) and
    model-less vectors as four collections, for the HTTP tests."""
    import numpy as np

    from indexer import ingest

    root = tmp_path_factory.mktemp("served")
    ingest(root / "texts.idx", [str(sample_corpus["texts"])], model="minilm", progress=False)
    ingest(root / "images.idx", [str(sample_corpus["images"])], model="efficientnet-lite0", progress=False)
    # Documents cut into passages: three Markdown files, each a few passages long.
    docs = root / "docs"
    docs.mkdir()
    topics = {"astronomy.md": "Telescopes collect light from distant galaxies and stars.",
              "baking.md": "Bread rises because yeast ferments the sugars in the dough.",
              "rates.md": "Central banks raise interest rates to slow down inflation."}
    for name, sentence in topics.items():
        sections = [f"## Part {i}\n\n" + " ".join([sentence] * 6) for i in range(1, 4)]
        (docs / name).write_text(f"# {name[:-3].title()}\n\n" + "\n\n".join(sections) + "\n")
    ingest(root / "docs.idx", [str(docs)], model="minilm", chunk_tokens=64, chunk_overlap=8, progress=False)
    # Vectors with no model: searchable by vector and id only.
    np.save(root / "vectors.npy", np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32))
    ingest(root / "vectors.idx", [str(root / "vectors.npy")], model="none", progress=False)
    return {"texts": root / "texts.idx", "images": root / "images.idx", "docs": root / "docs.idx",
            "vectors": root / "vectors.idx"}


@pytest.fixture(scope="session")
def open_server(served_collections) -> str:
    """A real `indexer serve` process (no token) over the served collections; its base URL. Limits are set low
    so the tests can cross them cheaply: 2 MB bodies, 1 megapixel images."""
    from .serving import running_server

    with running_server(list(served_collections.values()), "--max-body", "2MB", "--max-pixels", "1000000") as url:
        yield url


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the --engine ray tests (2 CPUs, no dashboard, a small object store); its
    address. Shut down at the end of the session."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=500 * 2**20, log_to_driver=False,
             logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
