"""Time per epoch of `indexer finetune` on this machine for both packaged models.

Data (made here, offline): N_TEXTS sentences on six topics (the sample corpus sentences with random
words appended) for MiniLM, and N_IMAGES edits (crops, flips, brightness, rotations) of the sample
photos, labelled by photo, for EfficientNet-Lite0. Each model is timed with the head alone
(--unfreeze 0) and with its top blocks unfrozen, in the same run, so the ratio is meaningful on a
shared machine. Prints the load average beside the figures, and the process CPU time per epoch (all
threads), which a busy machine inflates much less than wall time.

    nice -n 5 .venv/bin/python scripts/bench_finetune.py [--quick] [--texts 500] [--images 200] [--epochs 2]
                                                          [--out bench-out/bench_finetune.json]

`--quick`: 120 texts, 48 images, one epoch (a few minutes; most of it model loads and embedding passes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

from benchlib import load_average, machine, timed, write_jsonl, write_report
from PIL import Image, ImageEnhance, ImageOps

from indexer.sample import write_sample_corpus
from indexer.tasks.finetune import finetune

WORDS = ("the a cat dog sat on mat ran fast slow red blue green house tree car road sun moon star water fire "
         "stone market price bank loan river city music song game ball team win lose").split()


def make_texts(root: Path, corpus: dict[str, Path], n: int, rng: random.Random) -> Path:
    rows = [json.loads(line) for line in corpus["texts"].read_text().splitlines()]
    out = []
    for i in range(n):
        r = rng.choice(rows)
        out.append({"id": f"t{i}", "text": r["text"] + " " + " ".join(rng.choices(WORDS, k=rng.randint(3, 15))),
                    "label": r["label"]})
    return write_jsonl(out, root / "texts.jsonl")


def make_images(root: Path, corpus: dict[str, Path], n: int, rng: random.Random) -> Path:
    photos = sorted(corpus["images"].glob("*.jpg"))
    (root / "img").mkdir()
    rows = []
    for i in range(n):
        src = photos[i % len(photos)]
        with Image.open(src) as img:
            im = img.convert("RGB")
        w, h = im.size
        left, top = rng.randint(0, w // 5), rng.randint(0, h // 5)
        im = im.crop((left, top, left + w * 4 // 5, top + h * 4 // 5)).resize((320, 240))
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3)).rotate(rng.uniform(-15, 15))
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        name = f"img/{src.stem}-{i}.jpg"
        im.save(root / name, quality=90)
        rows.append({"image": name, "label": src.stem})
    return write_jsonl(rows, root / "images.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=500)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="120 texts, 48 images, one epoch (a few minutes)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/bench_finetune.json"), help="JSON report path")
    args = parser.parse_args()
    if args.quick:
        args.texts, args.images, args.epochs = 120, 48, 1
    import torch

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_sample_corpus(root / "sample")
        runs = [("minilm", make_texts(root, corpus, args.texts, rng), args.texts, (0, 2)),
                ("efficientnet-lite0", make_images(root, corpus, args.images, rng), args.images, (0, 3))]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
              f"{args.epochs} epochs, batch {args.batch_size}; 20% of each class held out for the test split, 20% "
              "of the rest for validation; seconds per epoch = train + validation; probe accuracy on the test split",
              file=sys.stderr)
        print(f"{'model':<20}{'items':>7}{'unfreeze':>10}{'s/epoch':>9}{'CPU s/epoch':>13}{'train items/s':>15}"
              f"{'base probe':>12}{'tuned probe':>12}{'load avg (1m)':>15}")
        results = []
        for model, src, n, unfreezes in runs:
            for unfreeze in unfreezes:
                report, total = timed(finetune, [str(src)], "label", model=model, unfreeze=unfreeze,
                                      out=root / f"{model}-{unfreeze}", epochs=args.epochs, batch_size=args.batch_size,
                                      patience=args.epochs, device="cpu", progress=False)
                per_epoch = report.seconds_per_epoch
                cpu = sum(h["cpu_seconds"] for h in report.history) / len(report.history)
                row = {"model": model, "items": n, "unfreeze": unfreeze, "seconds_per_epoch": per_epoch,
                       "cpu_seconds_per_epoch": cpu, "train_items_per_s": report.n_train / per_epoch,
                       "base_probe_accuracy": report.comparison["base"]["probe_accuracy"],
                       "tuned_probe_accuracy": report.comparison["finetuned"]["probe_accuracy"],
                       "total_seconds": total, "load_avg": load_average()}
                results.append(row)
                print(f"{model:<20}{n:>7}{unfreeze:>10}{per_epoch:>9.1f}{cpu:>13.1f}{row['train_items_per_s']:>15.1f}"
                      f"{row['base_probe_accuracy']:>12.3f}{row['tuned_probe_accuracy']:>12.3f}"
                      f"{row['load_avg'][0]:>15.2f}", flush=True)
                print(f"  total {total:.1f}s incl. model load and the before/after embedding passes", file=sys.stderr)
    write_report(args.out, {"epochs": args.epochs, "batch_size": args.batch_size, "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "machine": machine(), "runs": results})


if __name__ == "__main__":
    main()
