"""Run the app under uvicorn on a socket bound here (so a busy port is a clear error, and port 0 works)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Sequence

from ..errors import IndexerError, attempt_import

log = logging.getLogger("indexer")


def serve(collections: Sequence[str | os.PathLike], *, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, on_ready: Callable[[str], None] | None = None, **options) -> None:
    """Serve `collections` until interrupted. `options` go to `create_app` (max_body, max_pixels,
    device, max_batch, batch_wait, threads, query_backend). `on_ready(url)` is called once the socket is bound and
    the models are loaded."""
    uvicorn = attempt_import("uvicorn", "serve")
    attempt_import("fastapi", "serve")
    attempt_import("python_multipart", "serve")  # image uploads
    from .app import create_app

    app = create_app(collections, token=token, host=host, **options)
    if not token and not _is_loopback(host):
        log.warning("serving on %s without --token: anyone who can reach this machine can query and "
                    "read the collections", host)
    sock = _bind(host, port)  # first: a busy port fails before seconds of model loading
    try:
        app.state.service.warm_up()
        url = f"http://{_url_host(host)}:{sock.getsockname()[1]}/"
        if on_ready:
            on_ready(url)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say TCP, and
    # with Nagle on, a response written in two parts waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise IndexerError(f"cannot listen on {host}:{port}: {exc.strerror} (pick another --port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
