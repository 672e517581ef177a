"""Every command the README shows runs: its ```bash blocks are extracted and run, in README order, in
one temporary directory, against the bundled sample corpus (the tour opens with `indexer sample sample`).

Convention: a ```bash block whose first line starts with `# needs` (your own data, a running server,
network, a number from your own run) is illustrative and skipped; every other block must run as
written, so an example cannot drift from the code. Blocks that train or transform (finetune, layers,
dedup --calibrate) carry the `slow` marker.

How a line runs: `indexer ARGS`, optionally fed by `cat FILE |`, goes through this checkout's CLI
in-process (click's runner on `indexer.cli.cli`, the entry point the console script calls; one process
saves a torch import per command); any other line runs in bash in the same directory, with an `indexer`
on its PATH that runs `python -m indexer.cli` from this checkout. Every command must exit 0, and
`--json` output must parse.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from indexer.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SLOW = ("indexer finetune", "indexer layers", "--calibrate", "--engine ray", "--backend")
# Cheap checks of what a command printed, by a piece of its text.
EXPECT = {
    'search notes.idx "how do plants make energy"': lambda out: "[biology]" in out.splitlines()[0],
    "search photos.idx --image sample/queries/cat-edited.jpg": lambda out: json.loads(out)[0]["id"] == "cat.jpg",
    "knn notes.idx --predict sample/queries/notes.jsonl --json":
        lambda out: [p["label"] for p in json.loads(out)] == ["biology", "computing", "astronomy"],
    "indexer info topics.idx": lambda out: "finetuned    from minilm" in out,
}


@dataclass
class Block:
    line: int  # where the block starts in README.md (1-based)
    commands: list[str]

    @property
    def slow(self) -> bool:
        return any(s in c for c in self.commands for s in SLOW)


def readme_blocks() -> list[Block]:
    """The tested ```bash blocks: commands with their continuation lines joined, comment lines dropped."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        body = match.group(1)
        if body.lstrip().startswith("# needs"):
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        commands = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        blocks.append(Block(text[: match.start()].count("\n") + 1, commands))
    return blocks


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One directory for the whole README, and which blocks have run in it (a block may use what an
    earlier one made, so running one block alone runs the ones before it first)."""
    d = tmp_path_factory.mktemp("readme")
    shim = d / ".bin"
    shim.mkdir()
    (shim / "indexer").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m indexer.cli "$@"\n')
    (shim / "indexer").chmod(0o755)
    return {"dir": d, "done": set()}


def run_command(command: str, cwd: Path) -> str:
    tokens = shlex.split(command, comments=True)
    stdin = None
    if tokens[:1] == ["cat"] and "|" in tokens:
        pipe = tokens.index("|")
        stdin = "".join((cwd / f).read_text() for f in tokens[1:pipe])
        tokens = tokens[pipe + 1 :]
    if tokens[:1] == ["indexer"] and "|" not in tokens and not any(t in tokens for t in (">", "&&", ";")):
        old = os.getcwd()
        os.chdir(cwd)
        try:
            result = CliRunner().invoke(cli, tokens[1:], input=stdin)
        finally:
            os.chdir(old)
        assert result.exit_code == 0, f"README: `{command}` exited {result.exit_code}:\n{result.output}"
        out = result.stdout
    else:
        env = {**os.environ, "PATH": f"{cwd / '.bin'}{os.pathsep}{os.environ['PATH']}",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
                              text=True)
        assert proc.returncode == 0, f"README: `{command}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        out = proc.stdout
    if "--json" in tokens:
        json.loads(out)
    for piece, check in EXPECT.items():
        if piece in command:
            assert check(out), f"README: `{command}` printed something unexpected:\n{out}"
    return out


def run_through(state: dict, index: int) -> None:
    for i in range(index + 1):
        if i not in state["done"]:
            state["done"].add(i)  # a failing block is not retried by the blocks after it
            for command in BLOCKS[i].commands:
                run_command(command, state["dir"])


def test_the_readme_has_tested_blocks_starting_with_the_sample_corpus():
    assert len(BLOCKS) >= 5
    assert BLOCKS[0].commands[0] == "indexer sample sample"
    assert all(c.split()[0] in ("indexer", "cat") for b in BLOCKS for c in b.commands)


@pytest.mark.parametrize("index", [
    pytest.param(i, id=f"README.md:{b.line}", marks=[pytest.mark.slow] if b.slow else [])
    for i, b in enumerate(BLOCKS)])
def test_readme_block_runs(workdir, index):
    run_through(workdir, index)
