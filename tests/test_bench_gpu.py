"""scripts/bench_gpu.sh keeps working where CI runs it: --smoke on the CPU prints one JSON of the shape a
GPU run reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.timing import STAGES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_smoke_prints_one_json(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # the CPU, even on a GPU machine
    done = subprocess.run(["bash", "scripts/bench_gpu.sh", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # the whole of stdout is the one JSON
    assert report == json.loads(out.read_text())
    assert report["smoke"] is True and report["device"] == "cpu" and report["targets"] is None
    assert (report["texts"], report["images"]) == (16, 8)
    for name, key in [("minilm", "minilm_texts_per_s"), ("resnet50", "resnet50_images_per_s"),
                      ("efficientnet_lite0", "efficientnet_lite0_images_per_s")]:
        run = report["runs"][name]
        assert run["items"] == (16 if name == "minilm" else 8) and run["errors"] == 0
        assert report[key] == run["items_per_s"] == pytest.approx(run["items"] / run["seconds"], rel=0.02, abs=0.01)
        assert set(run["stages"]) == set(STAGES) and run["bottleneck"] in STAGES
        assert all(run["stages"][s]["seconds"] > 0 for s in ("read", "embed", "write"))
        assert run["gpu_utilization"] is None  # no GPU to sample
    assert "random init" in report["runs"]["resnet50"]["weights"]
