"""Hostile and odd image files in a folder: each is embedded correctly or skipped with its reason in
errors.jsonl, and the rest of the run lands (real efficientnet-lite0)."""

from __future__ import annotations

import io
import json
import os

import lance
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from indexer import ingest
from indexer.cli import cli

from ..conftest import write_jsonl

# id -> what errors.jsonl must say about it
REFUSED = {
    "loop.jpg": "symlink loop",
    "a.jpg": "symlink loop",
    "b.jpg": "symlink loop",
    "bomb.png": "image too large",
    "bomb-warn.png": "image too large",
    "trunc.jpg": "truncated",
    "zero.png": "empty file (0 bytes)",
    "table.jsonl:1": "symlink loop",
    "table.jsonl:2": "Is a directory",
    "table.jsonl:3": "No such file",
}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _halves(size=(64, 48)) -> Image.Image:
    """Left half red, right half blue: a rotation changes what the model sees."""
    img = Image.new("RGB", size, (220, 20, 20))
    img.paste((20, 20, 220), (size[0] // 2, 0, size[0], size[1]))
    return img


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile") / "images"
    d.mkdir()
    gradient = Image.radial_gradient("L").resize((64, 48))
    gradient.convert("RGB").save(d / "ok.jpg", quality=95)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(d / "one.png")
    Image.new("RGB", (30000, 10), (10, 200, 30)).save(d / "wide.png")
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    deep = Image.fromarray(np.asarray(gradient, dtype=np.uint16) * 257)
    assert deep.mode == "I;16"
    deep.save(d / "deep16.png")
    _halves().convert("CMYK").save(d / "cmyk.jpg", quality=95)
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.save(d / "pal.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    _halves().save(d / "rot.jpg", exif=exif, quality=95)
    (d / "trunc.jpg").write_bytes((d / "ok.jpg").read_bytes()[:300])
    (d / "zero.png").write_bytes(b"")
    # A 20000x20000 bilevel PNG: 48 KB on disk, 400 megapixels decoded; and one just over PIL's warning line.
    (d / "bomb.png").write_bytes(_png(Image.new("1", (20000, 20000))))
    (d / "bomb-warn.png").write_bytes(_png(Image.new("1", (10000, 10000))))
    (d / "dir.jpg").mkdir()  # a folder named like an image: walked as a folder
    gradient.convert("RGB").save(d / "dir.jpg" / "inner.png")
    os.symlink("loop.jpg", d / "loop.jpg")
    os.symlink("b.jpg", d / "a.jpg")
    os.symlink("a.jpg", d / "b.jpg")
    (d / "sub").mkdir()
    os.symlink("..", d / "sub" / "up")  # a folder loop: not followed
    # Table rows that name a symlink loop, a folder and a missing file as their image.
    table = write_jsonl(d.parent / "table.jsonl", [{"image": "images/loop.jpg"}, {"image": "images/dir.jpg"},
                                                    {"image": "images/missing.png"}])
    coll = d.parent / "c.idx"
    result = CliRunner().invoke(cli, ["ingest", str(coll), str(d), str(table), "--model", "efficientnet-lite0",
                                      "-q", "--json"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    rows = lance.dataset(str(coll / "lance" / "items.lance")).to_table().to_pylist()
    errors = [json.loads(line) for line in (coll / "errors.jsonl").read_text().splitlines()]
    return {"dir": d, "summary": json.loads(result.stdout), "rows": {r["id"]: r for r in rows},
            "errors": {e["id"]: e["reason"] for e in errors}}


def test_every_file_is_embedded_or_recorded(zoo):
    embedded = {"ok.jpg", "one.png", "wide.png", "anim.gif", "deep16.png", "cmyk.jpg", "pal.png", "rot.jpg",
                "dir.jpg/inner.png"}
    assert set(zoo["rows"]) == embedded
    assert set(zoo["errors"]) == set(REFUSED)
    for rid, reason in REFUSED.items():
        assert reason in zoo["errors"][rid], (rid, zoo["errors"][rid])
    assert (zoo["summary"]["added"], zoo["summary"]["errors"]) == (len(embedded), len(REFUSED))
    for row in zoo["rows"].values():
        vec = np.asarray(row["vector"])
        assert np.isfinite(vec).all() and abs(np.linalg.norm(vec) - 1) < 1e-4


def _cos(zoo, rid: str, lite0, image: Image.Image) -> float:
    return float(np.asarray(zoo["rows"][rid]["vector"]) @ lite0.embed([image])[0])


def test_odd_images_embed_as_what_they_show(zoo, lite0):
    d = zoo["dir"]
    assert _cos(zoo, "ok.jpg", lite0, Image.open(d / "ok.jpg").convert("RGB")) > 0.9999
    # An animated GIF is its first frame.
    assert _cos(zoo, "anim.gif", lite0, Image.new("RGB", (32, 32), (255, 0, 0))) > 0.999
    # 16-bit: rescaled to 8 bits, not clipped to white.
    gradient = Image.radial_gradient("L").resize((64, 48)).convert("RGB")
    assert _cos(zoo, "deep16.png", lite0, gradient) > 0.9999
    # Palette + transparency: composited on white.
    assert _cos(zoo, "pal.png", lite0, Image.new("RGB", (20, 20), (255, 255, 255))) > 0.9999
    # EXIF orientation 6: embedded as displayed (rotated), not as stored.
    stored = Image.open(d / "rot.jpg").convert("RGB")
    shown = _cos(zoo, "rot.jpg", lite0, stored.transpose(Image.Transpose.ROTATE_270))
    assert shown > 0.9999 and shown > _cos(zoo, "rot.jpg", lite0, stored) + 0.01
    # CMYK: the colours survive the conversion (close to the RGB picture it was made from).
    assert _cos(zoo, "cmyk.jpg", lite0, _halves()) > 0.98
    assert _cos(zoo, "one.png", lite0, Image.new("RGB", (8, 8), (10, 200, 30))) > 0.999
    # 30000x10: only the centre the crop keeps is resized (not a 768000x256 image), same vector.
    assert _cos(zoo, "wide.png", lite0, Image.new("RGB", (300, 10), (10, 200, 30))) > 0.999


def test_unreadable_file_is_recorded(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(d / "fine.png")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(d / "locked.png")
    os.chmod(d / "locked.png", 0)
    if os.access(d / "locked.png", os.R_OK):
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE): a chmod 000 file is still readable")
    s = ingest(tmp_path / "c.idx", [str(d)], model="efficientnet-lite0", progress=False)
    assert (s.added, s.errors) == (1, 1)
    errors = [json.loads(line) for line in (tmp_path / "c.idx" / "errors.jsonl").read_text().splitlines()]
    assert errors[0]["id"] == "locked.png" and "Permission denied" in errors[0]["reason"]
