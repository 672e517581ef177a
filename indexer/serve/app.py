"""The HTTP API and the search page: thin routes over a Service.

Errors are JSON `{"error": message}` with the status that says what went wrong (400 bad query,
401 token, 404 unknown collection/item/route, 413 too large, 415 not an image or wrong content type,
422 malformed fields); a bug answers 500 with no details (the traceback goes to the server log).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import logging
import math
import mimetypes
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError
from starlette.exceptions import HTTPException

from ..errors import IndexerError
from ..sources.images import IMAGE_EXTENSIONS, ImageDecodeError, ImageTooLarge, decode_image
from ..tasks.search import Engine, Mode, Query
from .guard import Guard, Measure, allowed_hosts
from .metrics import Metrics
from .service import MAX_K, NotFound, SearchParams, Served, ServeError, Service, TooLarge, UnsupportedMedia

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_BODY = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # a 40-megapixel photo; the ingest guard (decode_image) allows more
MAX_INPUTS = 2048  # texts per embeddings request, as OpenAI's API allows


class JSON(JSONResponse):
    """JSON that tolerates stored fields json does not know (dates, decimals) by printing them, and
    writes NaN and infinities (a stored field can hold them) as null: they are not JSON, and clients'
    parsers reject them."""

    def render(self, content: Any) -> bytes:
        try:
            return _dumps(content)
        except ValueError:  # rare: clean a copy only then
            return _dumps(_finite(content))


def _dumps(content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=False, allow_nan=False, default=str, separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class SearchRequest(BaseModel):
    """One query: exactly one of query (text), id (a stored item), vector, or an uploaded image."""

    model_config = ConfigDict(extra="forbid")
    collection: str | None = Field(None, description="Which served collection (needed when several are served).")
    query: str | None = Field(None, description="Text to search for.")
    id: str | None = Field(None, description="Search by a stored item (left out of its own results).")
    vector: list[FiniteFloat] | None = Field(None, description="A query vector with the collection's dimension.")
    k: int = Field(10, ge=1, le=MAX_K)
    where: str | None = Field(None, description="SQL filter on stored fields, e.g. \"label = 'cat'\".")
    engine: Engine = "auto"
    mode: Mode = Field(
        "vector", description="vector: by embedding; text: BM25 over stored text; hybrid: both, fused (RRF).")
    group_by_doc: bool = Field(False, description="Chunked collections: the k best documents, each as its best passage.")


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str] | None = Field(None, description="Text(s) to embed (JSON); or upload an `image`.")
    collection: str | None = Field(None, description="Whose model embeds (needed when several are served).")


class OpenAIEmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str = Field(description="A served collection's name or its model's name (e.g. minilm).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def _form_schema(*fields: str) -> dict:
    return {"type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"}, **{f: {"type": "string"} for f in fields}}}


def _body_doc(model: type[BaseModel], *form_fields: str) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()},
        "multipart/form-data": {"schema": _form_schema(*form_fields)}}}}


def create_app(collections: Sequence[str | os.PathLike], *, token: str | None = None, host: str = "127.0.0.1",
               max_body: int = MAX_BODY,
               max_pixels: int = MAX_PIXELS, device: str = "auto", max_batch: int = 32,
               batch_wait: float = 0.0, threads: int | None = None) -> FastAPI:
    """The app serving `collections` (opened now: a missing one fails here, not on the first request).

    >>> app = create_app(["notes.idx", "photos.idx"], token="s3cret")      # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                        # doctest: +SKIP

    `host` is the address the server binds: without a token, requests must name it or localhost.
    """
    if token is not None and not token.strip():  # an empty token must not quietly mean "no auth"
        raise IndexerError("the token is empty: give a real --token (or INDEXER_TOKEN), or leave it unset "
                           "to serve without one")
    service = Service(collections, device=device, max_batch=max_batch, batch_wait=batch_wait, threads=threads)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="indexer", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Search collections of embeddings by text, image, id or vector.")
    app.state.service = service
    app.add_middleware(Guard, token=token, max_body=max_body, allowed_hosts=allowed_hosts(host))
    app.add_middleware(Measure, metrics=metrics, routes=lambda: app.router.routes)
    _error_handlers(app, service)
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
              openapi_extra=_body_doc(SearchRequest, "collection", "k", "where", "engine", "mode"))
    async def search(request: Request) -> JSON:
        start = time.perf_counter()
        req, image = await _parse(request, SearchRequest)
        served = service.collection(req.collection)
        params = SearchParams(k=req.k, where=req.where, engine=req.engine, mode=req.mode, group_by_doc=req.group_by_doc)
        given = [x is not None for x in (req.query, req.id, req.vector, image)]
        if sum(given) != 1:
            raise ServeError("give exactly one of query, id, vector or an image upload"
                             if any(given) else "empty query: give a query, id, vector or image")
        if image is None:
            query = Query(text=req.query, id=req.id, vector=req.vector)
            hits = await service.search(served.name, query, params)
        else:
            service.check(served, Query(image="upload"), params)
            decoded = await asyncio.to_thread(_check_image, image, max_pixels)
            hits = await service.search(served.name, Query(image=decoded), params)
        return JSON({"collection": served.name, "k": req.k, "mode": req.mode,
                     "took_ms": round((time.perf_counter() - start) * 1000, 2),
                     "results": [_present(served, h) for h in hits]})

    @app.post("/embed", summary="Embed texts (JSON) or an image (multipart) with a collection's model",
              openapi_extra=_body_doc(EmbedRequest, "collection"))
    async def embed(request: Request) -> JSON:
        req, image = await _parse(request, EmbedRequest)
        if (image is None) == (req.input is None):
            raise ServeError("give either input (text) or an image upload")
        served = service.collection(req.collection)
        wanted = "text" if image is None else "image"
        if served.modality in ("text", "image") and served.modality != wanted:  # else: no model (service.embed says)
            raise ServeError(f"collection {served.name!r} embeds {served.modality}: "
                             + ("upload an image" if wanted == "text" else "send text as JSON"))
        items = _texts(req.input) if image is None else [await asyncio.to_thread(_check_image, image, max_pixels)]
        served, vectors = await service.embed(served.name, items)
        return JSON({"collection": served.name, "model": served.coll.spec.name, "dim": int(vectors.shape[1]),
                     "embeddings": vectors.tolist()})

    @app.post("/v1/embeddings", summary="OpenAI-compatible embeddings of texts")
    async def openai_embeddings(req: OpenAIEmbeddingRequest) -> JSON:
        texts = _texts(req.input)
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

    @app.get("/items/{collection}/{item_id:path}/image", summary="The image file recorded for an item",
             response_class=Response, responses={200: {"content": {"image/*": {}}}})
    async def item_image(collection: str, item_id: str, size: int | None = None) -> Response:
        if size is not None and not 16 <= size <= 1024:
            raise ServeError("size must be between 16 and 1024 pixels")
        served = service.collection(collection)
        path = await asyncio.to_thread(_recorded_image, service, served, item_id)
        if size is None:
            return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        data = await asyncio.to_thread(_thumbnail, str(path), path.stat().st_mtime_ns, size)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    @app.get("/items/{collection}/{item_id:path}", summary="A stored item's fields (without its vector)")
    async def item(collection: str, item_id: str) -> JSON:
        served = service.collection(collection)
        row = await asyncio.to_thread(service.row, served, item_id)
        return JSON(_present(served, row))

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


async def _parse(request: Request, model: type[BaseModel]) -> tuple[Any, bytes | None]:
    """A JSON body, or a multipart form with an `image` file and the other fields as strings."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServeError(f"invalid JSON body: {exc}") from None
        return _validate(model, body), None
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=16)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ServeError("multipart requests need an `image` file field")
        fields = {k: v for k, v in form.items() if k != "image" and v != ""}
        return _validate(model, fields), await upload.read()
    raise UnsupportedMedia(f"unsupported content type {ctype or '(none)'!r}: send application/json, "
                           "or multipart/form-data with an `image` file")


