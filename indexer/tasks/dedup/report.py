"""Writing a dedup result: JSON, CSV (one row per pair), or an HTML page to pick a threshold by looking.

The HTML page shows pairs sampled in similarity bands just below and just above the threshold (thumbnails
for images, snippets for text) and a histogram of each sampled item's nearest-neighbour similarity, also
written as a PNG next to the page.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import IndexerError
from ...store import Collection
from .records import DedupReport
from .stored import load_vectors

BAND_WIDTH = 0.05
PAIRS_PER_BAND = 6
HISTOGRAM_SAMPLE = 2000


def check_out(path: str | Path) -> Path:
    out = Path(path)
    if out.suffix.lower() not in (".json", ".csv", ".html", ".htm"):
        raise IndexerError(f"--out {out}: the name must end in .json, .csv or .html")
    return out


def write_output(report: DedupReport, path: str | Path, sample: HtmlSample | None = None) -> Path:
    """`sample`: for .html, what html_sample(report) took (before an --apply deleted); taken now if None."""
    out = check_out(path)
    suffix = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        out.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=1))
    elif suffix == ".csv":
        dropped = {d["id"]: d["kept"] for d in report.dropped}
        with open(out, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["a", "b", "score", "exact", "a_dropped_for", "b_dropped_for"])
            for p in report.iter_pairs():
                w.writerow([p["a"], p["b"], p["score"], p["exact"], dropped.get(p["a"], ""),
                            "" if report.against else dropped.get(p["b"], "")])
    else:
        write_html(report, out, sample)
    return out


def neighbour_sample(coll: Collection, ref: Collection | None, sample: int = HISTOGRAM_SAMPLE, k: int = 8,
                     seed: int = 0) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Nearest neighbours (top k, itself left out) of up to `sample` items: (ids, ref ids, query positions,
    neighbour positions (m, k), similarities (m, k)). Exact: one blocked product per query, no n x n."""
    import faiss

    vecs = load_vectors(coll)
    base = vecs if ref is None else load_vectors(ref)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(vecs.ids), min(sample, len(vecs.ids)), replace=False))
    extra = 1 if ref is None else 0
    sims, nbrs = faiss.knn(np.ascontiguousarray(vecs.x[picked]), base.x, min(k + extra, len(base.ids)),
                           metric=faiss.METRIC_INNER_PRODUCT)
    if ref is None:  # drop each query itself (wherever it ranks among exact copies)
        keep = nbrs != picked[:, None]
        rows = [np.flatnonzero(r)[: k] for r in keep]
        width = min(len(r) for r in rows) if rows else 0
        sims = np.stack([s[r[:width]] for s, r in zip(sims, rows)])
        nbrs = np.stack([n[r[:width]] for n, r in zip(nbrs, rows)])
    return vecs.ids, base.ids, picked, nbrs, sims


@dataclass
class HtmlSample:
    """What the page shows, taken while every sampled item is still stored: the nearest-neighbour
    similarities (histogram) and the pairs per band with their rendered cells."""

    nn: np.ndarray
    bands: list[tuple[float, float, int, list[tuple[float, str, str]]]]
    cells: dict[str, str]
    cells_ref: dict[str, str]


def html_sample(report: DedupReport) -> HtmlSample:
    coll = Collection.open(report.collection)
    ref = Collection.open(report.against) if report.against else None
    ids, ref_ids, picked, nbrs, sims = neighbour_sample(coll, ref)
    t = report.threshold
    nn = sims[:, 0] if sims.size else np.zeros(0)
    # Candidate pairs in bands around the threshold.
    edges = [t - 2 * BAND_WIDTH, t - BAND_WIDTH, t, t + BAND_WIDTH, 1.000001]
    rng = np.random.default_rng(0)
    seen, bands = set(), []
    flat = [(float(s), ids[int(q)], ref_ids[int(b)]) for q, row_n, row_s in zip(picked, nbrs, sims)
            for b, s in zip(row_n, row_s) if b >= 0]
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [p for p in flat if lo <= p[0] < hi and (p[2], p[1]) not in seen]
        chosen = [inside[k] for k in rng.permutation(len(inside))[:PAIRS_PER_BAND]]
        seen.update((a, b) for _, a, b in chosen)
        bands.append((lo, min(hi, 1.0), len(inside), sorted(chosen, reverse=True)))
    wanted = {a for *_, ch in bands for _, a, _ in ch}
    wanted_ref = {b for *_, ch in bands for _, _, b in ch}
    show = _renderer(coll)
    items = show(wanted if ref else wanted | wanted_ref)
    items_ref = items if ref is None else _renderer(ref)(wanted_ref)
    return HtmlSample(nn, bands, items, items_ref)


