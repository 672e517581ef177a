"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis) against a real `indexer serve` process
with a token: no 5xx, responses that match the schema, no file path or stack trace in any error, the token
required everywhere but /health, and path traversal on /items/.../image refused."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from indexer import ingest

from ..serving import running_server

schemathesis = pytest.importorskip("schemathesis")
TOKEN = "fuzz-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A model-less vector collection and a 3-image efficientnet-lite0 one, served with a token."""
    root = tmp_path_factory.mktemp("fuzz")
    np.save(root / "v.npy", np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
    ingest(root / "vectors.idx", [str(root / "v.npy")], model="none", progress=False)
    (root / "photos").mkdir()
    for n, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (32, 32), colour).save(root / "photos" / f"p{n}.png")
    ingest(root / "images.idx", [str(root / "photos")], model="efficientnet-lite0", progress=False)
    (root / "secret.txt").write_text("not for the web")
    with running_server([root / "vectors.idx", root / "images.idx"], "--token", TOKEN) as url:
        yield url, root


def _leaks(text: str, root) -> bool:
    return "Traceback" in text or str(root) in text or "/site-packages/" in text or 'File "' in text


def test_schema_fuzz(served):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    url, root = served
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/health", "/collections", "/search", "/items/{collection}/{item_id}"}
    seen: dict[str, int] = {}
    for op in operations:
        @settings(max_examples=12, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def fuzz(case):
            response = case.call(base_url=url, headers=AUTH, timeout=30)
            label = case.operation.label
            seen[label] = seen.get(label, 0) + 1
            assert response.status_code < 500, (label, case.body, response.text[:300])
            assert not _leaks(response.text, root), (label, response.text[:300])
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
        fuzz()
    assert len(seen) == len(operations)


def test_token_on_every_route_but_health(served):
    url, root = served
    schema = httpx.get(f"{url}/openapi.json", headers=AUTH).json()
    assert httpx.get(f"{url}/health").status_code == 200
    for path, methods in schema["paths"].items():
        concrete = path.replace("{collection}", "vectors").replace("{item_id}", "v.npy:1")
        for method in methods:
            if path == "/health":
                continue
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = httpx.request(method.upper(), f"{url}{concrete}", headers=headers, json={})
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert not _leaks(r.text, root)


@pytest.mark.parametrize("item", ["../secret.txt", "..%2Fsecret.txt", "%2e%2e/%2e%2e/secret.txt",
                                  "p0.png/../../secret.txt", "/etc/passwd", "..%5Csecret.txt", "p0.png%00.txt"])
def test_path_traversal_on_item_images_is_refused(served, item):
    url, root = served
    ok = httpx.get(f"{url}/items/images/p0.png/image", headers=AUTH)
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("image/")
    r = httpx.get(f"{url}/items/images/{item}/image", headers=AUTH)
    assert r.status_code in (400, 404), (item, r.status_code)
    assert b"not for the web" not in r.content and b"root:" not in r.content
    assert not _leaks(r.text, root)
