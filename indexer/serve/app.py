"""The HTTP API and the search page: thin routes over a Service.

Requests are parsed in requests.py, images handled in images.py, answers written by responses.py, and
errors shaped by errors.py (400 bad query, 401 token, 404 unknown collection/item/route, 413 too large,
415 not an image or wrong content type, 422 malformed fields; a bug answers 500 with no details, the
traceback goes to the server log).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import mimetypes
import os
import time
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.convertors import PathConvertor, register_url_convertor

from ..errors import IndexerError
from ..tasks.search import Query
from ..version import __version__
from .errors import install as install_error_handlers
from .guard import Guard, Measure, allowed_hosts
from .images import MAX_PIXELS, check_upload, recorded_image, thumbnail
from .metrics import Metrics
from .requests import (
    FIELDS,
    EmbedRequest,
    OpenAIEmbeddingRequest,
    SearchRequest,
    body_doc,
    input_texts,
    parse,
)
from .responses import JSON, present
from .service import SearchParams, Served, ServeError, Service, UnknownModel

STATIC = Path(__file__).parent / "static"
MAX_BODY = 20 * 1024 * 1024


class _AnyPath(PathConvertor):
    """Starlette's `path` stops at a newline (its `.*` is not DOTALL): an id holding one was no route."""

    regex = "(?s:.*)"


register_url_convertor("anypath", _AnyPath())


