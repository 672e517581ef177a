"""A small real corpus for the demo and the tests, made from files installed packages ship.

Photos come from scikit-image's and scikit-learn's bundled sample images (no download); the texts
are short labelled sentences on six topics written for this project.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from PIL import Image, ImageEnhance

# name in the corpus -> file in skimage/data (all are bundled with the package, not fetched)
SKIMAGE_PHOTOS = {
    "cat": "chelsea.png", "coffee": "coffee.png", "rocket": "rocket.jpg", "astronaut": "astronaut.png",
    "galaxies": "hubble_deep_field.jpg", "retina": "retina.jpg", "motorcycle": "motorcycle_left.png",
    "cameraman": "camera.png", "coins": "coins.png", "moon": "moon.png", "bricks": "brick.png",
    "grass": "grass.png", "gravel": "gravel.png", "cells": "ihc.png",
}
SKLEARN_PHOTOS = {"palace": "china.jpg", "flower": "flower.jpg"}


def photo_paths() -> dict[str, Path]:
    """name -> path of each real photo an installed package ships."""
    import skimage.data
    import sklearn.datasets

    sk = Path(skimage.data.__file__).parent
    sl = Path(sklearn.datasets.__file__).parent / "images"
    out = {name: sk / f for name, f in SKIMAGE_PHOTOS.items() if (sk / f).exists()}
    out.update({name: sl / f for name, f in SKLEARN_PHOTOS.items() if (sl / f).exists()})
    return out


# queries/questions.jsonl (for `search --queries`) and queries/notes.jsonl (new unlabelled texts to classify).
QUESTIONS = ("how do plants make energy", "what is the biggest planet", "how should I cook pasta")
NEW_NOTES = {"note-1": "Leaves turn sunlight into sugar in their chloroplasts.",
             "note-2": "The compiler turns source code into machine instructions.",
             "note-3": "Saturn's rings are made of ice and rock."}


def write_sample_corpus(directory: str | Path) -> dict[str, Path]:
    """Write texts.jsonl, images/*.jpg and queries/ (edited copies of two photos, questions and new
    notes to search and classify with). Returns the paths."""
    root = Path(directory)
    images, queries = root / "images", root / "queries"
    images.mkdir(parents=True, exist_ok=True)
    queries.mkdir(parents=True, exist_ok=True)
    with resources.as_file(resources.files("indexer") / "data" / "sample_texts.jsonl") as src:
        shutil.copyfile(src, root / "texts.jsonl")
    photos = photo_paths()
    for name, path in photos.items():
        with Image.open(path) as img:
            img.convert("RGB").save(images / f"{name}.jpg", quality=92)
    # Query images: a crop of the cat, resized, brightened and re-compressed; a small copy of the flower.
    with Image.open(images / "cat.jpg") as cat:
        w, h = cat.size
        crop = cat.crop((int(w * 0.1), int(h * 0.05), int(w * 0.9), int(h * 0.95))).resize((320, 240))
        ImageEnhance.Brightness(crop).enhance(1.2).save(queries / "cat-edited.jpg", quality=60)
    with Image.open(images / "flower.jpg") as flower:
        flower.resize((flower.width // 3, flower.height // 3)).save(queries / "flower-small.png")
    (queries / "questions.jsonl").write_text("".join(json.dumps({"query": q}) + "\n" for q in QUESTIONS))
    (queries / "notes.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in NEW_NOTES.items()))
    return {"texts": root / "texts.jsonl", "images": images, "queries": queries}
