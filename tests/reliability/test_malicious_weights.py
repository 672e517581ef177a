"""Model loading never unpickles untrusted data: weights files with a pickle that would run code (write
a marker file) are refused with a clear message, and the code never runs."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from indexer.cli import cli


class _Payload:
    """Unpickling this calls exec(), which writes the marker file: what an attacker's weights would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _evil(path, marker, fmt: str):
    state = {"conv1.weight": torch.zeros(1), "fc.bias": _Payload(marker)}
    if fmt == "zip":
        torch.save(state, path)  # torch's zip format, as a .pt/.pth checkpoint
    else:
        with open(path, "wb") as fh:
            pickle.dump(state, fh)  # a legacy plain pickle
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(d / "a.png")
    return d


def test_the_payload_is_live(tmp_path):
    """Guard: loading the file without weights_only does write the marker (so the tests below mean something)."""
    marker = tmp_path / "marker"
    with open(_evil(tmp_path / "w.pkl", marker, "pickle"), "rb") as fh:
        pickle.load(fh)  # noqa: S301 - on purpose
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("fmt", ["zip", "pickle"])
@pytest.mark.parametrize("model", ["torchvision:resnet18", "efficientnet-lite0"])
def test_malicious_weights_are_refused(tmp_path, images, model, fmt):
    marker = tmp_path / "marker"
    weights = _evil(tmp_path / f"evil.{'pt' if fmt == 'zip' else 'pkl'}", marker, fmt)
    result = run("ingest", tmp_path / "c.idx", images, "--model", model, "--weights", weights, "-q")
    assert result.exit_code == 1, result.output
    assert "refusing to load weights" in result.output and str(weights) in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not marker.exists()
    assert not (tmp_path / "c.idx" / "lance").exists()


def test_damaged_weights_are_refused(tmp_path, images, resnet18_weights):
    weights = tmp_path / "cut.pth"
    weights.write_bytes(resnet18_weights.read_bytes()[:100_000])
    result = run("ingest", tmp_path / "c.idx", images, "--model", "resnet18", "--weights", weights, "-q")
    assert result.exit_code == 1 and "damaged or not a PyTorch file" in result.output, result.output
    assert "Traceback" not in result.output


def test_safetensors_weights_load(tmp_path, images, resnet18_weights):
    from safetensors.torch import save_file

    st = tmp_path / "resnet18.safetensors"
    save_file(torch.load(resnet18_weights, weights_only=True), st)
    a = run("ingest", tmp_path / "a.idx", images, "--model", "resnet18", "--weights", resnet18_weights, "-q", "--json")
    b = run("ingest", tmp_path / "b.idx", images, "--model", "resnet18", "--weights", st, "-q", "--json")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    va = run("search", tmp_path / "a.idx", "--id", "a.png", "-k", "1", "--json")
    vb = run("search", tmp_path / "b.idx", "--id", "a.png", "-k", "1", "--json")
    assert va.stdout == vb.stdout


def test_malicious_transformers_directory_is_refused(tmp_path, tiny_bert_dir):
    """A hf: model directory whose pytorch_model.bin is a code-running pickle (transformers loads it weights-only)."""
    d = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    _evil(d / "pytorch_model.bin", marker, "zip")
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": "a cat sat"}\n')
    result = run("ingest", tmp_path / "c.idx", texts, "--model", f"hf:{d}", "-q")
    assert result.exit_code == 1, result.output
    assert "refusing to load" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_malicious_finetune_checkpoint_is_refused(tmp_path, sample_corpus):
    """A MODEL_DIR's resume checkpoint comes from disk too: loaded weights-only."""
    out = tmp_path / "ft"
    (out / "checkpoint").mkdir(parents=True)
    marker = tmp_path / "marker"
    _evil(out / "checkpoint" / "state.pt", marker, "zip")
    result = run("finetune", sample_corpus["texts"], "--label-field", "label", "--model", "minilm", "--unfreeze", 1,
                 "--epochs", 1, "--device", "cpu", "--out", out, "-q")
    assert result.exit_code == 1, result.output
    assert "refusing to load" in result.output and "state.pt" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()
