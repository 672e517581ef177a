"""ONNX Runtime: the features graph exported with torch.onnx (dynamo exporter), int8 by ONNX
Runtime's own dynamic quantiser (weights int8, activations quantised per batch)."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

import torch

from ...errors import IndexerError
from ...spec import ModelSpec
from .cache import cached, export_dir

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise IndexerError("--backend onnx needs ONNX Runtime: pip install 'indexer-lancedb[onnx]'") from exc
    return onnxruntime


def export_onnx(module: torch.nn.Module, example: dict[str, torch.Tensor], dynamic: dict[str, tuple[int, ...]],
                path: Path) -> None:
    """Export `module(**example)` -> features. The dynamo exporter: the TorchScript one traces
    transformers' attention masks wrongly (0.3 off on MiniLM with torch 2.14)."""
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError as exc:
        raise IndexerError("exporting to ONNX needs onnxscript: pip install 'indexer-lancedb[onnx]'") from exc
    names = list(example)
    dims = {name: {axis: torch.export.Dim(f"{name}_{axis}") for axis in dynamic.get(name, ())} for name in names}
    # Two named dims per input would be unrelated; inputs of one batch share theirs.
    shared: dict[int, torch.export.Dim] = {}
    dims = {name: {axis: shared.setdefault(axis, d) for axis, d in axes.items()} for name, axes in dims.items()}
    # The exporter prints its progress on stdout, which carries our JSON results.
    with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(sys.stderr), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(example.values()), str(path), input_names=names,
                          output_names=["features"], dynamic_shapes=dims, dynamo=True, verbose=False,
                          external_data=False)


def _quantize(source: Path, path: Path) -> None:
    """Per-channel weights: per-tensor ones lose a lot more (mean cosine to fp32 0.965 vs 0.994 on MiniLM)."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, path, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        # The quantiser logs through the root logger, whose first use installs a handler on it
        # (logging.basicConfig): every later log line would be printed twice.
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)


class OnnxFeatures:
    """A session over an exported features graph: named torch inputs -> a (n, d) torch tensor."""

    def __init__(self, path: Path):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        # As many threads as torch uses here (it respects the process's CPU affinity and OMP settings).
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: they would take CPU from our own tokeniser and writer threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: inputs[name].cpu().numpy() for name in self.input_names}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def onnx_features(module: torch.nn.Module, example: dict[str, torch.Tensor], dynamic: dict[str, tuple[int, ...]],
                  spec: ModelSpec, precision: str) -> OnnxFeatures:
    _onnxruntime()  # before exporting for a minute only to fail
    fp32 = cached(export_dir(spec, "onnx", "fp32"), lambda d: export_onnx(module, example, dynamic, d / MODEL_FILE))
    if precision == "fp32":
        return OnnxFeatures(fp32 / MODEL_FILE)
    if precision == "int8":
        int8 = cached(export_dir(spec, "onnx", "int8"), lambda d: _quantize(fp32 / MODEL_FILE, d / MODEL_FILE))
        return OnnxFeatures(int8 / MODEL_FILE)
    raise IndexerError(f"--backend onnx runs fp32 or int8, not {precision}")
