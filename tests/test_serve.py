"""The HTTP service, tested against a real `indexer serve` process on loopback: every route, the token,
bad inputs, limits, and concurrent queries answered through the micro-batcher."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from .serving import running_server

pytestmark = pytest.mark.slow


TIMEOUT = 60  # generous: CI machines have 2 busy cores


def _request(method: str, url: str, **kw) -> httpx.Response:
    """One request with the tests' timeout; no client state (cookies) carried between requests."""
    return httpx.request(method, url, timeout=TIMEOUT, **kw)


def _get(url: str, **kw) -> httpx.Response:
    return _request("GET", url, **kw)


def _post(url: str, **kw) -> httpx.Response:
    return _request("POST", url, **kw)


def _jpeg(path) -> bytes:
    return path.read_bytes()


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, "PNG")
    return buf.getvalue()


def _search(url: str, **body) -> httpx.Response:
    return _post(f"{url}/search", json=body)


def _upload(url: str, route: str, data: bytes, name: str = "q.jpg", **fields) -> httpx.Response:
    return _post(f"{url}{route}", files={"image": (name, data, "application/octet-stream")},
                 data={k: str(v) for k, v in fields.items()})


def test_health_collections_and_page(open_server):
    assert _get(f"{open_server}/health").json() == {"status": "ok"}
    colls = {c["name"]: c for c in _get(f"{open_server}/collections").json()["collections"]}
    assert (colls["texts"]["rows"], colls["texts"]["modality"], colls["texts"]["dim"]) == (48, "text", 384)
    assert (colls["images"]["rows"], colls["images"]["modality"], colls["images"]["model"]) == (
        16, "image", "efficientnet-lite0")
    assert "doc_id" in colls["docs"]["fields"] and colls["docs"]["rows"] > 3
    assert "path" not in colls["texts"]  # the server's file layout is not the clients' business
    # Queries of torch fp32 collections are embedded by their ONNX export (same vectors, faster).
    assert [colls[n]["query_backend"] for n in ("texts", "images", "vectors")] == ["onnx", "onnx", None]
    page = _get(f"{open_server}/")
    assert page.status_code == 200 and 'id="q"' in page.text and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/app.css"):
        r = _get(f"{open_server}{asset}")
        assert r.status_code == 200
        # Offline by construction: nothing the page loads comes from another host.
        assert "http://" not in r.text and "https://" not in r.text
    assert "https://" not in page.text


