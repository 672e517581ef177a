"""Commands that build and read a collection: ingest, search, index, info, models, sample."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import IndexerError
from ..wording import counted
from .base import (
    MODEL_HELP,
    cli,
    device_option,
    log,
    output_options,
    parse_layer,
    print_json,
    storage_options,
)


@cli.command()
@click.argument("collection", type=click.Path(file_okay=False))
@click.argument("sources", nargs=-1, required=True)
@click.option("--model", help=f"{MODEL_HELP}; or none (precomputed --vector-field vectors of an unnamed model). "
              "Default: the collection's model, or one picked from the sources.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state-dict file for an image CNN.")
@click.option("--layer", help="Text: hidden-state number (-1 = last). CNN: module name (e.g. layer3). "
              "clip: projection (default) or a hidden-state number of the items' tower.")
@click.option("--pooling", type=click.Choice(["cls", "pooler", "mean", "max"]), help="Text token pooling.")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="L2-normalise vectors.")
@click.option("--text-field", default="text", show_default=True, help="Table field with the text.")
@click.option("--image-field", default="image", show_default=True, help="Table field with an image path or bytes.")
@click.option("--id-field", help="Table field with the item id (default: `id` if present).")
@click.option("--label-field", help="Table field with the label (default: `label` if present).")
@click.option("--vector-field", help="Table field with precomputed embeddings: stored as they are, no model "
              "run (.npy sources need no field). Name the model that made them with --model, or --model none.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Items per forward pass (default: the model's).")
@click.option("--workers", type=click.IntRange(min=0), help="local: image decoding processes (default: up to 4; "
              "on CUDA every core but one, up to 32). "
              "ray: embedding actors (default: one per GPU, else one per --cpus-per-worker CPUs).")
@device_option
@click.option("--precision", type=click.Choice(["default", "auto", "fp32", "fp16", "bf16", "int8"]),
              default="default", show_default=True, help="default: fp16 autocast on CUDA, fp32 on CPU (or the "
              "collection's int8). auto: measure the backends and precisions of this machine on a sample of the "
              "inputs and take the fastest keeping overlap@10 >= 0.95 with fp32 (cached). int8 (CPU): text models "
              "quantised dynamically; CNNs statically with --backend onnx or openvino, calibrated on the first 64 "
              "images.")
@click.option("--backend", type=click.Choice(["torch", "onnx", "openvino"]),
              help="torch, onnx or openvino: models exported once to ONNX Runtime or OpenVINO (CPU; pip "
                   "install 'indexer-lancedb[onnx]' or '[openvino]'). Default: the collection's, else torch.")
@click.option("--chunk-tokens", type=click.IntRange(min=0), help="Split texts into passages of at most N model "
              "tokens (breaks at paragraph, then sentence ends); stored as DOCID#N rows. Remembered by the "
              "collection; 0 turns it off.")
@click.option("--chunk-overlap", type=click.IntRange(min=0), help="Tokens shared by consecutive passages.")
@click.option("--strict", is_flag=True, help="Exit 1 if any input was skipped.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: read, embed and write on a Ray cluster (pip install -e '.[ray]').")
@click.option("--address", help="ray: the cluster, auto, HOST:PORT or ray://HOST:PORT (default: start a local one).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), help="ray: GPUs per embedding actor "
              "(default: 1 when the cluster has GPUs).")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True),
              help="ray: CPUs per embedding actor (default: 1).")
@storage_options
@output_options
def ingest(collection, sources, layer, as_json, quiet, **options):
    """Embed files, folders or tables into a collection.

    SOURCES: folders, files, @FILE-LIST, JSONL/CSV/Parquet, or - for JSONL on stdin. Documents: .txt, .md,
    .html (visible text) and .pdf (text per page). --engine ray runs the same on a Ray cluster."""
    from ..ingest import IngestInterrupted, StrictError
    from ..ingest import ingest as run_ingest

    try:
        summary = run_ingest(collection, list(sources), layer=parse_layer(layer), progress=not quiet, **options)
        code = 1 if summary.all_failed else 0  # the library has said why, loudly
    except (StrictError, IngestInterrupted) as exc:
        summary, code = exc.summary, exc.exit_code
        log.error("%s", exc)
    print_json(summary.to_dict()) if as_json else click.echo(summary.line())
    sys.exit(code)


@cli.command()
@click.argument("collection", type=click.Path(file_okay=False))
@click.argument("query", required=False)
@click.option("--image", type=click.Path(dir_okay=False), help="Search by an image file.")
@click.option("--id", "item_id", help="Search by a stored item (the item itself is left out).")
@click.option("--queries", type=click.File("r"), help="JSONL of queries (- for stdin); JSONL results out.")
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Results per query.")
@click.option("--where", help="SQL filter on stored fields, applied before ranking, e.g. \"label = 'cat'\".")
@click.option("--engine", type=click.Choice(["auto", "exact", "faiss", "lance"]), default="auto",
              show_default=True, help="auto: the FAISS index when there is one, else exact.")
@click.option("--nprobe", type=click.IntRange(min=1), help="Override the tuned IVF nprobe (nprobes for lance).")
@click.option("--ef", type=click.IntRange(min=1), help="Override the tuned HNSW efSearch.")
@click.option("--mode", type=click.Choice(["vector", "text", "hybrid"]), default="vector", show_default=True,
              help="vector: embedding similarity; text: BM25 full-text; hybrid: both, fused by reciprocal rank.")
@click.option("--group-by-doc", is_flag=True, help="One result per document: its best passage (+ other_chunks).")
@click.option("--fields", help="Stored fields per hit, e.g. id,label (default: id, text or path, label and a "
              "passage's place; all: every field). Only these are read.")
@device_option
@storage_options
@output_options
def search(collection, query, image, item_id, queries, k, where, engine, nprobe, ef, mode, group_by_doc, fields,
           device, as_json, quiet):
    """Nearest items to a text, image, stored item or vector.

    Searches COLLECTION for QUERY (text), --image, --id, or each line of --queries."""
    from ..tasks.search import Query, search_batch
    from ..tasks.search import search as run_search

    Query.pick({"QUERY": query, "--image": image, "--id": item_id, "--queries": queries}, click.UsageError)
    if queries is not None:
        qs = []
        try:
            for n, line in enumerate(queries, start=1):
                if line.strip():
                    try:
                        qs.append(Query.from_json(json.loads(line), where=f"--queries line {n}"))
                    except json.JSONDecodeError as exc:
                        raise IndexerError(f"--queries line {n}: invalid JSON ({exc.msg})") from None
        except UnicodeDecodeError as exc:
            raise IndexerError(f"--queries {queries.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        for q, hits in zip(qs, search_batch(collection, qs, k=k, where=where, engine=engine, device=device,
                                            nprobe=nprobe, ef=ef, mode=mode, group_by_doc=group_by_doc,
                                            fields=fields)):
            print_json({**q.echo(), "results": hits})
        return
    hits = run_search(collection, query, image=image, id=item_id, k=k, where=where, engine=engine, device=device,
                      nprobe=nprobe, ef=ef, mode=mode, group_by_doc=group_by_doc, fields=fields)
    if as_json:
        print_json(hits)
        return
    if not hits:
        click.echo("no results")
    for rank, hit in enumerate(hits, start=1):
        what = hit.get("text") or hit.get("path") or ""
        what = " ".join(str(what).split())
        label = f" [{hit['label']}]" if hit.get("label") else ""
        where_in = "".join(f" {key} {hit[key]}" for key in ("page", "heading") if hit.get(key) not in (None, ""))
        click.echo(f"{rank:>3}. {hit['score']:.4f}  {hit['id']}{label}{where_in}  {what[:100]}")


@cli.command()
@click.argument("collection", type=click.Path(file_okay=False))
@click.option("--kind", type=click.Choice(["auto", "flat", "hnsw", "ivf-flat", "ivf-pq", "opq-ivf-pq", "ivf-hnsw-sq"]),
              default="auto", show_default=True, help="auto picks from row count, dimension and memory budget.")
@click.option("--target-recall", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="recall@10 the tuned search knobs must reach on held-out queries.")
@click.option("--max-memory", help="Memory budget for the index, e.g. 4GB (default: 70% of available RAM).")
@click.option("--engine", type=click.Choice(["faiss", "lance", "ray"]), default="faiss", show_default=True,
              help="lance: LanceDB's own index (ivf-pq, ivf-hnsw-sq), tuned the same way; ray: the FAISS index "
                   "encoded in parallel shards on a Ray cluster and merged (flat and IVF kinds).")
@click.option("--address", help="--engine ray: the cluster (auto, HOST:PORT, ray://HOST:PORT; default: "
                                "RAY_ADDRESS, else a local one).")
@storage_options
@output_options
def index(collection, kind, target_recall, max_memory, engine, address, as_json, quiet):
    """Build and tune the collection's ANN index.

    The index over COLLECTION is tuned to reach --target-recall at the lowest cost."""
    from ..index import build_index

    data = build_index(collection, kind=kind, target_recall=target_recall, max_memory=max_memory, engine=engine,
                       address=address)
    if as_json:
        print_json(data)
        return
    click.echo(f"{data['engine']} {data['kind']} index over {counted(data['rows'], 'row')}: {_describe_index(data)}; "
               f"built in {data['build_seconds']:.1f}s")


@cli.command()
@click.argument("collection", type=click.Path(file_okay=False))
@storage_options
@output_options
def info(collection, as_json, quiet):
    """What COLLECTION holds: rows, model, fields, errors, size."""
    from .. import info as collection_info

    data = collection_info(collection)
    if as_json:
        print_json(data)
        return
    m = data["model"]
    lines = [
        f"collection   {data['path']}",
        f"rows         {data['rows']}",
        f"model        {m['name']} ({m['modality']}, dim {m['dim']}, layer {m['layer']}, pooling {m['pooling']}, "
        f"{'normalized' if m['normalize'] else 'not normalized'})",
        f"weights      sha256 {m['weights_sha256']}",
        *_describe_runtime(m, data.get("drift")),
        *_describe_finetuned((m.get("options") or {}).get("finetuned")),
        f"metric       {data['metric']}",
        f"fields       {', '.join(data['fields'])}",
        f"errors       {data['errors']} (errors.jsonl)",
        *([f"chosen by    --precision auto: {a['reason']}"] if (a := data.get("auto_precision")) else []),
        *([f"passages     at most {c['tokens']} tokens, {c['overlap']} overlap"] if (c := data.get("chunking")) else []),
        f"index        {_describe_index(data['index'])}",
        *([f"lance index  {_describe_index(data['lance_index'])}"] if data.get("lance_index") else []),
        f"lance        version {data['lance_version']}, {data['size_bytes'] / 1e6:.1f} MB on disk",
        f"updated      {data['updated']} (created {data['created']})",
    ]
    click.echo("\n".join(lines))


def _describe_runtime(model: dict, drift: dict | None) -> list[str]:
    """How the vectors were computed, when not torch fp32, and how far that is from fp32."""
    backend, precision = model.get("backend", "torch"), model.get("precision", "fp32")
    if backend == "torch" and precision != "int8":
        return []
    line = f"runtime      {backend} {precision}"
    if drift and (drift["backend"], drift["precision"]) == (backend, precision):
        low = " (below " + f"{drift['min_overlap']:.2f}: results differ from fp32's)" \
            if drift["overlap_at_10"] < drift["min_overlap"] else ""
        line += (f"; vs torch fp32 on {drift['sample']} items: mean cosine {drift['mean_cosine']:.4f}, "
                 f"neighbour overlap@10 {drift['overlap_at_10']:.3f}{low}")
    return [line]


@cli.command()
@click.argument("collection", type=click.Path(file_okay=False))
@click.option("--list", "list_versions", is_flag=True, help="List the table's versions, newest first, and whether "
              "each can be read.")
@click.option("--version", type=click.IntRange(min=1), help="Make version N's rows the newest version (a new "
              "commit; unreadable newer manifests are moved to COLLECTION/damaged/).")
@storage_options
@output_options
def restore(collection, list_versions, version, as_json, quiet):
    """List the table's versions, or restore one after damage.

    Recover COLLECTION after damage: list the Lance table's versions (--list) and whether each can be read,
    then restore one as a new version (--version N)."""
    from .. import restore as run_restore

    if list_versions == (version is not None):
        raise click.UsageError("give either --list or --version N")
    result = run_restore(collection, version)
    if as_json:
        print_json(result)
    elif version is None:
        for v in result:
            state = f"{v['rows']} rows" if v["readable"] else f"UNREADABLE ({v['error']})"
            click.echo(f"version {v['version']:>5}  {state}  {v['file']}")
    else:
        moved = f"; moved unreadable {', '.join(result['moved'])} aside" if result["moved"] else ""
        click.echo(f"restored version {result['restored']} as version {result['version']} "
                   f"({result['rows']} rows){moved}")


def _describe_finetuned(ft: dict | None) -> list[str]:
    """The provenance of a model written by `indexer finetune` (the full record is its indexer-model.json)."""
    if not ft:
        return []
    val = ft.get("evaluation") or ft.get("validation", {})  # (models fine-tuned before test splits: "validation")
    return [f"finetuned    from {ft['base']} (sha256 {ft['base_weights_sha256'][:12]}), top {ft['unfreeze']} of "
            f"{counted(ft['n_blocks'], 'block')} ({', '.join(ft['unfrozen_blocks']) or 'head only'}), "
            f"{counted(ft['epochs_run'], 'epoch')}",
            f"             on {', '.join(ft['sources'])} ({ft['label_field']}: {len(ft['labels'])} classes); "
            f"{val.get('split', 'validation')} k-NN {val.get('finetuned_knn_accuracy', 0):.3f} (base {val.get('base_knn_accuracy', 0):.3f}), "
            f"probe {val.get('finetuned_probe_accuracy', 0):.3f} (base {val.get('base_probe_accuracy', 0):.3f})"]


def _describe_index(ix: dict | None) -> str:
    if not ix:
        return "none (exact search)"
    knobs = ", ".join(f"{k}={v}" for k, v in ix["params"].items()) or "exact"
    state = {True: ", current", False: ", behind the store (caught up on next search)"}.get(ix.get("current"), "")
    return (f"{ix['engine']} {ix['kind']} ({knobs}), recall@10 {ix['recall_at_10']:.3f}, "
            f"{ix['qps_single']:.0f} q/s single{state}")


@cli.command()
@output_options
def models(as_json, quiet):
    """The model names --model accepts."""
    from ..models import list_models

    names = list_models()
    print_json(names) if as_json else click.echo("\n".join(names))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@output_options
def sample(directory, as_json, quiet):
    """Write a small real corpus to try the commands on.

    Labelled texts, photos and query images, into DIRECTORY."""
    from ..sample import write_sample_corpus

    paths = {k: str(v) for k, v in write_sample_corpus(Path(directory)).items()}
    print_json(paths) if as_json else click.echo("\n".join(f"{k:8} {v}" for k, v in paths.items()))
