"""Start a real `indexer serve` process on a free loopback port, and stop it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


@contextmanager
def running_server(collections: list[Path], *args: str, env: dict | None = None,
                   timeout: float = 180) -> Iterator[str]:
    """Yields the base URL once /health answers (models loaded); the process is stopped after."""
    cmd = [sys.executable, "-m", "indexer.cli", "serve", *map(str, collections), "--port", "0", "--json", *args]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})

    def stderr() -> str:
        log.seek(0)
        return log.read()

    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"indexer serve exited ({proc.wait()}): {stderr()}")
        url = json.loads(line)["url"].rstrip("/")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=timeout).status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"indexer serve did not start: {stderr()}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