def test_text_search_ranks_by_meaning(open_server):
    r = _search(open_server, collection="texts", query="space telescopes and galaxies", k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    hits = body["results"]
    assert (body["collection"], body["k"], len(hits)) == ("texts", 5, 5)
    assert hits[0]["label"] == "astronomy" and "text" in hits[0] and "vector" not in hits[0]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and body["took_ms"] > 0
    filtered = _search(open_server, collection="texts", query="space telescopes", where="label = 'cooking'", k=3)
    assert {h["label"] for h in filtered.json()["results"]} == {"cooking"}


def test_image_upload_finds_its_original_and_serves_it(open_server, sample_corpus):
    r = _upload(open_server, "/search", _jpeg(sample_corpus["queries"] / "cat-edited.jpg"), collection="images", k=3)
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["id"] == "cat.jpg" and top["score"] > 0.8
    original = _get(f"{open_server}{top['image_url']}")
    assert original.status_code == 200 and original.headers["content-type"] == "image/jpeg"
    assert original.content == (sample_corpus["images"] / "cat.jpg").read_bytes()
    thumb = _get(f"{open_server}{top['image_url']}", params={"size": 64})
    assert thumb.status_code == 200 and max(Image.open(io.BytesIO(thumb.content)).size) == 64


def test_text_and_hybrid_modes_and_passages_grouped_by_document(open_server):
    text = _search(open_server, collection="texts", query="telescope", mode="text", k=3).json()["results"]
    assert text and all("telescope" in h["text"].lower() for h in text)
    hybrid = _search(open_server, collection="texts", query="baking bread", mode="hybrid", k=3).json()
    assert hybrid["mode"] == "hybrid" and hybrid["results"][0]["label"] == "cooking"
    passages = _search(open_server, collection="docs", query="yeast and dough", k=4).json()["results"]
    assert len(passages) == 4 and passages[0]["doc_id"] == "baking.md" and passages[0]["heading"]
    assert len({p["doc_id"] for p in passages}) < 4  # several passages of one document
    grouped = _search(open_server, collection="docs", query="yeast and dough", k=3, group_by_doc=True).json()
    docs = [h["doc_id"] for h in grouped["results"]]
    assert docs[0] == "baking.md" and sorted(docs) == ["astronomy.md", "baking.md", "rates.md"]


def test_a_collection_without_a_model_answers_vectors_and_ids(open_server):
    vec = [0.5] * 8
    hits = _search(open_server, collection="vectors", vector=vec, k=3).json()["results"]
    assert len(hits) == 3 and hits[0]["id"].startswith("vectors.npy:")
    assert len(_search(open_server, collection="vectors", id=hits[0]["id"], k=2).json()["results"]) == 2
    _assert_error(_search(open_server, collection="vectors", query="a cat"), 400, "an id or a vector")
    _assert_error(_post(f"{open_server}/embed", json={"collection": "vectors", "input": "x"}), 400, "no model")


def test_search_by_id_and_by_vector(open_server):
    more = _search(open_server, collection="images", id="cat.jpg", k=4).json()["results"]
    assert len(more) == 4 and "cat.jpg" not in [h["id"] for h in more]
    text = _get(f"{open_server}/items/texts/astronomy-5").json()
    assert text["label"] == "astronomy" and "vector" not in text
    vec = _post(f"{open_server}/embed", json={"collection": "texts", "input": text["text"]}).json()
    assert (vec["model"], vec["dim"], len(vec["embeddings"])) == ("minilm", 384, 1)
    top = _search(open_server, collection="texts", vector=vec["embeddings"][0], k=1).json()["results"][0]
    assert top["id"] == "astronomy-5" and top["score"] > 0.999


def test_search_returns_the_fields_asked_for(open_server, sample_corpus):
    default = _search(open_server, collection="texts", query="stars", k=3).json()["results"]
    assert all(h.keys() == {"id", "score", "text", "label"} for h in default)
    lean = _search(open_server, collection="texts", query="stars", k=3, fields=["label"]).json()["results"]
    assert [h["id"] for h in lean] == [h["id"] for h in default] and all(h.keys() == {"id", "score", "label"} for h in lean)
    every = _search(open_server, collection="texts", query="stars", k=1, fields="all").json()["results"][0]
    assert {"source", "content_hash"} <= every.keys()
    img = _upload(open_server, "/search", _jpeg(sample_corpus["images"] / "flower.jpg"), collection="images", k=2,
                  fields="path,label")
    assert img.status_code == 200 and all({"id", "score", "path", "image_url"} <= h.keys() for h in img.json()["results"])
    bad = _search(open_server, collection="texts", query="stars", fields=["year"])
    assert bad.status_code == 400 and "unknown field 'year'" in bad.json()["error"]


def test_locustfile_load_test_runs_against_a_real_server(served_collections, tmp_path):
    """The load test the README gives users: locust, headless, against a real server; no failures."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("locust") is None:  # never imported here: gevent patches the whole process
        pytest.skip("locust is not installed")
    root = Path(__file__).resolve().parents[1]
    with running_server([served_collections["texts"]]) as url:
        run = subprocess.run([sys.executable, "-m", "locust", "-f", str(root / "scripts" / "locustfile.py"), "--headless",
                              "-u", "4", "-r", "4", "-t", "4s", "--host", url, "--json", "--only-summary"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    stats = {s["name"]: s for s in json.loads(run.stdout)}
    assert stats["/search"]["num_requests"] > 10 and stats["/search"]["num_failures"] == 0


def test_embed_matches_the_library(open_server, minilm, sample_corpus):
    texts = ["a cat sat on the mat", "interest rates and bonds"]
    r = _post(f"{open_server}/embed", json={"collection": "texts", "input": texts})
    assert np.allclose(np.array(r.json()["embeddings"]), minilm.embed(texts), atol=1e-4)
    img = _upload(open_server, "/embed", _jpeg(sample_corpus["images"] / "flower.jpg"), collection="images")
    assert img.status_code == 200 and len(img.json()["embeddings"][0]) == 1280


def test_openai_compatible_embeddings(open_server, minilm):
    texts = ["hello world", "the moon orbits the earth"]
    r = _post(f"{open_server}/v1/embeddings", json={"model": "minilm", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1] and {d["object"] for d in body["data"]} == {"embedding"}
    got = np.array([d["embedding"] for d in body["data"]])
    assert np.allclose(got, minilm.embed(texts), atol=1e-4)
    # Real token counts from the model's tokenizer ([CLS] hello world [SEP] = 4).
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 8
    one = _post(f"{open_server}/v1/embeddings", json={"model": "texts", "input": "hello world"}).json()
    assert one["usage"]["prompt_tokens"] == 4
    # OpenAI's own client asks for base64 by default: little-endian float32.
    b64 = _post(f"{open_server}/v1/embeddings",
                     json={"model": "minilm", "input": texts, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]])
    assert np.allclose(decoded, got, atol=1e-6)


def test_the_openai_client_reads_embeddings_and_errors(open_server, minilm):
    """OpenAI's own client against the real server: embeddings (it asks for base64) and the errors it
    shows, which it reads only from OpenAI's shape (before, it said just "Error code: 404")."""
    import openai

    client = openai.OpenAI(base_url=f"{open_server}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    texts = ["a cat sits on the mat", "interest rates rose again"]
    got = client.embeddings.create(model="minilm", input=texts)
    assert np.allclose(np.array([d.embedding for d in got.data]), minilm.embed(texts), atol=1e-4)
    assert got.usage.prompt_tokens > 8
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="gpt-4", input="x")
    assert "unknown model 'gpt-4'" in str(missing.value) and missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="input is empty"):
        client.embeddings.create(model="minilm", input=[])
    with pytest.raises(openai.BadRequestError, match="384-dimensional"):
        client.embeddings.create(model="minilm", input="x", dimensions=3)