def _validate(model: type[BaseModel], body: Any):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _texts(value: str | list[str]) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ServeError("input is empty: give a string or a list of strings")
    if len(texts) > MAX_INPUTS:
        raise TooLarge(f"{len(texts)} inputs in one request; the limit is {MAX_INPUTS}")
    if any(not t.strip() for t in texts):
        raise ServeError("input contains an empty string")
    return texts


def _by_model(service: Service, model: str) -> Served:
    """OpenAI clients name a model: accept a served collection's name or its model's name."""
    text = [s for s in service.collections.values() if s.modality == "text"]
    for s in text:
        if model in (s.name, s.coll.spec.name):
            return s
    if not text:
        raise ServeError("no text collection is served: nothing to embed text with")
    known = sorted({s.coll.spec.name for s in text} | {s.name for s in text})
    raise NotFound(f"unknown model {model!r}: this server embeds text with {', '.join(known)}")


def _check_image(data: bytes, max_pixels: int):
    """Decode an upload with the ingest guard (pixel bombs, corrupt and non-image files) and this
    server's tighter pixel limit."""
    from PIL import Image

    if not data:
        raise ServeError("the uploaded image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:  # PIL's own guard (twice its warning size) on the header
        raise TooLarge(f"image too large: {exc}") from None
    except Image.UnidentifiedImageError:
        raise UnsupportedMedia("the upload is not an image in a known format (JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds on broken headers
        raise ServeError(f"corrupt image: {exc}") from None
    if width * height > max_pixels:
        raise TooLarge(f"image too large: {width}x{height} pixels (limit {max_pixels})")
    try:
        return decode_image(data)
    except ImageTooLarge as exc:
        raise TooLarge(str(exc)) from None
    except ImageDecodeError as exc:
        raise ServeError(str(exc)) from None


def _recorded_image(service: Service, served: Served, item_id: str) -> Path:
    """The image file the collection recorded for this item, and nothing else: the id is only a key
    into the table, never part of a file path."""
    if served.modality != "image" or "path" not in served.coll.result_columns():
        raise NotFound(f"collection {served.name!r} records no image files")
    recorded = service.row(served, item_id, ["id", "path"]).get("path")
    if not recorded or Path(recorded).suffix.lower() not in IMAGE_EXTENSIONS:
        raise NotFound(f"item {item_id!r} has no image file recorded")
    path = Path(recorded)
    if not path.is_file():
        raise NotFound(f"the image recorded for {item_id!r} is no longer on disk")
    return path


@functools.lru_cache(maxsize=512)
def _thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
    img = decode_image(Path(path).read_bytes(), min_size=size)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _present(served: Served, row: dict[str, Any]) -> dict[str, Any]:
    """A result as the API shows it: bytes fields left out, an image_url for image items."""
    out = {k: v for k, v in row.items() if not isinstance(v, bytes | bytearray)}
    path = row.get("path")
    if served.modality == "image" and isinstance(path, str) and Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        out["image_url"] = f"/items/{quote(served.name, safe='')}/{quote(str(row['id']), safe='/')}/image"
    return out


def _error_handlers(app: FastAPI, service: Service) -> None:
    # Messages name collections by their paths on this machine; clients know them by their names.
    paths = sorted(((str(p), s.name) for s in service.collections.values()
                    for p in {str(s.coll.path), s.coll.location.identity()}), key=lambda pn: -len(pn[0]))

    @app.exception_handler(IndexerError)
    async def user_error(_request, exc: IndexerError) -> JSON:
        message = str(exc)
        for path, name in paths:
            message = message.replace(path, name)
        return JSON({"error": message}, status_code=getattr(exc, "status", 400))

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException) -> JSON:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route: see /docs"
        return JSON({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError) -> JSON:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSON({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def bug(_request, exc: Exception) -> JSON:
        log.error("internal error", exc_info=exc)
        return JSON({"error": "internal server error (details are in the server log)"}, status_code=500)


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


def _version() -> str:
    from .. import __version__

    return __version__
