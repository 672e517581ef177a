"""How a model executes: `torch` in this process, or an exported graph run by ONNX Runtime (`onnx`)
or OpenVINO (`openvino`).

A family (text, vision) builds one torch module that maps its model inputs to features, and hands it
to `compile_module` with an example batch: every family gets every runtime without branches of its own.
Exports and int8 models are cached by weights hash (cache.py), never downloaded. int8 is dynamic
(transformers: weights int8, activations quantised as they come, per token on onnx) unless the family
gives a `Calibration` (CNNs: activation ranges measured once on a sample of the user's inputs, static int8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...spec import ModelSpec
from ..device import BACKENDS, Backend, Runtime
from .cache import Calibration

__all__ = ["BACKENDS", "Backend", "Calibration", "Features", "compile_module"]

# Named model inputs (as a tokenizer returns them, or {"pixels": ...}) -> (n, d) features.
Features = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def compile_module(module: torch.nn.Module, example: dict[str, torch.Tensor], dynamic: dict[str, tuple[int, ...]],
                   spec: ModelSpec, runtime: Runtime, calibration: Calibration | None = None,
                   transformer: bool = False) -> Features:
    """`module(**inputs)` run by the runtime's backend. `example` is a batch to export with (its keys
    in `module.forward`'s order); `dynamic` names the axes of each input that vary (batch, sequence);
    `calibration` makes int8 static; `transformer` lets a backend run its fused transformer kernels."""
    if runtime.backend == "onnx":
        from .onnx import onnx_features

        return onnx_features(module, example, dynamic, spec, runtime.precision, calibration, transformer)
    if runtime.backend == "openvino":
        from .openvino import openvino_features

        return openvino_features(module, example, dynamic, spec, runtime.precision, calibration)
    return lambda inputs: module(**inputs)
