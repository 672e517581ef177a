"""The command line: CliRunner for the contract (exit codes, stdout JSON), real processes for the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import pytest
from click.testing import CliRunner

from indexer.cli import cli

from .conftest import WORDS, write_jsonl

INDEXER = [sys.executable, "-m", "indexer.cli"]


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def text_idx(tmp_path_factory, sample_corpus):
    coll = tmp_path_factory.mktemp("cli") / "t.idx"
    result = run("ingest", coll, sample_corpus["texts"], "-q", "--json")
    assert result.exit_code == 0, result.output
    return coll


@pytest.mark.parametrize("source", ["jsonl", "folder", "stdin"])
@pytest.mark.parametrize("fmt", ["json", "human"])
def test_ingest_sources_and_formats(tmp_path, source, fmt):
    texts = ["cats chase mice", "banks lend money", "rivers flow to the sea"]
    if source == "jsonl":
        args, stdin = [write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])], None
    elif source == "folder":
        (tmp_path / "docs").mkdir()
        for i, t in enumerate(texts):
            (tmp_path / "docs" / f"{i}.txt").write_text(t)
        args, stdin = [tmp_path / "docs"], None
    else:
        args, stdin = ["-"], "".join(json.dumps({"text": t}) + "\n" for t in texts)
    flags = ["--json"] if fmt == "json" else []
    result = run("ingest", tmp_path / "c.idx", *args, "--model", "minilm", "-q", *flags, input=stdin)
    assert result.exit_code == 0, result.output
    if fmt == "json":
        summary = json.loads(result.stdout)
        assert {"added", "updated", "skipped", "errors", "seconds", "items_per_s"} <= summary.keys()
        assert summary["added"] == 3
    else:
        assert "3 added" in result.stdout
    out = run("search", tmp_path / "c.idx", "money and loans", "-k", "1", "--json")
    assert json.loads(out.stdout)[0]["text"] == "banks lend money"


def test_search_outputs(text_idx, tmp_path):
    human = run("search", text_idx, "galaxies and telescopes", "-k", "2")
    assert human.exit_code == 0 and "astronomy" in human.stdout.splitlines()[0]
    js = json.loads(run("search", text_idx, "bread", "-k", "3", "--json", "--where", "label = 'cooking'").stdout)
    assert len(js) == 3 and all(h["label"] == "cooking" for h in js) and js[0]["score"] >= js[1]["score"]
    queries = tmp_path / "q.jsonl"
    write_jsonl(queries, [{"query": "interest rates"}, {"id": "sports-1"}, {"query": "enzymes in cells"}])
    lines = run("search", text_idx, "--queries", queries, "-k", "2").stdout.splitlines()
    parsed = [json.loads(line) for line in lines]
    assert [p.get("query") or p.get("id") for p in parsed] == ["interest rates", "sports-1", "enzymes in cells"]
    assert parsed[0]["results"][0]["label"] == "finance" and parsed[2]["results"][0]["label"] == "biology"


def test_info(text_idx):
    data = json.loads(run("info", text_idx, "--json").stdout)
    assert data["rows"] == 48 and data["model"]["name"] == "minilm" and data["dim"] == 384
    assert "label" in data["fields"]
    assert "rows         48" in run("info", text_idx).stdout


@pytest.mark.parametrize("args, code, message", [
    (["search", "{coll}", "--image", "{img}"], 1, "holds text embeddings"),
    (["search", "{missing}", "hello"], 1, "collection not found"),
    (["search", "{coll}"], 2, "exactly one of"),
    (["search", "{coll}", "x", "-k", "0"], 2, "-k"),
    (["ingest", "{coll}", "{missing}"], 1, "source not found"),
    (["ingest", "{new}", "{texts}", "--model", "nope"], 1, "unknown model"),
    (["ingest", "{new}", "{texts}", "--pooling", "avg"], 2, "--pooling"),
    (["ingest", "{new}", "{texts}", "--device", "cuda:3"], 1, "CUDA is not available"),
    (["ingest", "{new}", "{texts}", "--precision", "bf16"], 1, "needs a GPU"),
    (["search", "{coll}", "x", "--where", "nosuch = 1"], 1, "invalid --where"),
    (["info", "{texts}"], 2, "is a file"),
])
def test_user_errors_are_one_line(text_idx, sample_corpus, tmp_path, args, code, message):
    subs = {"coll": text_idx, "missing": tmp_path / "missing.idx", "new": tmp_path / "new.idx",
            "texts": sample_corpus["texts"], "img": sample_corpus["queries"] / "cat-edited.jpg"}
    result = run(*[a.format(**subs) for a in args])
    assert result.exit_code == code, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_strict_exit_code(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text('{"text": "good"}\n{"text": ""}\n')
    loose = run("ingest", tmp_path / "c.idx", src, "--model", "minilm", "-q", "--json")
    assert loose.exit_code == 0 and json.loads(loose.stdout)["errors"] == 1
    strict = run("ingest", tmp_path / "c.idx", src, "--strict", "-q", "--json")
    assert strict.exit_code == 1 and json.loads(strict.stdout)["errors"] == 1


def test_real_process_end_to_end(tmp_path, sample_corpus):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    coll = tmp_path / "img.idx"
    ing = subprocess.run([*INDEXER, "ingest", coll, sample_corpus["images"], "--json"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert ing.returncode == 0, ing.stderr
    assert json.loads(ing.stdout)["added"] == len(list(sample_corpus["images"].iterdir()))
    assert "ingest img.idx" in ing.stderr  # the progress bar goes to stderr, not stdout
    out = subprocess.run([*INDEXER, "search", coll, "--image", sample_corpus["queries"] / "cat-edited.jpg",
                          "-k", "1", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)[0]["id"] == "cat.jpg"
    bad = subprocess.run([*INDEXER, "search", coll, "a cat"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def _rows_committed(coll: Path) -> int:
    try:
        return lance.dataset(str(coll / "lance" / "items.lance")).count_rows()
    except (ValueError, OSError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_ingest_resumes_exactly(tmp_path, sig):
    import random

    rng = random.Random(0)
    # Two windows of 1024 texts, long enough that embedding the second takes seconds: the signal lands
    # while it runs, not after the writer has everything (short texts embed faster than a loaded
    # machine commits them).
    n = 2000
    src = write_jsonl(tmp_path / "big.jsonl",
                      [{"id": f"doc{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(30, 60)))} for i in range(n)])
    coll = tmp_path / "k.idx"
    cmd = [*INDEXER, "ingest", coll, src, "--model", "minilm", "--batch-size", "16", "-q"]
    # A background job of a non-interactive shell (how CI scripts often run) inherits SIGINT ignored, and
    # an ignored signal stays ignored across exec; a handled one is reset to the default. Ctrl-C is what
    # this test is about, so SIGINT is handled here while the child starts.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 240
    while _rows_committed(coll) < 300 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "ingest finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    stopped_with = _rows_committed(coll)
    assert 0 < stopped_with < n
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "resume" in err and "Traceback" not in err
    resumed = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["skipped"] >= stopped_with and summary["added"] + summary["skipped"] == n
    ids = lance.dataset(str(coll / "lance" / "items.lance")).to_table(columns=["id"])["id"].to_pylist()
    assert len(ids) == n and set(ids) == {f"doc{i}" for i in range(n)}


def test_help_lists_whole_one_line_summaries_and_every_option_says_what_it_does():
    import click

    result = run("--help")
    assert result.exit_code == 0
    commands = result.stdout.split("Commands:\n", 1)[1].splitlines()
    assert not any("..." in line for line in commands)
    # One line per command: a wrapped or cut summary would add lines that do not start with a command name.
    assert [line.split()[0] for line in commands if line.strip()] == sorted(cli.commands)
    assert all(line.rstrip().endswith(".") for line in commands if line.strip())
    missing = [(name, p.opts[0]) for name, cmd in cli.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert missing == []
    for command in ("ingest", "layers", "finetune"):
        model = next(p.help for p in cli.commands[command].params if p.name == "model")
        assert "minilm" in model and "MODEL_DIR written by `indexer finetune`" in model, (command, model)
    ingest_model = next(p.help for p in cli.commands["ingest"].params if p.name == "model")
    assert "none" in ingest_model
    for command in ("ingest", "search", "knn", "probe", "layers", "finetune", "serve"):
        device = next(p.help for p in cli.commands[command].params if p.name == "device")
        assert "cuda:N" in device and "cpu" in device, command


def test_counts_agree_with_their_nouns(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"text": "good"}, {"text": ""}])
    result = run("ingest", tmp_path / "c.idx", src, "--model", "minilm")
    assert result.exit_code == 0, result.output
    assert "1 input skipped" in result.stderr and "1 inputs" not in result.stderr
    assert "1 error in" in result.stdout and "; 1 row" in result.stdout and "1 rows" not in result.stdout
    strict = run("ingest", tmp_path / "c.idx", src, "--strict", "-q")
    assert strict.exit_code == 1 and "1 input was skipped" in strict.stderr
    from indexer.wording import counted

    assert (counted(0, "row"), counted(1, "row"), counted(2, "class", "classes")) == ("0 rows", "1 row", "2 classes")


def test_an_ingest_where_every_input_failed_exits_1_with_the_reasons(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}, {"body": "no text field"}, {"text": "   "}])
    for flags in ([], ["--json", "-q"]):
        result = run("ingest", tmp_path / "c.idx", src, "--model", "minilm", *flags)
        assert result.exit_code == 1, result.output
        assert "every input failed (3 inputs), nothing was stored" in result.stderr
        assert "missing text field" in result.stderr and "bad.jsonl:1" in result.stderr  # the first reasons
        assert "Traceback" not in result.output
    assert json.loads(result.stdout)["errors"] == 3  # --json still prints the summary
    # Unchanged inputs are not failures: a re-run over the same good input exits 0.
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    assert run("ingest", tmp_path / "g.idx", good, "--model", "minilm", "-q").exit_code == 0
    assert run("ingest", tmp_path / "g.idx", good, "-q").exit_code == 0


def test_an_empty_collection_gives_one_answer_everywhere(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}])
    coll = tmp_path / "e.idx"
    assert run("ingest", coll, tmp_path / "bad.jsonl", "--model", "minilm", "-q").exit_code == 1
    for args in (["search", coll, "hello"], ["search", coll, "hello", "--mode", "text"],
                 ["search", coll, "hello", "--mode", "hybrid"], ["search", coll, "hello", "--engine", "exact"],
                 ["search", coll, "--id", "x"], ["knn", coll, "--eval"], ["index", coll], ["dedup", coll]):
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.strip() == f"Error: {coll} is empty: ingest something first", (args, result.stderr)


def test_a_bad_where_lists_only_stored_fields(text_idx):
    result = run("search", text_idx, "x", "--where", "colour = 'red'")
    assert result.exit_code == 1 and "No field named colour" in result.stderr
    assert "label" in result.stderr and "_row" not in result.stderr and "record_hash" not in result.stderr
    syntax = run("search", text_idx, "x", "--where", "label = = 'x'")
    assert "SQL syntax error" in syntax.stderr and "SELECT" not in syntax.stderr
