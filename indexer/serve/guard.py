"""ASGI layers in front of the app: the bearer token, the body size limit, and request metrics.

They answer with JSON themselves, before any route runs, so a refused request costs no parsing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from urllib.parse import parse_qs

from starlette.routing import Match

from .errors import error_body
from .metrics import Metrics

COOKIE = "indexer_session"
WILDCARDS = ("", "0.0.0.0", "::")


def allowed_hosts(bound: str) -> frozenset[str] | None:
    """Host names a request may use: this machine's loopback names and the address bound to; None
    for a wildcard bind (every name of the machine is legitimate there)."""
    bound = bound.strip("[]").lower()
    return None if bound in WILDCARDS else frozenset({"localhost", "127.0.0.1", "::1", bound})


async def send_error(scope, send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An error answered here, in the shape the route would have used (errors.error_body)."""
    body = json.dumps(error_body(scope["path"], status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """With a token, every path but /health needs `Authorization: Bearer TOKEN` or the session cookie a
    browser gets by opening `/?token=TOKEN` once (a page cannot send headers with <img> loads).
    The cookie is HttpOnly and SameSite=Strict, so other sites cannot make requests that carry it.
    Bodies over `max_body` bytes get 413 before anything reads them.

    Without a token, only requests whose Host header names this machine (`allowed_hosts`) are
    answered: a web page cannot make a browser query the server through a name it controls that
    resolves to 127.0.0.1 (DNS rebinding). `allowed_hosts=None` (a wildcard bind) skips the check."""

    def __init__(self, app, token: str | None, max_body: int, allowed_hosts: frozenset[str] | None = None):
        self.app = app
        self.allowed_hosts = None if token else allowed_hosts
        self.token = token.encode() if token else None
        self.session = hmac.new(self.token, b"indexer-session", hashlib.sha256).hexdigest().encode() if token else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = self._host(scope)
        if self.allowed_hosts is not None and host is not None and host not in self.allowed_hosts:
            return await send_error(scope, send, 421, f"Host {host!r} is not this server: open it as "
                                                      f"http://{min(self.allowed_hosts)}:PORT/ (or serve with --token)")
        if self.token is not None and scope["path"] != "/health" and not self._authorized(scope):
            if scope["path"] == "/" and self._token_in_query(scope):
                cookie = f"{COOKIE}={self.session.decode()}; HttpOnly; SameSite=Strict; Path=/".encode()
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", b"/"), (b"set-cookie", cookie), (b"content-length", b"0")]})
                return await send({"type": "http.response.body", "body": b""})
            return await send_error(scope, send, 401, "missing or wrong token: send `Authorization: Bearer TOKEN` "
                                                      "(in a browser, open /?token=TOKEN once)",
                                    [(b"www-authenticate", b"Bearer")])
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await send_error(scope, send, 400, "invalid Content-Length header")
            if int(length) > self.max_body:
                return await send_error(scope, send, 413, self._too_large())
        # Read the body here (chunked uploads have no Content-Length) and hand it on in one piece.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await send_error(scope, send, 413, self._too_large())
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    def _host(scope) -> str | None:
        """The Host header's name, without the port and the brackets of an IPv6 address."""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1").strip().lower()
                return host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        return None

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body} bytes (the server's limit, --max-body)"

    def _authorized(self, scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return hmac.compare_digest(value[7:].strip(), self.token)
            if name == b"cookie":
                for part in value.split(b";"):
                    key, _, val = part.strip().partition(b"=")
                    if key == COOKIE.encode():
                        given = val
        return bool(given) and hmac.compare_digest(given, self.session)

    def _token_in_query(self, scope) -> bool:
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        return len(values) == 1 and hmac.compare_digest(values[0].encode(), self.token)


class Measure:
    """Counts and times every request, labelled by route template and status."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.observe(scope["method"], self._route(scope), status, time.perf_counter() - start)

    def _route(self, scope) -> str:
        route = scope.get("route")
        if route is None:  # refused before routing (401, 413): find the route it was meant for
            route = next((r for r in self.routes() if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"
