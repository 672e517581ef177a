"""Known edits that make near-duplicates: image transformations and text edits (calibration, test sets)."""

from __future__ import annotations

import io
import random
import re
from collections.abc import Callable


def _jpeg(img, quality: int = 35):
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    from PIL import Image

    return Image.open(buf).convert("RGB")


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    buf.seek(0)
    from PIL import Image

    return Image.open(buf).convert("RGB")


def _crop(img, keep: float = 0.9):
    w, h = img.size
    dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return img.crop((dx, dy, w - dx, h - dy))


def _brightness(img, factor: float = 1.3):
    from PIL import ImageEnhance

    return ImageEnhance.Brightness(img).enhance(factor)


def _resize(img, scale: float = 0.5):
    return img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))


def _flip(img):
    from PIL import ImageOps

    return ImageOps.mirror(img)


def _grayscale(img):
    return img.convert("L").convert("RGB")


IMAGE_TRANSFORMS: dict[str, Callable] = {
    "resize": _resize, "jpeg": _jpeg, "crop90": _crop, "brightness": _brightness, "flip": _flip,
    "grayscale": _grayscale, "png": _png,
}

BOILERPLATE = ("Posted by the editorial team. All rights reserved.", "Click here to subscribe to our newsletter.",
               "This article was originally published on our website.")


def typos(text: str, rng: random.Random, rate: float = 0.03) -> str:
    """Swap, drop or double about `rate` of the letters (at least one edit)."""
    chars = list(text)
    letters = [k for k, c in enumerate(chars) if c.isalpha()]
    if not letters:  # "2023", "": nothing to misspell
        return text
    for k in sorted(rng.sample(letters, max(1, int(len(letters) * rate))), reverse=True):
        op = rng.choice(("swap", "drop", "double"))
        if op == "swap" and k + 1 < len(chars):
            chars[k], chars[k + 1] = chars[k + 1], chars[k]
        elif op == "drop":
            del chars[k]
        else:
            chars.insert(k, chars[k])
    return "".join(chars)


def reorder(text: str, rng: random.Random) -> str:
    """Sentences in another order (a single sentence: its clauses rotated at a comma, if any)."""
    parts = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    if len(parts) > 1:
        rotated = parts[1:] + parts[:1]
        return " ".join(rotated)
    clauses = text.split(", ")
    return ", ".join(clauses[1:] + clauses[:1]) if len(clauses) > 1 else text


def boilerplate(text: str, rng: random.Random) -> str:
    return f"{text.strip()} {rng.choice(BOILERPLATE)}"


TEXT_TRANSFORMS: dict[str, Callable[[str, random.Random], str]] = {
    "typos": typos, "reorder": reorder, "boilerplate": boilerplate,
}
