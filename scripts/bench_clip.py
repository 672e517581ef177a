"""Benchmark a joint text-image model in the pipeline: image ingest throughput of a CLIP ViT-B/32-sized
model (transformers' default CLIPConfig is openai/clip-vit-base-patch32's architecture; random weights,
no download) vs EfficientNet-Lite0 in the same run, and the latency of words searching the pictures.

Run from the repository root:

    .venv/bin/python scripts/bench_clip.py [--images 96] [--queries 40] [--out bench-out/bench_clip.json]

Images: the bundled sample photos, each also flipped and cropped until there are `--images` distinct
JPEGs. Both models ingest the same folder into a fresh collection on the CPU (the summary's
items_per_s: model loading, read, decode, preprocess, embed, write), and embed the preprocessed pixels
alone in batches of 32 (embed_items_per_s: the model's forward pass). Text queries: `search(coll, words, k=10)` on the
CLIP image collection, one query at a time after a warm-up, each new words (the text tower runs every
time); image queries with `--image` the same way, for comparison. The tokenizer is CLIP's own BPE
(open_clip's bundled vocabulary, the clip extra). Prints one JSON line (also written to --out).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import tempfile
import time
from pathlib import Path

from benchlib import latency_ms, machine, write_report
from PIL import Image, ImageOps

WORDS = ("red bicycle", "cat asleep", "full moon", "old coins", "a rocket launch", "galaxies in space",
         "a cup of coffee", "grass field", "brick wall", "a palace", "a flower", "gravel road", "a motorcycle",
         "an astronaut", "cells under a microscope", "a man with a camera", "the human retina", "a dog")


def clip_tokenizer():
    """CLIP's BPE tokenizer built from open_clip's bundled merges (the same vocabulary as OpenAI's)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges],
                         model_max_length=77)


def write_clip_b32(directory: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).eval().save_pretrained(directory)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer()).save_pretrained(directory)
    return directory


def write_images(directory: Path, n: int) -> Path:
    from indexer.sample import photo_paths

    directory.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(p).convert("RGB") for p in photo_paths().values()]
    edits = [lambda im: im, ImageOps.mirror, lambda im: im.crop((0, 0, im.width * 9 // 10, im.height * 9 // 10)),
             lambda im: ImageOps.mirror(im.crop((im.width // 10, 0, im.width, im.height)))]
    for i in range(n):
        photo, edit = photos[i % len(photos)], edits[(i // len(photos)) % len(edits)]
        edit(photo).save(directory / f"img{i:04d}.jpg", quality=90)
    return directory


def embed_rate(model: str, images: Path, batch: int = 32) -> float:
    """Images per second through the model alone: preprocessed pixels in, vectors out (no reading, no writing)."""
    import torch

    from indexer.models import load_embedder, resolve_runtime

    emb = load_embedder(model, resolve_runtime("cpu"))
    fn = emb.preprocess_fn()
    pixels = torch.stack([fn(Image.open(p).convert("RGB")) for p in sorted(images.glob("*.jpg"))])
    emb.embed_batch(pixels[:2])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        emb.embed_batch(pixels[i : i + batch])
    return len(pixels) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--out", default="bench-out/bench_clip.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from indexer import Collection, ingest, search

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = write_images(root / "images", args.images)
        model_dir = write_clip_b32(root / "clip-b32")
        model = f"clip:{model_dir}"
        ingest_rows = {}
        for name, m in (("efficientnet-lite0", "efficientnet-lite0"), ("clip-vit-b32-random", model)):
            start = time.perf_counter()
            summary = ingest(root / f"{name}.idx", [str(images)], model=m, device="cpu", progress=False)
            ingest_rows[name] = {"items": summary.added, "items_per_s": round(summary.items_per_s, 2),
                                 "seconds": round(time.perf_counter() - start, 2),
                                 "embed_items_per_s": round(embed_rate(m, images), 2),
                                 "dim": Collection.open(root / f"{name}.idx").spec.dim}
        coll = Collection.open(root / "clip-vit-b32-random.idx")
        search(coll, "warm up", k=10, device="cpu")  # loads the model once; queries then take the text tower only
        text_s, image_s = [], []
        for i in range(args.queries):
            words = f"{WORDS[i % len(WORDS)]} {i}"  # never the same words twice
            start = time.perf_counter()
            search(coll, words, k=10, device="cpu")
            text_s.append(time.perf_counter() - start)
        for i in range(min(args.queries, args.images)):
            start = time.perf_counter()
            search(coll, image=str(images / f"img{i:04d}.jpg"), k=10, device="cpu")
            image_s.append(time.perf_counter() - start)

    lite, clip = ingest_rows["efficientnet-lite0"], ingest_rows["clip-vit-b32-random"]
    report = {
        "benchmark": "clip", "images": args.images, "queries": args.queries, "torch_threads": torch.get_num_threads(),
        "ingest": ingest_rows, "clip_vs_lite0_throughput": round(clip["items_per_s"] / lite["items_per_s"], 3),
        "text_query": {k: round(v, 2) for k, v in latency_ms(text_s).items()},
        "image_query": {k: round(v, 2) for k, v in latency_ms(image_s).items()},
        "machine": machine(),
    }
    write_report(args.out, report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
