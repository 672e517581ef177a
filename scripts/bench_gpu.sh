#!/usr/bin/env bash
# GPU throughput of indexer ingest (MiniLM fp16 texts/s, ResNet-50 and EfficientNet-Lite0 images/s from JPEG
# files, the stage split, GPU utilisation): one JSON on stdout, logs on stderr. Uses the .venv that
# scripts/setup.sh made (or $PYTHON); fetches nothing. --smoke: small sizes on whatever device there is.
#   bash scripts/bench_gpu.sh [--smoke] [--texts N] [--images M] [--engine ray] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${PYTHON:-.venv/bin/python}" scripts/bench_gpu.py "$@"
