"""Collections on object storage: a real S3-compatible server (moto's server mode) started here, configured
the way every S3 tool is (AWS_* environment variables), driven through the CLI and the library."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import indexer
from indexer.cli import cli
from indexer.store import Collection

from .conftest import write_jsonl

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 endpoint and a bucket; the AWS_* variables point every client (Lance, pyarrow, this
    package's subprocesses) at it. Yields the bucket's URI prefix."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
           "INDEXER_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="lake")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        yield "s3://lake"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _objects(prefix: str) -> set[str]:
    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=key + "/")
    return {o["Key"][len(key) + 1:] for o in listing.get("Contents", [])}


def test_text_collection_on_s3_matches_local(s3, sample_corpus, tmp_path):
    uri = f"{s3}/texts.idx"
    summary = json.loads(_run("ingest", uri, str(sample_corpus["texts"]), "--model", "minilm", "--json", "-q"))
    local = indexer.ingest(tmp_path / "texts.idx", [str(sample_corpus["texts"])], model="minilm", progress=False)
    assert summary["added"] == local.added > 0 and summary["rows"] == local.rows
    files = _objects(uri)
    assert "manifest.json" in files and any(f.startswith("lance/items.lance/") for f in files)
    assert not (tmp_path / "s3:").exists()  # nothing written to a local folder named like the URI

    query = "how do plants turn sunlight into food"
    remote = json.loads(_run("search", uri, query, "-k", "3", "--json"))
    expected = indexer.search(tmp_path / "texts.idx", query, k=3)
    assert [h["id"] for h in remote] == [h["id"] for h in expected]
    assert remote[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)

    info = json.loads(_run("info", uri, "--json"))
    assert info["rows"] == local.rows and info["path"] == uri and info["size_bytes"] > 0

    # Re-ingest: unchanged rows are skipped; a changed and a new row land; errors.jsonl is on S3 too.
    rows = [json.loads(line) for line in sample_corpus["texts"].read_text().splitlines()]
    rows[0]["text"] = "An entirely new sentence about volcanoes and lava."
    rows.append({"id": "extra-1", "text": "Tea is brewed from the leaves of Camellia sinensis.", "label": "food"})
    rows.append({"id": "broken", "text": ""})
    edited = write_jsonl(tmp_path / "edited.jsonl", rows)
    again = json.loads(_run("ingest", uri, str(edited), "--json", "-q"))
    assert (again["added"], again["updated"], again["skipped"], again["errors"]) == (1, 1, len(rows) - 3, 1)
    assert "errors.jsonl" in _objects(uri)
    coll = Collection.open(uri)
    assert coll.count() == local.rows + 1 and [e["id"] for e in coll.errors()] == ["broken"]
    assert ".lock" not in _objects(uri)  # the writer's lease is released


def test_serve_a_collection_on_s3(s3, sample_corpus):
    import httpx

    from .serving import running_server

    uri = f"{s3}/served.idx"
    indexer.ingest(uri, [str(sample_corpus["texts"])], model="minilm", progress=False)
    with running_server([uri]) as url:
        assert [c["name"] for c in httpx.get(f"{url}/collections").json()["collections"]] == ["served"]
        r = httpx.post(f"{url}/search", json={"collection": "served", "query": "stars and planets", "k": 2},
                       timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["label"] == "astronomy"


def test_vectors_index_and_dedup_on_s3(s3, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x[1] = x[0] + 1e-4  # one near duplicate pair: ids v.npy:1 and v.npy:2 (rows count from 1)
    np.save(tmp_path / "v.npy", x)
    uri = f"{s3}/vectors.idx"
    _run("ingest", uri, str(tmp_path / "v.npy"), "--model", "none", "-q")
    built = json.loads(_run("index", uri, "--kind", "ivf-flat", "--target-recall", "0.9", "--json", "-q"))
    assert built["recall_at_10"] >= 0.9
    assert {"index/index.json", "index/faiss.index", "index/rows.parquet"} <= _objects(uri)

    hits = indexer.search(uri, vector=x[5].tolist(), k=3, engine="faiss")
    assert hits[0]["id"] == "v.npy:6" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    info = json.loads(_run("info", uri, "--json"))
    assert info["index"]["kind"] == "ivf-flat" and info["index"]["current"] is True

    # New rows reach the index through the same catch-up as local collections, published back to S3.
    np.save(tmp_path / "w.npy", rng.standard_normal((10, 16)).astype(np.float32))
    _run("ingest", uri, str(tmp_path / "w.npy"), "-q")
    assert json.loads(_run("info", uri, "--json"))["index"]["current"] is True
    assert indexer.search(uri, id="w.npy:3", k=1, engine="faiss")[0]["id"] != "w.npy:3"  # left out of its own

    report = json.loads(_run("dedup", uri, "--threshold", "0.99", "--json", "-q"))
    assert ["v.npy:1", "v.npy:2"] in report["groups"]


def test_writer_lease_blocks_a_second_writer(s3, tmp_path):
    np.save(tmp_path / "v.npy", np.ones((4, 4), dtype=np.float32))
    uri = f"{s3}/leased.idx"
    _run("ingest", uri, str(tmp_path / "v.npy"), "--model", "none", "-q")
    coll = Collection.open(uri)
    with coll.write_lock("test"):
        result = CliRunner().invoke(cli, ["ingest", uri, str(tmp_path / "v.npy"), "-q"])
        assert result.exit_code == 1 and "is being written by" in result.output
    _run("ingest", uri, str(tmp_path / "v.npy"), "-q")  # free again once released


def test_storage_option_errors_and_missing_collection(s3):
    result = CliRunner().invoke(cli, ["info", f"{s3}/nothing.idx", "--storage-option", "region"])
    assert result.exit_code == 1 and "expected KEY=VALUE" in result.output
    result = CliRunner().invoke(cli, ["info", f"{s3}/nothing.idx"])
    assert result.exit_code == 1 and "collection not found" in result.output


@pytest.mark.slow
def test_ray_ingest_into_s3_with_storage_options(s3, sample_corpus, ray_cluster, tmp_path):
    """Ray workers write the fragments to the bucket themselves: the storage options travel with the plan
    (the workers of the session's cluster were started without the AWS_* variables)."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    uri = f"{s3}/ray-texts.idx"
    _run("ingest", uri, str(sample_corpus["texts"]), "--model", "minilm", "--engine", "ray", "--workers", "1",
         "-q", "--storage-option", f"aws_endpoint={endpoint}", "--storage-option", "allow_http=true",
         "--storage-option", "aws_access_key_id=testing", "--storage-option", "aws_secret_access_key=testing",
         "--storage-option", "aws_region=us-east-1")
    local = indexer.ingest(tmp_path / "texts.idx", [str(sample_corpus["texts"])], model="minilm", progress=False)
    coll = Collection.open(uri)
    assert coll.count() == local.rows
    remote = {r["id"]: r["vector"] for b in coll.scan(["id", "vector"]) for r in b.to_pylist()}
    here = {r["id"]: r["vector"] for b in Collection.open(tmp_path / "texts.idx").scan(["id", "vector"])
            for r in b.to_pylist()}
    assert remote.keys() == here.keys()
    assert max(float(np.abs(np.subtract(remote[i], here[i])).max()) for i in here) < 1e-5
