"""`indexer finetune`: unfreeze the top blocks of a backbone, train them on labelled data, write a model."""

from __future__ import annotations

import click

from .base import MODEL_HELP, cli, device_option, output_options, print_json


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--label-field", required=True, help="Table field with the class label (`folder`: an image's "
              "parent folder).")
@click.option("--model", help=f"Base model: {MODEL_HELP}. Default: picked from the sources.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state-dict file for an image CNN.")
@click.option("--unfreeze", type=click.IntRange(min=0), required=True,
              help="Blocks to train, counted from the top (transformer layers, CNN stages); 0: the head alone.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="MODEL_DIR to write (then: indexer ingest COLL SOURCE --model MODEL_DIR).")
@click.option("--pooling", type=click.Choice(["cls", "pooler", "mean", "max"]),
              help="Text token pooling, for a transformers model that configures none.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="At most this many.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Head learning rate (AdamW); the backbone trains at a tenth of it.")
@click.option("--backbone-lr", type=click.FloatRange(min=0, min_open=True), help="Override the backbone's rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Training examples per optimiser step.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of each class held out of training and early stopping, for the before/after table "
              "(none when a class has fewer than 3 examples: the table then uses the validation split).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of each class, after the test rows, that drives early stopping.")
@click.option("--patience", type=click.IntRange(min=1), default=3, show_default=True,
              help="Stop after this many epochs without a better validation accuracy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits and the training.")
@click.option("--text-field", default="text", show_default=True, help="Table field with the text.")
@click.option("--image-field", default="image", show_default=True, help="Table field with an image path or bytes.")
@click.option("--id-field", help="Table field with the item id.")
@click.option("--workers", type=click.IntRange(min=0), help="Image decoding processes (default: up to 4).")
@device_option(note=" Mixed precision on GPU, fp32 on CPU.")
@output_options
def finetune(sources, as_json, quiet, **options):
    """Fine-tune a model's top blocks on labelled data.

    Trains the top --unfreeze blocks on the labelled SOURCES and writes --out as a model."""
    from ..tasks.finetune import finetune as run_finetune

    report = run_finetune(list(sources), progress=not quiet, **options)
    print_json(report.to_dict()) if as_json else click.echo(report.summary())
