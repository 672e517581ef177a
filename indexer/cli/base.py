"""The command group and the options every command shares."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from ..errors import IndexerError, storage_error
from ..version import __version__
from ..wording import one_line

log = logging.getLogger("indexer")


def _setup_logging(quiet: bool, verbose: int) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("indexer: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def print_json(data) -> None:
    click.echo(json.dumps(data, default=str, ensure_ascii=False))


def output_options(fn):
    """--json and -q/--quiet, shared by every command."""
    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bars or info logs on stderr.")
    @click.option("-v", "--verbose", count=True, help="More logging on stderr.")
    @functools.wraps(fn)
    def wrapper(*args, quiet: bool, verbose: int, **kwargs):
        _setup_logging(quiet, verbose)
        return fn(*args, quiet=quiet, **kwargs)
    return wrapper


# What --model accepts (`indexer models` lists the same); each command adds its own default.
MODEL_HELP = ("minilm, efficientnet-lite0, hf:<hub id or dir>, torchvision:<name> (or a bare name like resnet50), "
              "clip:<hub id or dir> or open_clip:<arch>/<pretrained> (text and images in one space), "
              "or a MODEL_DIR written by `indexer finetune`")


def device_option(fn=None, *, note: str = ""):
    """--device, the same on every command that runs a model."""
    option = click.option("--device", default="auto", show_default=True,
                          help="Where models run: auto (CUDA when available, else CPU), cpu, cuda or cuda:N." + note)
    return option if fn is None else option(fn)


def storage_options(fn):
    """--storage-option KEY=VALUE, for commands that open a collection that may be on object storage."""
    @click.option("--storage-option", "storage_pairs", multiple=True, metavar="KEY=VALUE",
                  help="Object-store setting for an s3:// (gs://, az://) collection, repeatable, e.g. "
                       "aws_region=eu-west-1, aws_endpoint=http://host:9000, allow_http=true; the standard "
                       "AWS_* environment variables and profiles apply too.")
    @functools.wraps(fn)
    def wrapper(*args, storage_pairs: tuple[str, ...], **kwargs):
        from ..store.location import parse_storage_options, set_default_storage_options

        set_default_storage_options(parse_storage_options(storage_pairs))
        return fn(*args, **kwargs)
    return wrapper


class _Group(click.Group):
    """Turns user errors (and writes the storage refuses: disk full, read-only) into one line on stderr
    (exit 1) and Ctrl-C into exit 130, never a traceback.
    `--help` lists each command with its whole one-line summary (click cuts long ones with "...")."""

    def format_commands(self, ctx, formatter):
        rows = [(name, cmd.get_short_help_str(limit=1000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except IndexerError as exc:
            raise click.ClickException(one_line(str(exc))) from None
        except (OSError, RuntimeError) as exc:
            error = storage_error(exc)
            if error is None:
                raise
            raise click.ClickException(one_line(str(error))) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="indexer")
def cli() -> None:
    """Embed text and images with frozen pretrained models into a LanceDB collection, and search it."""


def parse_layer(value: str | None) -> int | str | None:
    """--layer: a hidden-state number for text encoders, a module name for CNNs."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value