def write_html(report: DedupReport, out: Path, sample: HtmlSample | None = None) -> None:
    sample = sample or html_sample(report)
    t, nn, bands, items, items_ref = report.threshold, sample.nn, sample.bands, sample.cells, sample.cells_ref
    png = histogram_png(nn, t, f"nearest-neighbour cosine of {len(nn)} sampled items")
    out.with_suffix(".png").write_bytes(png)
    parts = [f"<h1>dedup: {html.escape(report.collection)}</h1>",
             f"<p>{html.escape(report.line())}</p>",
             f"<p>threshold {t:g} ({html.escape(report.threshold_source)}), method {report.method}, "
             f"keep {report.keep}. Pairs at or above the threshold count as duplicates.</p>",
             f'<img alt="histogram" src="data:image/png;base64,{base64.b64encode(png).decode()}">',
             f"<p>Each band shows up to {PAIRS_PER_BAND} pairs sampled among the sampled items' nearest "
             "neighbours: look at the pairs just below and just above the threshold to move it.</p>"]
    for lo, hi, count, chosen in bands:
        side = "above" if lo >= t else "below"
        parts.append(f"<h2>{lo:.3f} to {hi:.3f} ({side} the threshold): {count} neighbour pairs in the sample</h2>")
        if not chosen:
            parts.append("<p>none</p>")
        parts.append("<table>")
        for s, a, b in chosen:
            parts.append(f"<tr><td class=s>{s:.4f}</td><td>{items.get(a, html.escape(a))}</td>"
                         f"<td>{items_ref.get(b, html.escape(b))}</td></tr>")
        parts.append("</table>")
    style = ("body{font-family:sans-serif;margin:2em}td{vertical-align:top;padding:6px;border-bottom:1px solid #ddd;"
             "max-width:420px}td.s{font-weight:bold}img.t{max-width:160px;max-height:160px;display:block}"
             "small{color:#666}")
    out.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>dedup report</title>"
                   f"<style>{style}</style></head><body>{''.join(parts)}</body></html>", encoding="utf-8")


def histogram_png(values: np.ndarray, threshold: float, title: str) -> bytes:
    from ...errors import attempt_import
    from ..plots import _pyplot

    attempt_import("matplotlib")  # names the extra when it is missing
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    ax.hist(values, bins=np.linspace(min(-0.0, float(values.min()) if len(values) else 0), 1.0, 81), color="#4a7ab5")
    ax.axvline(threshold, color="#c0392b", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("cosine similarity to the nearest other item")
    ax.set_ylabel("items")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _renderer(coll: Collection):
    """ids -> HTML cell content: an inline thumbnail (images) or an escaped snippet (text)."""
    columns = coll.result_columns()

    def render(ids: set[str]) -> dict[str, str]:
        if not ids:
            return {}
        want = ["id"] + [c for c in ("text", "path") if c in columns]
        rows = coll.rows_by_id(sorted(ids), columns=want)
        return {i: _cell(i, r) for i, r in rows.items()}

    return render


def _cell(item_id: str, row: dict[str, Any]) -> str:
    label = f"<small>{html.escape(item_id)}</small>"
    if row.get("text"):
        text = " ".join(str(row["text"]).split())
        return f"{label}<div>{html.escape(text[:300])}{'...' if len(text) > 300 else ''}</div>"
    if row.get("path"):
        try:
            from ...sources.images import ImageDecodeError, decode_image

            img = decode_image(Path(row["path"]).read_bytes())  # oriented, bomb-guarded
            size = img.size
            img.thumbnail((160, 160))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
            data = base64.b64encode(buf.getvalue()).decode()
            return f'{label}<img class=t src="data:image/jpeg;base64,{data}"><small>{size[0]}x{size[1]}</small>'
        except (ImageDecodeError, OSError):
            return f"{label}<div>(image not readable: {html.escape(str(row['path']))})</div>"
    return label
