"""`indexer serve`: the HTTP API and search page over one or more collections."""

from __future__ import annotations

import os

import click

from ..wording import counted
from .base import cli, device_option, log, output_options, print_json, storage_options


@cli.command()
@click.argument("collections", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default is reachable from this machine only.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--token", envvar="INDEXER_TOKEN", help="Require `Authorization: Bearer TOKEN` on every route but "
              "/health (or set INDEXER_TOKEN, which keeps it out of the process list).")
@click.option("--max-body", default="20MB", show_default=True, help="Largest request body (uploads included).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=40_000_000, show_default=True,
              help="Largest uploaded image, in pixels.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most concurrent queries answered by one batched search (1: no batching).")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=3.0, show_default=True,
              help="Hold a batch's first query this long for others to join, unless the last batch held one "
              "query (a lone client waits for no one); 0: batch only what queued while the previous batch ran.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for model and index work (default: for torch "
              "and FAISS half the cores, at most 4: more help big batches on an idle machine, hurt on a busy one; "
              "for an exported query model, whose idle threads sleep, all the cores, at most 4).")
@click.option("--query-backend", type=click.Choice(["auto", "torch", "onnx", "openvino"]), default="auto",
              show_default=True, help="What embeds text and image queries on a CPU when the collection's vectors "
              "came from torch in fp32: an fp32 export of the same weights gives the same vectors (checked at "
              "start-up), faster. auto: ONNX Runtime where it can, else torch. An int8 or exported collection "
              "always embeds queries as its vectors were.")
@device_option
@storage_options
@output_options
def serve(collections, host, port, token, max_body, max_pixels, max_batch, batch_wait_ms, threads, query_backend,
          device, as_json, quiet):
    """Serve collections over HTTP: a JSON API and a search page.

    COLLECTIONS are served at / (the search page) and /docs (the API)."""
    from ..errors import IndexerError
    from ..index import parse_size
    from ..serve import serve as run

    if token is None and "INDEXER_TOKEN" in os.environ:  # click reads an empty variable as unset
        token = os.environ["INDEXER_TOKEN"]

    try:
        max_body = parse_size(max_body)
    except IndexerError:
        raise click.BadParameter(f"{max_body!r}: expected a size like 20MB", param_hint="--max-body") from None

    def ready(url: str) -> None:
        page = f"{url}?token=..." if token else url
        print_json({"url": url}) if as_json else click.echo(f"serving {counted(len(collections), 'collection')} on {url}")
        log.info("search page: %s  API docs: %sdocs", page, url)

    run(list(collections), host=host, port=port, token=token, max_body=max_body,
        max_pixels=max_pixels, max_batch=max_batch, batch_wait=batch_wait_ms / 1000, threads=threads,
        query_backend=query_backend, device=device,
        on_ready=ready)
