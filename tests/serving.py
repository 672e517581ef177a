"""Start a real `indexer serve` process on a free loopback port, and stop it."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
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

    # The URL line comes once the models are loaded; read it on a thread so a hung start has a deadline.
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            raise RuntimeError(f"indexer serve printed no URL within {timeout:.0f} s: {stderr()}") from None
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
