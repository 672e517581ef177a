"""How errors answer: JSON with the status that says what went wrong, worded for API clients.

`{"error": "message"}` on indexer's own routes; OpenAI's shape on the OpenAI-compatible /v1 routes,
`{"error": {"message", "type", "param", "code"}}`, which the `openai` client reads (it shows only
`Error code: 404` for anything else). The library's messages name CLI flags and paths on this machine;
clients see the request fields and the collections' names instead.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from ..errors import IndexerError
from .responses import JSON
from .service import Service

log = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"
# OpenAI's error type and code for a status; every other 4xx is an invalid_request_error.
_OPENAI_KINDS = {401: ("invalid_request_error", "invalid_api_key"), 429: ("rate_limit_error", None),
                 500: ("server_error", None)}


def error_body(path: str, status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> dict:
    """The JSON body of an error answered on `path`."""
    if not path.startswith(OPENAI_PREFIX):
        return {"error": message}
    kind, default_code = _OPENAI_KINDS.get(status, ("invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def api_wording(message: str, fields: Iterable[str]) -> str:
    """A library message in the API's words: the CLI flag of a request field becomes the field's name
    (`invalid --where ...` -> `invalid where ...`, `--group-by-doc` -> `group_by_doc`)."""
    flags = {"-" * (1 if len(f) == 1 else 2) + f.replace("_", "-"): f for f in fields}
    if not flags:
        return message
    pattern = "|".join(re.escape(f) for f in sorted(flags, key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({pattern})(?![\w-])", lambda m: flags[m[1]], message)


def install(app: FastAPI, service: Service, fields: Iterable[str]) -> None:
    """Exception handlers that answer every error, raised anywhere under the routes, as above."""
    fields = tuple(fields)
    # Messages name collections by their paths on this machine; clients know them by their names.
    paths = sorted(((str(p), s.name) for s in service.collections.values()
                    for p in {str(s.coll.path), s.coll.location.identity()}), key=lambda pn: -len(pn[0]))

    def answer(request: Request, status: int, message: str, headers=None, **extra) -> JSON:
        return JSON(error_body(request.url.path, status, message, **extra), status_code=status, headers=headers)

    @app.exception_handler(IndexerError)
    async def user_error(request: Request, exc: IndexerError) -> JSON:
        message = str(exc)
        for path, name in paths:
            message = message.replace(path, name)
        return answer(request, getattr(exc, "status", 400), api_wording(message, fields),
                      code=getattr(exc, "code", None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSON:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route: see /docs"
        return answer(request, exc.status_code, message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSON:
        parts, params = [], []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
            params.append(loc)
        return answer(request, 422, "; ".join(parts) or "invalid request", param=next(filter(None, params), None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSON:
        log.error("internal error", exc_info=exc)
        return answer(request, 500, "internal server error (details are in the server log)")