def test_openai_error_shape_only_on_v1(served_collections):
    """Errors answered before any route runs (the token guard) take the shape of the route asked for."""
    from fastapi.testclient import TestClient

    from indexer.serve.app import create_app

    client = TestClient(create_app([served_collections["texts"]], token="s3cret"), base_url="http://127.0.0.1")
    v1 = client.post("/v1/embeddings", json={"model": "minilm", "input": "x"})
    assert v1.status_code == 401 and v1.json()["error"]["code"] == "invalid_api_key", v1.text
    assert "token" in _message(v1)
    own = client.post("/search", json={"query": "x"})
    assert own.status_code == 401 and isinstance(own.json()["error"], str) and "token" in _message(own)


@pytest.mark.parametrize("mode", ["vector", "text", "hybrid"])
def test_a_bad_where_speaks_of_the_field_and_lists_stored_fields(open_server, mode):
    r = _search(open_server, collection="texts", query="galaxies", where="colour = 'red'", mode=mode)
    _assert_error(r, 400, "invalid where \"colour = 'red'\": schema error: no field named colour")
    message = _message(r)
    assert "--where" not in message and "label" in message and "text" in message
    for internal in ("_rowid", "_rowaddr", "_rowoffset", "_score", "record_hash", "vector"):
        assert internal not in message, message
    _assert_error(_search(open_server, collection="texts", query="a", where="label = = 'x'", mode=mode),
                  400, "SQL syntax error")