def create_app(collections: Sequence[str | os.PathLike], *, token: str | None = None, host: str = "127.0.0.1",
               max_body: int = MAX_BODY,
               max_pixels: int = MAX_PIXELS, device: str = "auto", max_batch: int = 32,
               batch_wait: float = 0.0, threads: int | None = None, query_backend: str = "auto") -> FastAPI:
    """The app serving `collections` (opened now: a missing one fails here, not on the first request).

    >>> app = create_app(["notes.idx", "photos.idx"], token="s3cret")      # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                        # doctest: +SKIP

    `host` is the address the server binds: without a token, requests must name it or localhost.
    """
    if token is not None and not token.strip():  # an empty token must not quietly mean "no auth"
        raise IndexerError("the token is empty: give a real --token (or INDEXER_TOKEN), or leave it unset "
                           "to serve without one")
    service = Service(collections, device=device, max_batch=max_batch, batch_wait=batch_wait, threads=threads,
                      query_backend=query_backend)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="indexer", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Search collections of embeddings by text, image, id or vector.")
    app.state.service = service
    app.add_middleware(Guard, token=token, max_body=max_body, allowed_hosts=allowed_hosts(host))
    app.add_middleware(Measure, metrics=metrics, routes=lambda: app.router.routes)
    install_error_handlers(app, service, FIELDS)
    _docs(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    index_html = (STATIC / "index.html").read_text(encoding="utf-8")  # read once, not per request

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/health", summary="Liveness (no token needed)")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/collections", summary="The served collections")
    async def list_collections() -> JSON:
        return JSON({"collections": await asyncio.to_thread(lambda: [s.describe() for s in service.collections.values()])})

    @app.post("/search", summary="Nearest items to a text, image upload, id or vector",
              openapi_extra=body_doc(SearchRequest, "collection", "k", "where", "engine", "mode", "fields"))
    async def search(request: Request) -> JSON:
        start = time.perf_counter()
        req, image = await parse(request, SearchRequest)
        served = service.collection(req.collection)
        fields = tuple(req.fields.split(",")) if isinstance(req.fields, str) else req.fields and tuple(req.fields)
        params = SearchParams(k=req.k, where=req.where, engine=req.engine, mode=req.mode, group_by_doc=req.group_by_doc,
                              fields=fields)
        Query.pick({"query": req.query, "id": req.id, "vector": req.vector, "an image upload": image}, ServeError)
        if image is None:
            query = Query(text=req.query, id=req.id, vector=req.vector)
            hits = await service.search(served.name, query, params)
        else:
            service.check(served, Query(image="upload"), params)
            decoded = await asyncio.to_thread(check_upload, image, max_pixels)
            hits = await service.search(served.name, Query(image=decoded), params)
        return JSON({"collection": served.name, "k": req.k, "mode": req.mode,
                     "took_ms": round((time.perf_counter() - start) * 1000, 2),
                     "results": [present(served, h) for h in hits]})

    @app.post("/embed", summary="Embed texts (JSON) or an image (multipart) with a collection's model",
              openapi_extra=body_doc(EmbedRequest, "collection"))
    async def embed(request: Request) -> JSON:
        req, image = await parse(request, EmbedRequest)
        if (image is None) == (req.input is None):
            raise ServeError("give either input (text) or an image upload")
        served = service.collection(req.collection)
        wanted = "text" if image is None else "image"
        if served.modality in ("text", "image") and not served.coll.spec.accepts(wanted):  # else: no model (service.embed says)
            raise ServeError(f"collection {served.name!r} embeds {served.modality}: "
                             + ("upload an image" if wanted == "text" else "send text as JSON"))
        items = input_texts(req.input) if image is None else [await asyncio.to_thread(check_upload, image, max_pixels)]
        served, vectors = await service.embed(served.name, items)
        return JSON({"collection": served.name, "model": served.coll.spec.name, "dim": int(vectors.shape[1]),
                     "embeddings": vectors.tolist()})

    @app.post("/v1/embeddings", summary="OpenAI-compatible embeddings of texts")
    async def openai_embeddings(req: OpenAIEmbeddingRequest) -> JSON:
        texts = input_texts(req.input)
        served = _by_model(service, req.model)
        if req.dimensions is not None and req.dimensions != served.coll.spec.dim:
            raise ServeError(f"{req.model} makes {served.coll.spec.dim}-dimensional embeddings, not {req.dimensions}")
        _, vectors = await service.embed(served.name, texts)
        tokens = await service.count_tokens(served, texts)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        return JSON({"object": "list", "data": data, "model": req.model,
                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/items/{collection}/{item_id:anypath}/image", summary="The image file recorded for an item",
             response_class=Response, responses={200: {"content": {"image/*": {}}}})
    async def item_image(collection: str, item_id: str, size: int | None = None) -> Response:
        if size is not None and not 16 <= size <= 1024:
            raise ServeError("size must be between 16 and 1024 pixels")
        served = service.collection(collection)
        path = await asyncio.to_thread(recorded_image, service, served, item_id)
        if size is None:
            return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        data = await asyncio.to_thread(thumbnail, str(path), path.stat().st_mtime_ns, size)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    @app.get("/items/{collection}/{item_id:anypath}", summary="A stored item's fields (without its vector)")
    async def item(collection: str, item_id: str) -> JSON:
        served = service.collection(collection)
        row = await asyncio.to_thread(service.row, served, item_id)
        return JSON(present(served, row))

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        extra = ["# HELP indexer_search_batch_size Queries answered by one search_batch call.",
                 "# TYPE indexer_search_batch_size histogram",
                 *service.batch_sizes.lines("indexer_search_batch_size")]
        extra += ["# HELP indexer_collection_rows Rows in each served collection.",
                  "# TYPE indexer_collection_rows gauge",
                  *(f'indexer_collection_rows{{collection="{s.name}"}} {s.coll.count()}'
                    for s in service.collections.values())]
        return Response(metrics.render(extra), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _by_model(service: Service, model: str) -> Served:
    """OpenAI clients name a model: accept a served collection's name or its model's name."""
    text = [s for s in service.collections.values() if s.modality == "text"]
    for s in text:
        if model in (s.name, s.coll.spec.name):
            return s
    if not text:
        raise ServeError("no text collection is served: nothing to embed text with")
    known = sorted({s.coll.spec.name for s in text} | {s.name for s in text})
    raise UnknownModel(f"unknown model {model!r}: this server embeds text with {', '.join(known)}")


def _docs(app: FastAPI) -> None:
    """Swagger UI at /docs from files a package ships (fastapi-offline): no CDN, works offline."""
    try:
        import fastapi_offline
    except ImportError:  # /openapi.json is still served
        return
    from fastapi.openapi.docs import get_swagger_ui_html

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="indexer API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")
