"""The dedup command: exact and near duplicates, groups, keep policy, --against, --apply, --restore."""

from __future__ import annotations

import click

from ..errors import IndexerError
from ..wording import counted
from .base import cli, output_options, print_json, storage_options


@cli.command()
@click.argument("collection", type=click.Path(file_okay=False))
@click.option("--threshold", type=float, help="Cosine similarity at or above which two items are duplicates "
              "(default per modality: see README).")
@click.option("--method", type=click.Choice(["auto", "exact", "knn", "semdedup"]), default="auto", show_default=True,
              help="auto: exact up to 50k items, knn (k-means lists joined, spread tuned to a measured pair "
              "recall) up to 5M, semdedup (one list each) past that.")
@click.option("--keep", type=click.Choice(["first", "oldest", "longest", "largest", "central"]), default="first",
              show_default=True, help="Which item of a group stays: smallest id, stored earliest, longest text, "
              "most pixels/bytes, or the group's medoid.")
@click.option("--signal", type=click.Choice(["embedding", "combined"]), default="embedding", show_default=True,
              help="combined (images): mean of the cosine and a perceptual-hash similarity.")
@click.option("--against", type=click.Path(file_okay=False), help="Report the items of COLLECTION that duplicate "
              "something in this collection (train/test leakage).")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the result: .json, .csv (one row per "
              "pair) or .html (sampled pairs around the threshold and a similarity histogram).")
@click.option("--apply", is_flag=True, help="Delete the items to drop (one new Lance version; restorable).")
@click.option("--restore", "restore_version", type=int, help="Undo an --apply: the rows of this Lance "
              "version (the version_before it reported) missing now come back as a new version; rows written "
              "since stay.")
@click.option("--calibrate", is_flag=True, help="Transform a sample of the collection's own items and print "
              "the estimated precision/recall per threshold (needs the collection's model).")
@click.option("--sample", "sample_size", type=click.IntRange(min=4), default=200, show_default=True,
              help="Items --calibrate transforms.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: the list joins run on a Ray cluster (same pairs and groups as local).")
@click.option("--address", help="--engine ray: the cluster (auto, HOST:PORT, ray://HOST:PORT; default: "
                                "RAY_ADDRESS, else a local one).")
@storage_options
@output_options
def dedup(collection, threshold, method, keep, signal, against, out, apply, restore_version, calibrate, sample_size,
          engine, address, as_json, quiet):
    """Find exact and near duplicates; delete them with --apply.

    Nothing in COLLECTION is deleted without --apply (and --restore undoes it)."""
    if restore_version is not None:
        from ..tasks.dedup import restore

        data = restore(collection, restore_version)
        print_json(data) if as_json else click.echo(
            f"{counted(data['rows_restored'], 'row')} of version {data['restored']} brought back as version "
            f"{data['version_after']}: {counted(data['rows'], 'row')}")
        return
    if calibrate:
        if apply or against:
            raise IndexerError("--calibrate only measures: run it without --apply and --against")
        from ..tasks.dedup import calibrate as run_calibrate

        result = run_calibrate(collection, sample=sample_size)
        print_json(result.to_dict()) if as_json else click.echo(result.table())
        return
    from ..tasks.dedup import dedup as run_dedup

    report = run_dedup(collection, threshold=threshold, method=method, keep=keep, signal=signal, against=against,
                       apply=apply, out=out, engine=engine, address=address)
    if as_json:
        print_json(report.to_dict())
        return
    click.echo(report.line())
    for d in report.dropped[:20]:
        click.echo(f"  drop {d['id']}  (keep {d['kept']}, cosine {d['score']:.4f})")
    if len(report.dropped) > 20:
        click.echo(f"  ... {len(report.dropped) - 20} more (--json or --out for all)")