def test_an_empty_collection_answers_one_way(tmp_path, minilm):
    """Never ingested into (every input failed) or emptied by a delete: the same clear 400 for every mode."""
    from fastapi.testclient import TestClient

    from indexer import Collection, ingest
    from indexer.serve.app import create_app

    (tmp_path / "bad.jsonl").write_text('{"text": ""}\n')
    ingest(tmp_path / "never.idx", [str(tmp_path / "bad.jsonl")], model="minilm", progress=False)
    (tmp_path / "one.jsonl").write_text('{"id": "a", "text": "one short note"}\n')
    ingest(tmp_path / "emptied.idx", [str(tmp_path / "one.jsonl")], model="minilm", progress=False)
    Collection.open(tmp_path / "emptied.idx").delete(["a"])
    app = create_app([tmp_path / "never.idx", tmp_path / "emptied.idx"])
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for name in ("never", "emptied"):
            for mode in ("vector", "text", "hybrid"):
                r = client.post("/search", json={"collection": name, "query": "note", "mode": mode})
                _assert_error(r, 400, f"{name} is empty")
            _assert_error(client.post("/search", json={"collection": name, "vector": [0.1] * 384}), 400, "is empty")


def test_metrics_count_requests_by_route_and_status(open_server):
    for _ in range(3):
        _search(open_server, collection="texts", query="bread and flour")
    _search(open_server, collection="nope", query="x")
    text = _get(f"{open_server}/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['indexer_http_requests_total{method="POST",route="/search",status="200"}']) >= 3
    assert float(lines['indexer_http_requests_total{method="POST",route="/search",status="404"}']) >= 1
    inf = 'indexer_http_request_duration_seconds_bucket{method="POST",route="/search",le="+Inf"}'
    count = 'indexer_http_request_duration_seconds_count{method="POST",route="/search"}'
    assert lines[inf] == lines[count] and float(lines[count]) >= 4
    assert float(lines["indexer_search_batch_size_count"]) >= 3
    assert lines['indexer_collection_rows{collection="texts"}'] == "48"


def test_openapi_and_offline_docs(open_server):
    spec = _get(f"{open_server}/openapi.json").json()
    assert {"/search", "/embed", "/v1/embeddings", "/collections", "/health", "/metrics"} <= set(spec["paths"])
    assert set(spec["paths"]["/search"]["post"]["requestBody"]["content"]) == {"application/json",
                                                                                "multipart/form-data"}
    docs = _get(f"{open_server}/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert "cdn." not in docs.text and "fonts.googleapis" not in docs.text
    assert _get(f"{open_server}/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_concurrent_queries_are_batched_and_each_gets_its_own_answer(open_server):
    topics = {"astronomy": "stars galaxies and telescopes", "cooking": "bread dough and baking",
              "finance": "interest rates and stock markets"}
    before = _batch_stats(open_server)
    jobs = [(label, q) for label, q in topics.items() for _ in range(6)]

    def ask(job):
        return job[0], _search(open_server, collection="texts", query=job[1], k=1)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert all(r.status_code == 200 for _, r in answers)
    labels = {label: {r.json()["results"][0]["label"] for lab, r in answers if lab == label} for label in topics}
    assert labels == {label: {label} for label in topics}, labels
    after = _batch_stats(open_server)
    calls, queries = after[0] - before[0], after[1] - before[1]
    assert queries == len(jobs) and calls < len(jobs), (calls, queries)


def test_one_bad_query_does_not_fail_its_batch(open_server):
    """A zero vector passes the checks but fails inside search_batch: its batch is rerun one by one."""
    zero = [0.0] * 384
    jobs = [{"query": "bread"}] * 6 + [{"vector": zero}] + [{"query": "galaxies"}] * 6
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda b: _search(open_server, collection="texts", k=2, **b), jobs))
    assert [r.status_code for r in answers] == [200] * 6 + [400] + [200] * 6
    assert "zero" in answers[6].json()["error"]


def _batch_stats(url: str) -> tuple[float, float]:
    lines = dict(line.rsplit(" ", 1) for line in _get(f"{url}/metrics").text.splitlines()
                 if line.startswith("indexer_search_batch_size_"))
    return float(lines["indexer_search_batch_size_count"]), float(lines["indexer_search_batch_size_sum"])


@pytest.mark.parametrize("body, status, words", [
    ({"collection": "texts", "query": ""}, 400, "empty query"),
    ({"collection": "texts", "query": "   "}, 400, "empty query"),
    ({"collection": "texts"}, 400, "empty query"),
    ({"collection": "texts", "query": "a", "id": "b"}, 400, "exactly one"),
    ({"collection": "images", "query": "a cat"}, 400, "search it with an image upload"),
    ({"query": "a cat"}, 400, "several collections"),
    ({"collection": "nope", "query": "a cat"}, 404, "unknown collection"),
    ({"collection": "texts", "id": "no-such-id"}, 404, "no item"),
    ({"collection": "texts", "query": "a", "k": 0}, 422, "k"),
    ({"collection": "texts", "query": "a", "k": "many"}, 422, "k"),
    ({"collection": "texts", "query": "a", "engine": "warp"}, 422, "engine"),
    ({"collection": "texts", "query": "a", "colour": "red"}, 422, "colour"),
    ({"collection": "texts", "vector": [0.1, 0.2]}, 400, "dimensions"),
    ({"collection": "texts", "query": "a", "where": "label = = 'x'"}, 400, "where"),
    ({"collection": "texts", "query": "a", "engine": "faiss"}, 400, "no index"),
    ({"collection": "texts", "id": "astronomy-5", "mode": "hybrid"}, 400, "needs a text query"),
    ({"collection": "texts", "query": "a", "mode": "fuzzy"}, 422, "mode"),
])
def test_bad_search_requests(open_server, body, status, words):
    r = _search(open_server, **body)
    _assert_error(r, status, words)


def test_bad_uploads_and_bodies(open_server, sample_corpus):
    cat = _jpeg(sample_corpus["queries"] / "cat-edited.jpg")
    _assert_error(_upload(open_server, "/search", cat[: len(cat) // 3], collection="images"), 400, "corrupt")
    _assert_error(_upload(open_server, "/search", b"just some text", "notes.txt", collection="images"), 415, "not an image")
    _assert_error(_upload(open_server, "/search", b"", collection="images"), 400, "empty")
    _assert_error(_upload(open_server, "/search", cat, collection="texts"), 400, "search it with a text query")
    _assert_error(_upload(open_server, "/search", cat, collection="images", mode="text"), 400, "needs a text query")
    _assert_error(_upload(open_server, "/search", _png(1200, 1000), collection="images"), 413, "pixels")
    _assert_error(_upload(open_server, "/embed", cat, collection="texts"), 400, "send text")
    big = b"x" * (3 * 1024 * 1024)
    _assert_error(_upload(open_server, "/search", big, collection="images"), 413, "larger than")
    _assert_error(_post(f"{open_server}/search", content=b"{not json", headers={"content-type": "application/json"}),
                  400, "invalid JSON")
    _assert_error(_post(f"{open_server}/search", content=b"query=cat", headers={"content-type": "text/plain"}),
                  415, "content type")
    # A chunked body has no Content-Length: the limit still holds.
    chunks = (b"x" * 65536 for _ in range(48))
    _assert_error(_post(f"{open_server}/search", content=chunks, headers={"content-type": "application/json"}),
                  413, "larger than")


def test_bad_embedding_and_item_requests(open_server):
    _assert_error(_post(f"{open_server}/v1/embeddings", json={"model": "gpt-4", "input": "x"}), 404, "unknown model")
    _assert_error(_post(f"{open_server}/v1/embeddings", json={"model": "minilm", "input": []}), 400, "empty")
    _assert_error(_post(f"{open_server}/v1/embeddings", json={"model": "minilm", "input": [""]}), 400, "empty")
    _assert_error(_post(f"{open_server}/v1/embeddings", json={"input": "x"}), 422, "model")
    _assert_error(_post(f"{open_server}/v1/embeddings", json={"model": "minilm", "input": "x", "dimensions": 3}),
                  400, "384")
    _assert_error(_post(f"{open_server}/embed", json={"collection": "images", "input": "x"}), 400, "upload")
    _assert_error(_get(f"{open_server}/items/images/no-such.jpg/image"), 404, "no item")
    _assert_error(_get(f"{open_server}/items/texts/astronomy-5/image"), 404, "no image")
    _assert_error(_get(f"{open_server}/items/nope/cat.jpg/image"), 404, "unknown collection")
    _assert_error(_get(f"{open_server}/items/images/cat.jpg/image", params={"size": 99999}), 400, "size")
    # Ids are keys into the table, never paths: traversal finds nothing.
    for item in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        _assert_error(_get(f"{open_server}/items/images/{item}/image"), 404, "no item")
    _assert_error(_get(f"{open_server}/no/such/route"), 404, "no such route")


def _message(r: httpx.Response) -> str:
    """An error's message: `{"error": message}`, or OpenAI's `{"error": {"message", "type", "param", "code"}}`
    on the /v1 routes (the only shape OpenAI's clients read)."""
    body = r.json()
    assert set(body) == {"error"}, body
    if r.url.path.startswith("/v1/"):
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["type"] == ("server_error" if r.status_code >= 500 else "invalid_request_error"), body
        return body["error"]["message"]
    return body["error"]


def _assert_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    message = _message(r)
    assert words.lower() in message.lower(), message
    assert "Traceback" not in r.text and ".idx" not in r.text  # no paths on the server's disk


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (1-bit gray) in a few bytes: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_nan_vectors_huge_images_and_foreign_hosts_are_refused(open_server):
    nan = ('{"collection": "texts", "vector": [NaN' + ", 0.1" * 383 + "]}").encode()
    _assert_error(_post(f"{open_server}/search", content=nan, headers={"content-type": "application/json"}),
                  422, "finite")
    # Past PIL's own bomb limit (~179 MP) the header alone is refused: 413, like any image over the limit.
    _assert_error(_upload(open_server, "/search", _png_header(20_000, 10_000), "bomb.png", collection="images"),
                  413, "too large")
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not reach a server without a token.
    _assert_error(_get(f"{open_server}/collections", headers={"host": "evil.example"}), 421, "not this server")
    _assert_error(_get(f"{open_server}/health", headers={"host": "evil.example:80"}), 421, "evil.example")
    port = open_server.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert _get(f"{open_server}/collections", headers={"host": host}).status_code == 200, host


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_query_models_rank_as_torch(served_collections, backend):
    """An fp32 export standing in for torch embeds queries to torch's vectors: the same hits, the same scores."""
    from indexer.tasks.search import Query, search_batch

    queries = [Query(text=t) for t in ("space telescopes", "baking bread at home", "interest rates and bonds")]
    hits = {b: search_batch(served_collections["texts"], queries, k=10, query_backend=b) for b in ("torch", backend)}
    for torch_hits, exported in zip(hits["torch"], hits[backend]):
        assert [h["id"] for h in exported] == [h["id"] for h in torch_hits]
        assert np.allclose([h["score"] for h in exported], [h["score"] for h in torch_hits], atol=1e-5)


def test_an_export_with_other_vectors_never_embeds_queries(served_collections, monkeypatch):
    """The export is checked against torch before it embeds a query: one that drifts is refused (auto falls
    back to torch, a named --query-backend fails the start with the reason)."""
    from indexer import IndexerError
    from indexer.serve.service import Service
    from indexer.tasks import search as search_module

    real = search_module.load_embedder

    def drifting(spec, runtime):
        embedder = real(spec, runtime)
        if runtime.backend == "onnx":
            embed = embedder.embed
            embedder.embed = lambda items, *args, **kw: embed(items, *args, **kw)[:, ::-1].copy()
        return embedder

    monkeypatch.setattr(search_module, "load_embedder", drifting)
    monkeypatch.setattr(search_module, "_EMBEDDERS", {})
    auto, named = (Service([served_collections["texts"]], threads=1, query_backend=b) for b in ("auto", "onnx"))
    try:
        auto.warm_up()
        assert auto.collections["texts"].query_backend == "torch"
        with pytest.raises(IndexerError, match="gives other vectors than torch"):
            named.warm_up()
    finally:
        auto.close()
        named.close()


def test_warm_up_puts_what_it_loaded_out_of_the_collectors_sight(served_collections):
    """A full garbage collection walked every object of the models loaded (560 ms at 64 clients, every
    request waiting): after the warm-up they are frozen, so it walks only what came since."""
    import gc

    from indexer.serve.service import Service

    service = Service([served_collections["texts"]], threads=1)
    try:
        gc.unfreeze()
        service.warm_up()
        assert gc.get_freeze_count() > 10_000 and not gc.garbage
    finally:
        service.close()


def test_a_lone_client_never_waits_for_company(served_collections):
    """--batch-wait-ms holds a batch's first query only while queries come together: one client
    searching again and again is answered without the wait."""
    import asyncio
    import time

    from indexer.serve.service import SearchParams, Service
    from indexer.tasks.search import Query

    service = Service([served_collections["vectors"]], threads=1, batch_wait=5.0)

    async def main() -> float:
        await service.start()
        try:
            started = time.monotonic()
            for _ in range(3):
                assert len(await service.search("vectors", Query(vector=[0.5] * 8), SearchParams(k=2))) == 2
            return time.monotonic() - started
        finally:
            await service.stop()

    assert asyncio.run(main()) < 5.0


def test_answer_reruns_a_failed_batch_one_by_one(served_collections):
    """[good, zero vector, good]: the batch fails as a whole, then each query runs alone."""
    from indexer import IndexerError
    from indexer.serve.service import SearchParams, Service
    from indexer.tasks.search import Query

    service = Service([served_collections["vectors"]], threads=1)
    try:
        rng = np.random.default_rng(0)
        good = [Query(vector=rng.standard_normal(8).tolist()) for _ in range(2)]
        params = SearchParams(k=3)
        answers = service._answer("vectors", params, [good[0], Query(vector=[0.0] * 8), good[1]])
        assert isinstance(answers[1], IndexerError) and "zero" in str(answers[1])
        alone = [service._search("vectors", params, [q])[0] for q in good]
        assert [answers[0], answers[2]] == alone and all(len(a) == 3 for a in alone)
        assert answers[0] != answers[2]
    finally:
        service.close()


class Panic(BaseException):
    """As pyo3's PanicException (a Rust panic in Lance) is: a BaseException, not an Exception."""


@pytest.mark.parametrize("where", ["batch", "search"])
@pytest.mark.parametrize("error", [RuntimeError, Panic])
def test_the_batcher_survives_a_failing_batch(served_collections, error, where):
    """An unexpected error (or a native library's panic) fails the requests of its batch, and later
    searches are still answered."""
    import asyncio

    from indexer.serve.service import SearchParams, Service
    from indexer.tasks.search import Query

    service = Service([served_collections["vectors"]], threads=1)
    method = "_answer" if where == "batch" else "_search"
    real, calls = getattr(service, method), []

    def flaky(*args):
        calls.append(args)
        if len(calls) == 1:
            raise error("boom")
        return real(*args)

    setattr(service, method, flaky)

    async def main():
        await service.start()
        try:
            query, params = Query(vector=[0.5] * 8), SearchParams(k=2)
            with pytest.raises(RuntimeError, match="boom"):
                await asyncio.wait_for(service.search("vectors", query, params), TIMEOUT)
            hits = await asyncio.wait_for(service.search("vectors", query, params), TIMEOUT)
            assert len(hits) == 2 and service.alive
        finally:
            await service.stop()

    asyncio.run(main())


def test_token_guards_every_route_but_health(served_collections):
    token = "s3cret-token"
    with running_server([served_collections["texts"]], env={"INDEXER_TOKEN": token}) as url:
        assert _get(f"{url}/health").status_code == 200
        good = {"authorization": f"Bearer {token}"}
        for bad in ({}, {"authorization": "Bearer wrong"}, {"authorization": token}):
            for method, route in (("GET", "/collections"), ("POST", "/search"), ("GET", "/metrics"),
                                  ("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"),
                                  ("POST", "/v1/embeddings"), ("GET", "/items/texts/astronomy-5")):
                r = _request(method, f"{url}{route}", headers=bad, json={"query": "x"})
                assert r.status_code == 401, (route, bad, r.text)
                assert "token" in _message(r) and r.headers["www-authenticate"] == "Bearer"
        assert _get(f"{url}/collections", headers=good).status_code == 200
        # With a token the Host header is not checked (a rebinding page does not know the token).
        assert _get(f"{url}/collections", headers={**good, "host": "search.example.org"}).status_code == 200
        hits = _post(f"{url}/search", headers=good, json={"query": "galaxies", "k": 2}).json()
        assert len(hits["results"]) == 2 and hits["collection"] == "texts"
        # A browser opens /?token=... once and gets an HttpOnly, SameSite=Strict session cookie.
        assert _get(f"{url}/?token=wrong").status_code == 401
        login = _get(f"{url}/?token={token}")
        assert login.status_code == 303 and login.headers["location"] == "/"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
        session = dict(c.split("=", 1) for c in [cookie.split(";")[0]])
        assert _get(f"{url}/collections", cookies=session).status_code == 200
        assert _get(f"{url}/collections", cookies={"indexer_session": "forged"}).status_code == 401
        metrics = _get(f"{url}/metrics", headers=good).text
        assert 'route="/collections",status="401"' in metrics


def test_cli_refuses_a_busy_port_and_a_missing_collection(served_collections, tmp_path):
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "indexer.cli", "serve", str(served_collections["texts"]),
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "indexer.cli", "serve", str(tmp_path / "missing.idx")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "collection not found" in r.stderr
    # An empty token must not quietly serve without one.
    for args, env in ((["--token", " "], {}), ([], {"INDEXER_TOKEN": ""})):
        r = subprocess.run([sys.executable, "-m", "indexer.cli", "serve", str(served_collections["texts"]),
                            "--port", "0", *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **env})
        assert r.returncode == 1 and "token is empty" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_extra_names_it(monkeypatch, tmp_path):
    from indexer import IndexerError
    from indexer.serve import serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `indexer[serve]` were not installed
    with pytest.raises(IndexerError, match=r"indexer\[serve\]"):
        serve([tmp_path / "any.idx"], port=0)


def test_listening_socket_says_tcp_so_nagle_is_off():
    """asyncio sets TCP_NODELAY only on sockets whose proto is TCP; without it every response written in
    two parts (headers, body) waited ~40 ms for the client's delayed ACK."""
    import socket

    from indexer.serve.server import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


def test_responses_are_strict_json_even_with_nan_fields():
    """A stored field may hold NaN or infinity (a numeric CSV column with gaps): written as null."""
    import json

    from indexer.serve.app import JSON

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))

    body = JSON({"results": [{"score": 0.5, "weight": float("nan"), "extra": {"max": float("-inf")}}]}).body
    assert strict(body.decode()) == {"results": [{"score": 0.5, "weight": None, "extra": {"max": None}}]}


def test_allowed_hosts_are_loopback_and_the_bound_address():
    from indexer.serve.guard import Guard, allowed_hosts

    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("::") is None  # every name of the machine is fine
    assert allowed_hosts("192.168.1.5") == {"localhost", "127.0.0.1", "::1", "192.168.1.5"}
    for header, name in ((b"[::1]:8000", "::1"), (b"LocalHost:80", "localhost"), (b"10.0.0.2", "10.0.0.2")):
        assert Guard._host({"headers": [(b"host", header)]}) == name
