"""The search page end to end in headless Chromium (Debian's package, driven by Playwright): type a query,
see highlighted results; upload and drop images, see their near neighbours; click for more like this."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from .serving import running_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _page(browser, url: str):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(60_000)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
    # Nothing may come from another host: the page has to work with no internet.
    page.on("request", lambda r: problems.append(f"external request {r.url}")
            if not r.url.startswith(url) and not r.url.startswith(("blob:", "data:")) else None)
    return page, problems


def _status(page, contains: str) -> str:
    page.wait_for_function("s => document.getElementById('status').textContent.includes(s)", arg=contains)
    return page.text_content("#status")


def test_search_page_in_chromium(browser, open_server, sample_corpus, tmp_path):
    page, problems = _page(browser, open_server)
    page.goto(f"{open_server}/")
    page.wait_for_selector("#collection option[value=images]", state="attached")

    # Text: type a query, see ranked results with the query's words highlighted.
    page.select_option("#collection", "texts")
    page.fill("#q", "space telescopes and galaxies")
    page.click("#go")
    _status(page, "results for space telescopes")
    hits = page.locator("#results .hit")
    assert hits.count() == 12
    assert hits.first.locator(".label").text_content() == "astronomy"
    marked = {m.lower() for m in hits.first.locator("mark").all_text_contents()}
    assert {"space", "telescope", "galaxies"} <= marked, marked
    scores = [float(s) for s in page.locator("#results .score").all_text_contents()]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.5
    first_id = hits.first.get_attribute("data-id")
    hits.first.click()
    _status(page, f"more like {first_id}")
    assert first_id not in [h.get_attribute("data-id") for h in page.locator("#results .hit").all()]
    assert page.locator("#results .hit").first.locator(".label").text_content() == "astronomy"

    # Passages: full-text mode, grouped by document, each result saying where it comes from.
    page.select_option("#collection", "docs")
    page.select_option("#mode", "text")
    page.check("#group")
    page.fill("#k", "3")
    page.fill("#q", "yeast dough")
    page.click("#go")
    _status(page, "results for yeast dough")
    where = page.locator("#results .where").all_text_contents()
    assert where[0].startswith("baking.md") and "passage" in where[0] and len(where) == len(set(where))
    page.fill("#k", "12")
    page.select_option("#mode", "vector")

    # Images: upload an edited crop of the cat, see the original first as a loaded thumbnail.
    page.select_option("#collection", "images")
    page.set_input_files("#file", str(sample_corpus["queries"] / "cat-edited.jpg"))
    _status(page, "results for image cat-edited.jpg")
    first = page.locator("#results .hit").first
    assert first.get_attribute("data-id") == "cat.jpg"
    page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#results.images img").count() == 12

    # Drag and drop another photo onto the page.
    data = base64.b64encode((sample_corpus["queries"] / "flower-small.png").read_bytes()).decode()
    page.evaluate("""b64 => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "flower-small.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    }""", data)
    _status(page, "results for image flower-small.png")
    assert page.locator("#results .hit").first.get_attribute("data-id") == "flower.jpg"

    # More like this from an image result.
    page.locator("#results .hit[data-id='flower.jpg']").click()
    _status(page, "more like flower.jpg")
    assert "flower.jpg" not in [h.get_attribute("data-id") for h in page.locator("#results .hit").all()]
    page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")

    shot = tmp_path / "search-page.png"
    page.screenshot(path=str(shot), full_page=True)
    artefacts = Path("bench-out")
    artefacts.mkdir(exist_ok=True)
    shutil.copy(shot, artefacts / "search-page.png")
    print(f"screenshot: {shot} (copy in {artefacts / 'search-page.png'})")
    assert shot.stat().st_size > 10_000
    assert problems == [], problems


def test_errors_show_on_the_page_and_the_token_login(browser, served_collections):
    token = "browser-token"
    with running_server([served_collections["texts"]], env={"INDEXER_TOKEN": token}) as url:
        page, problems = _page(browser, url)
        page.goto(f"{url}/?token={token}")  # sets the session cookie, then the page loads
        page.wait_for_selector("#collection option[value=texts]", state="attached")
        page.fill("#q", "bread and baking")
        page.click("#go")
        _status(page, "results for bread and baking")
        assert page.locator("#results .hit").first.locator(".label").text_content() == "cooking"
        page.fill("#k", "5000")
        page.click("#go")
        page.wait_for_selector("#error:not([hidden])")
        assert "k" in page.text_content("#error")
        assert [p for p in problems if "422" not in p] == []


def test_words_on_a_clip_image_collection_show_a_thumbnail_grid(browser, tiny_clip_dirs, sample_corpus, tmp_path):
    from indexer import ingest

    coll = tmp_path / "photos.idx"
    ingest(coll, [str(sample_corpus["images"])], model=f"clip:{tiny_clip_dirs['clip']}", progress=False)
    with running_server([coll]) as url:
        page, problems = _page(browser, url)
        page.goto(f"{url}/")
        page.wait_for_selector("#collection option[value=photos]", state="attached")
        assert page.is_enabled("#q") and page.is_visible("#drop")  # words and pictures both
        page.fill("#k", "6")
        page.fill("#q", "a red bicycle")
        page.click("#go")
        _status(page, "6 results for a red bicycle")
        page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("#results.images .hit img").count() == 6
        assert problems == [], problems
