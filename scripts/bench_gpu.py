"""GPU throughput of `indexer.ingest`, end to end into a collection; run by scripts/bench_gpu.sh.

    bash scripts/bench_gpu.sh            # on a GPU machine: well under 10 minutes on one H200, 16 cores
    bash scripts/bench_gpu.sh --smoke    # small sizes on whatever device there is (CI runs it on a CPU)

Three ingests into fresh collections, each timed from the call to the committed rows (model load
included): MiniLM on generated passages (fp16 on a GPU), ResNet-50 and EfficientNet-Lite0 on generated
ImageNet-sized JPEG files on disk (longest side 400-640 px). ResNet-50's weights are randomly initialised
(torchvision's cannot be downloaded here); throughput does not depend on the weights. GPU utilisation is
sampled every 0.2 s while each ingest runs (torch.cuda.utilization, else nvidia-smi). Prints one JSON on
stdout: per model items/s, the stage split and the bottleneck, utilisation, and the issue's targets.
Generated inputs are cached under /tmp/indexer-bench-cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from benchlib import machine, no_auto_index, sample_sentences, write_jsonl, write_report

import indexer
from indexer.sample import photo_paths

log = logging.getLogger("bench_gpu")

CACHE = Path(tempfile.gettempdir()) / "indexer-bench-cache"
TARGETS = {"minilm_texts_per_s": 20_000, "resnet50_images_per_s": 5_000}  # issue 14, on a GPU
FULL = {"texts": 200_000, "images": 20_000}
SMOKE = {"texts": 16, "images": 8}


# ---- inputs -----------------------------------------------------------------------------------------------

def make_texts(n: int, path: Path) -> Path:
    """n passages of 1-8 sample sentences, words lightly shuffled (the same file for the same n)."""
    if path.exists():
        return path
    rng = random.Random(n)
    sentences = [s for group in sample_sentences().values() for s in group]
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 8))).split()
        j = rng.randrange(len(words) - 1)
        words[j], words[j + 1] = words[j + 1], words[j]
        rows.append({"id": f"t{i:07d}", "text": " ".join(words)})
    tmp = path.with_suffix(".tmp")
    write_jsonl(rows, tmp)
    os.replace(tmp, path)
    return path


def make_photo(i: int, sources: list[str], out_dir: str) -> None:
    """Photo i: a random crop of a sample photo, longest side 400-640 px (ImageNet's sizes), JPEG q90."""
    from PIL import Image

    rng = random.Random(i)
    with Image.open(sources[rng.randrange(len(sources))]) as src:
        img = src.convert("RGB")
    w, h = img.size
    cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    scale = rng.randint(400, 640) / max(cw, ch)
    img = img.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)), Image.BILINEAR)
    path = Path(out_dir) / f"photo_{i:06d}.jpg"
    img.save(path.with_suffix(".tmp"), "JPEG", quality=90)
    os.replace(path.with_suffix(".tmp"), path)


def make_photos(m: int) -> Path:
    folder = CACHE / f"gpu-photos-n{m}"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(m) if not (folder / f"photo_{i:06d}.jpg").exists()]
    if missing:
        sources = [str(p) for _, p in sorted(photo_paths().items())]
        log.info("generating %d JPEGs in %s", len(missing), folder)
        # spawn: forking a process that holds torch's and lance's threads is not safe
        with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(partial(make_photo, sources=sources, out_dir=str(folder)), missing, chunksize=64))
    return folder


def resnet50_random_weights() -> Path:
    import torchvision

    path = CACHE / "resnet50-random-init.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    return path


# ---- GPU utilisation --------------------------------------------------------------------------------------

