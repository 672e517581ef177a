"""What a new user meets first: the README's first commands, the scripts they run, the install lines and
the distribution name they use."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.version import DISTRIBUTION, __version__

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _called_scripts(script: Path) -> list[Path]:
    """The script and every `bash scripts/X.sh` it runs, recursively."""
    out = [script]
    for name in re.findall(r"bash (scripts/[\w-]+\.sh)", script.read_text(encoding="utf-8")):
        out += _called_scripts(ROOT / name)
    return out


def test_the_first_block_has_two_commands_and_says_where_indexer_lands():
    first, after = README.split("```bash\n", 1)[1].split("```\n", 1)
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.split("#")[0].strip()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    nearby = after.split("\n\n", 1)[0]  # the paragraph right below the block
    assert ".venv/bin" in nearby and "PATH" in nearby
    assert "source .venv/bin/activate" in nearby


def test_the_demo_installs_no_browser_and_the_tests_do():
    demo = "".join(p.read_text(encoding="utf-8") for p in _called_scripts(ROOT / "scripts/demo.sh"))
    assert "scripts/setup.sh" in demo  # the demo does set up .venv
    for word in ("chromium", "apt-get", "playwright install"):
        assert word not in demo, word
    tests = "".join(p.read_text(encoding="utf-8") for p in _called_scripts(ROOT / "scripts/test.sh"))
    assert "apt-get install" in tests and "chromium" in tests  # the browser test still runs in CI
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8")
    assert "scripts/test.sh" in ci


def test_the_distribution_name_is_ours_and_the_command_stays_indexer():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["name"] == DISTRIBUTION != "indexer"
    assert project["project"]["scripts"] == {"indexer": "indexer.cli:main"}
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "indexer.version.__version__"}
    # Extras that name the project itself must use the new name, or pip would fetch the other `indexer`.
    for deps in project["project"]["optional-dependencies"].values():
        for dep in deps:
            assert not re.match(r"indexer\b(?!-)", dep), dep


def test_install_lines_use_the_distribution_name():
    lines = [line for line in README.splitlines() if re.search(r"\bpip install\b", line)]
    assert lines
    for line in lines:
        target = line.split("pip install", 1)[1].split("#")[0]
        assert "'indexer[" not in target and not re.search(r"(^|\s)indexer(\s|$)", target), line
    assert any(f"'{DISTRIBUTION}[serve] @ git+" in line for line in lines)
    assert any("pip install -e '.[serve]'" in line for line in lines)
    from indexer.errors import IndexerError, attempt_import

    with pytest.raises(IndexerError, match=re.escape(f"pip install '{DISTRIBUTION}[serve]'")):
        attempt_import("no_such_module_here", "serve")


def test_pip_resolves_the_checkout_under_the_new_name():
    """What `pip install -e '.[serve]'` and `pip install 'indexer-lancedb[serve] @ <url>'` resolve to,
    without installing (offline: no build isolation, no index)."""
    pytest.importorskip("setuptools")

    def resolve(requirement: str) -> list:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                            "--no-build-isolation", "--quiet", "--report", "-", requirement],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        return [(i["metadata"]["name"], i["metadata"]["version"], i.get("requested_extras")) for i in report["install"]]

    assert resolve(".[serve]") == [(DISTRIBUTION, __version__, ["serve"])]
    # A direct reference must name the distribution the source builds, or pip refuses it.
    assert resolve(f"{DISTRIBUTION}[serve] @ {ROOT.as_uri()}") == [(DISTRIBUTION, __version__, ["serve"])]


def test_versions_come_from_one_place():
    from click.testing import CliRunner

    import indexer
    from indexer.cli import cli
    from indexer.store.manifest import package_versions

    assert indexer.__version__ == __version__
    assert package_versions()[DISTRIBUTION] == __version__  # recorded whatever is installed under the name
    out = CliRunner().invoke(cli, ["--version"])
    assert out.exit_code == 0 and out.stdout.strip() == f"indexer, version {__version__}"
