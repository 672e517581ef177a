"""What requests carry: the JSON bodies (pydantic models, which also document /docs) and the parsing of
a JSON body or a multipart form with an image upload into them."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError

from ..tasks.search import Engine, Mode
from .service import MAX_K, ServeError, TooLarge, UnsupportedMedia

MAX_INPUTS = 2048  # texts per embeddings request, as OpenAI's API allows


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
    fields: list[str] | str | None = Field(
        None, description="Stored fields each hit carries: a list or \"a,b\"; default id, text or path, label "
                          "(and a passage's place in its document); \"all\" for every field. Only these are read.")


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


# The request fields a library message may name by their CLI flags (`--where`, `-k`, ...).
FIELDS = (*SearchRequest.model_fields, "image", "input")


def body_doc(model: type[BaseModel], *form_fields: str) -> dict:
    """OpenAPI for a route that takes `model` as JSON or an `image` upload with `form_fields` as a form."""
    form = {"type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"},
                           **{f: {"type": "string"} for f in form_fields}}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()},
        "multipart/form-data": {"schema": form}}}}


async def parse(request: Request, model: type[BaseModel]) -> tuple[Any, bytes | None]:
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


def input_texts(value: str | list[str]) -> list[str]:
    """The texts of an `input` field: one or a list, none empty, at most MAX_INPUTS."""
    out = [value] if isinstance(value, str) else list(value)
    if not out:
        raise ServeError("input is empty: give a string or a list of strings")
    if len(out) > MAX_INPUTS:
        raise TooLarge(f"{len(out)} inputs in one request; the limit is {MAX_INPUTS}")
    if any(not t.strip() for t in out):
        raise ServeError("input contains an empty string")
    return out