def gpu_utilization() -> list[float] | None:
    """Percent busy per GPU now, or None where it cannot be read."""
    try:
        return [float(torch.cuda.utilization(i)) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - needs pynvml; nvidia-smi comes with the driver
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        return [float(v) for v in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class Sampler:
    """Samples GPU utilisation in a thread while a `with` block runs."""

    def __init__(self, every: float = 0.2):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            util = gpu_utilization()
            if util is None:
                return
            self.samples.append(util)

    def __enter__(self) -> Sampler:
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        per_sample = [sum(s) / len(s) for s in self.samples]  # mean over the GPUs
        return {"mean_percent": round(sum(per_sample) / len(per_sample), 1), "max_percent": max(per_sample),
                "samples": len(self.samples)}


# ---- the runs ---------------------------------------------------------------------------------------------

def run_ingest(name: str, sources: list[str], work: Path, **kw) -> dict:
    """One ingest into a fresh collection: items/s end to end (model load included), the stage split."""
    coll = work / f"{name}.idx"
    with Sampler() as gpu:
        start = time.perf_counter()
        summary = indexer.ingest(coll, sources, progress=False, **kw)
        seconds = time.perf_counter() - start
    items = summary.added + summary.updated
    log.info("%s: %d items in %.1fs (%.0f/s), slowest stage %s", name, items, seconds, items / seconds,
             summary.bottleneck)
    return {"items": items, "errors": summary.errors, "seconds": round(seconds, 3),
            "items_per_s": round(items / seconds, 2), "stages": summary.stages, "bottleneck": summary.bottleneck,
            "gpu_utilization": gpu.summary(), **{k: v for k, v in kw.items() if k in ("precision", "batch_size")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help=f"small sizes ({SMOKE['texts']} texts, "
                   f"{SMOKE['images']} images), for CI on a CPU")
    p.add_argument("--texts", type=int, help=f"MiniLM passages (default {FULL['texts']})")
    p.add_argument("--images", type=int, help=f"JPEG files for each CNN (default {FULL['images']})")
    p.add_argument("--batch-size", type=int, help="default: sized from free GPU memory (the model's default on a CPU)")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="ray: one embedding worker per GPU (machines with several GPUs)")
    p.add_argument("--out", type=Path, default=Path("bench-out/bench_gpu.json"), help="the JSON report, also written here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    sizes = SMOKE if args.smoke else FULL
    n_texts, n_images = args.texts or sizes["texts"], args.images or sizes["images"]
    cuda = torch.cuda.is_available()
    precision = "fp16" if cuda else "fp32"
    no_auto_index()  # an ANN build past 100,000 rows is not ingest throughput
    started = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    texts = make_texts(n_texts, CACHE / f"gpu-texts-n{n_texts}.jsonl")
    photos = make_photos(n_images)
    weights = resnet50_random_weights()
    common = {"precision": precision, "batch_size": args.batch_size, "engine": args.engine}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        runs = {
            "minilm": run_ingest("minilm", [str(texts)], work, model="minilm", **common),
            "resnet50": {**run_ingest("resnet50", [str(photos)], work, model="resnet50", weights=str(weights), **common),
                         "weights": "random init: torchvision's weights need a download; throughput does not "
                                    "depend on the weights"},
            "efficientnet_lite0": run_ingest("efficientnet_lite0", [str(photos)], work, model="efficientnet-lite0",
                                             **common),
        }
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "smoke": args.smoke, "engine": args.engine, "texts": n_texts, "images": n_images,
        "image_files": "generated JPEGs, longest side 400-640 px",
        "minilm_texts_per_s": runs["minilm"]["items_per_s"],
        "resnet50_images_per_s": runs["resnet50"]["items_per_s"],
        "efficientnet_lite0_images_per_s": runs["efficientnet_lite0"]["items_per_s"],
        "targets": {k: {"target": v, "measured": runs[k.split("_")[0]]["items_per_s"],
                        "met": runs[k.split("_")[0]]["items_per_s"] >= v} for k, v in TARGETS.items()} if cuda else None,
        "runs": runs, "machine": machine(), "seconds": round(time.perf_counter() - started, 1),
    }
    write_report(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
