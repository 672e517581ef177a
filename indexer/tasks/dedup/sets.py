"""Generated near-duplicate sets with known groups, and pair precision/recall against them (tests, README).

>>> sets = write_near_duplicate_sets("/tmp/sets")                    # doctest: +SKIP
>>> sets["image_groups"][0][:2]                                      # doctest: +SKIP
['cat.jpg', 'cat--resize.jpg']
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

from .transforms import IMAGE_TRANSFORMS, TEXT_TRANSFORMS

SET_IMAGE_TRANSFORMS = ("resize", "jpeg", "crop90", "brightness", "flip", "png")


def write_near_duplicate_sets(directory, seed: int = 0) -> dict[str, Any]:
    """Real photos (installed packages) under SET_IMAGE_TRANSFORMS, and two-sentence texts with typos,
    reordering and boilerplate, next to their distinct siblings. Ids are `<original>--<transform>`.
    Returns {"images": dir, "texts": jsonl path, "image_groups": [[id, ...]], "text_groups": [[id, ...]]}."""
    from PIL import Image

    from ...sample import photo_paths

    root = Path(directory)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    image_groups = []
    for name, path in sorted(photo_paths().items()):
        with Image.open(path) as src:
            img = src.convert("RGB")
        img.thumbnail((512, 512))  # photo-sized, and quick to embed in tests
        img.save(images / f"{name}.jpg", quality=92)
        group = [f"{name}.jpg"]
        for t in SET_IMAGE_TRANSFORMS:
            ext = "png" if t == "png" else "jpg"
            IMAGE_TRANSFORMS[t](img).convert("RGB").save(images / f"{name}--{t}.{ext}", quality=90)
            group.append(f"{name}--{t}.{ext}")
        image_groups.append(group)
    with resources.as_file(resources.files("indexer") / "data" / "sample_texts.jsonl") as src:
        sentences = [json.loads(line) for line in Path(src).read_text().splitlines() if line.strip()]
    by_label: dict[str, list[str]] = {}
    for s in sentences:
        by_label.setdefault(s["label"], []).append(s["text"])
    rng = random.Random(seed)
    rows, text_groups = [], []
    for label, texts in sorted(by_label.items()):
        for k in range(0, len(texts) - 1, 2):
            doc_id, doc = f"{label}-{k // 2}", f"{texts[k]} {texts[k + 1]}"
            rows.append({"id": doc_id, "text": doc, "label": label})
            group = [doc_id]
            for t, fn in TEXT_TRANSFORMS.items():
                rows.append({"id": f"{doc_id}--{t}", "text": fn(doc, rng), "label": label})
                group.append(f"{doc_id}--{t}")
            text_groups.append(group)
    texts_path = root / "texts.jsonl"
    texts_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"images": images, "texts": texts_path, "image_groups": image_groups, "text_groups": text_groups}


def pair_scores(found: set[tuple[str, str]], groups: list[list[str]]) -> dict[str, float]:
    """Pair precision and recall of `found` (unordered id pairs) against ground-truth groups."""
    truth = {tuple(sorted((a, b))) for g in groups for k, a in enumerate(g) for b in g[k + 1:]}
    found = {tuple(sorted(p)) for p in found}
    tp = len(found & truth)
    return {"precision": tp / len(found) if found else 1.0, "recall": tp / len(truth) if truth else 1.0,
            "found": len(found), "true": len(truth)}
