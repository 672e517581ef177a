"""OpenVINO: the ONNX export (onnx.py) converted by openvino.convert_model; int8 by NNCF: weight
compression for transformers (int8 per-channel weights, fp32 activations), post-training quantisation
on a calibration sample for CNNs (static int8, the first convolutions kept fp32 and 7-bit weights on
CPUs without VNNI, as in onnx.py; biases corrected by NNCF's full algorithm where the key says so)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ...errors import IndexerError
from ...spec import ModelSpec
from .cache import FLOAT_CONVS, Calibration, cached, calibrated_export_missing, export_dir
from .onnx import MODEL_FILE, plain_export

IR_FILE = "model.xml"  # + model.bin beside it


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise IndexerError("--backend openvino needs OpenVINO: pip install 'indexer-lancedb[openvino]'") from exc
    return openvino


def _convert(onnx_file: Path, path: Path, spec: ModelSpec, precision: str, calibration: Calibration | None) -> None:
    ov = _openvino()
    if precision == "int8" and calibration is not None and calibration.batches is None:
        raise calibrated_export_missing(spec, "openvino")
    model = ov.convert_model(onnx_file)
    if precision == "int8":
        # NNCF prints progress and a table (its console binds stdout on import); stdout carries our JSON.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                import nncf
            except ImportError as exc:
                raise IndexerError("--backend openvino --precision int8 needs NNCF: "
                                   "pip install 'indexer-lancedb[openvino]'") from exc
            if calibration is None:
                model = nncf.compress_weights(model)  # int8 asymmetric, per channel
            else:  # one item per input row: NNCF's statistics assume a batch of one
                rows = [{k: v[i : i + 1].numpy() for k, v in batch.items()} for batch in calibration.batches
                        for i in range(len(next(iter(batch.values()))))]
                convs = [op.get_friendly_name() for op in model.get_ordered_ops()
                         if op.get_type_name() in ("Convolution", "GroupConvolution")]
                model = nncf.quantize(model, nncf.Dataset(rows), subset_size=len(rows),
                                      fast_bias_correction=not calibration.full_bias_correction,  # see cache.py
                                      ignored_scope=nncf.IgnoredScope(names=convs[:FLOAT_CONVS]),
                                      advanced_parameters=_weight_bits(calibration.weight_bits))
    ov.save_model(model, path, compress_to_fp16=False)  # fp16 storage would change fp32's vectors


def _weight_bits(bits: int):
    """NNCF's overflow fix on every layer gives 7-bit weights (see cache.int8_weight_bits); its default
    touches the first quantised layer only."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    return AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE) if bits == 7 else None


class OpenVinoFeatures:
    """A compiled OpenVINO model over an exported features graph: named torch inputs -> (n, d) tensor."""

    def __init__(self, path: Path):
        ov = _openvino()
        # f32 inference: on CPUs with bf16 or fp16 units OpenVINO would otherwise pick those by itself.
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.path = path
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: inputs[name].cpu().numpy() for name in self.input_names}
        return torch.from_numpy(self.compiled(feeds)[0].copy())


def openvino_features(module: torch.nn.Module, example: dict[str, torch.Tensor], dynamic: dict[str, tuple[int, ...]],
                      spec: ModelSpec, precision: str, calibration: Calibration | None = None) -> OpenVinoFeatures:
    _openvino()  # before exporting for a minute only to fail
    if precision not in ("fp32", "int8"):
        raise IndexerError(f"--backend openvino runs fp32 or int8, not {precision}")
    onnx_dir = plain_export(module, example, dynamic, spec)
    ir = cached(export_dir(spec, "openvino", precision),
                lambda d: _convert(onnx_dir / MODEL_FILE, d / IR_FILE, spec, precision, calibration))
    return OpenVinoFeatures(ir / IR_FILE)
