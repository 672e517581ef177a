"""ONNX Runtime: the features graph exported with torch.onnx (dynamo exporter), a transformer's fp32
graph rewritten to ONNX Runtime's fused kernels. int8: for transformers dynamic, weights int8 and
activations quantised per token (per_token.py; per batch by ONNX Runtime's quantize_dynamic for the
collections made before), for CNNs static QDQ by ONNX Runtime's quantize_static (activation ranges
measured on a calibration sample)."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ...errors import IndexerError
from ...spec import ModelSpec
from ...wording import one_line
from .cache import FLOAT_CONVS, Calibration, cached, calibrated_export_missing, export_dir
from .per_token import PER_TENSOR, PER_TOKEN, PER_TOKEN_PLAIN, quantize_per_token

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# A transformer's fp32 export rewritten to ONNX Runtime's fused kernels (Attention, SkipLayerNormalization,
# BiasGelu) by onnxscript's rewriter. MiniLM on 2 AVX2 cores, 1,500 docstrings in batches of 8, model
# only: 55-59 texts/s vs 46-49 plain, the same vectors (cosine 1.0). Per-token int8 (per_token.py)
# quantises the fused graph (the plain one where the rewrite is not used: another recipe, recorded so);
# a collection made with per-tensor int8 keeps that model, the plain export's.
FUSED = "ort-fused"
UNFUSED_FILE = "unfused.txt"  # in place of the rewrite, when it is not used: why
NO_MATCH = "matched nothing in this graph"  # not a fault: a graph without a transformer's patterns


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


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """The quantisers log through the root logger, whose first use installs a handler on it
    (logging.basicConfig): every later log line would be printed twice."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        yield
    finally:
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)


def _fuse(source: Path, path: Path, example: dict[str, torch.Tensor], dynamic: dict[str, tuple[int, ...]]) -> None:
    """`source` with ONNX Runtime's fused transformer kernels in `path / MODEL_FILE`, kept only if it
    computes the same features on the example batch and on a longer, wider one (a rewrite is pattern
    matching: an unforeseen graph must not change vectors). Otherwise `path / UNFUSED_FILE` says why, and
    the plain export runs."""
    longer = {name: x.repeat(*[3 if axis == 0 else 4 if axis in dynamic.get(name, ()) else 1
                               for axis in range(x.dim())]) for name, x in example.items()}
    try:
        from onnxscript import ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        with contextlib.redirect_stdout(sys.stderr):
            model, counts = optimize_for_ort(ir.load(source))
        fused = path / MODEL_FILE
        ir.save(model, fused)
        worst = 0.0
        plain_session, fused_session = OnnxFeatures(source), OnnxFeatures(fused)
        for batch in (example, longer):
            want, got = plain_session(batch), fused_session(batch)
            if got.shape != want.shape:
                raise ValueError(f"features of shape {tuple(got.shape)} instead of {tuple(want.shape)}")
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    except Exception as exc:  # noqa: BLE001 - a speed-up that fails must not stop the export
        problem = f"failed: {one_line(str(exc))}"
    else:
        if not any(counts.values()):
            problem = NO_MATCH
        elif worst <= 1e-4:
            log.info("fused kernels: %s", {k: v for k, v in counts.items() if v})
            return
        else:
            problem = f"changed its features (by up to {worst:.2g} of their largest value)"
    (path / MODEL_FILE).unlink(missing_ok=True)
    (path / UNFUSED_FILE).write_text(problem + "\n")


def _unfused_reason(fused: Path) -> str | None:
    marker = fused / UNFUSED_FILE
    return marker.read_text().strip() if marker.exists() else None


def _quantize(source: Path, path: Path) -> None:
    """Per-channel weights: per-tensor ones lose a lot more (mean cosine to fp32 0.965 vs 0.994 on MiniLM)."""
    with _root_logging_kept():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, path, weight_type=QuantType.QInt8, per_channel=True)


def _quantize_per_token(source: Path, path: Path) -> None:
    with _root_logging_kept():
        count = quantize_per_token(source, path)
    log.info("int8 with per-token activation scales: %d matrix products", count)


def _quantize_static(source: Path, path: Path, calibration: Calibration) -> None:
    """QDQ int8 with per-channel weights and uint8 activations (the u8s8 kernels x86 runs fastest),
    activation ranges by min/max over the calibration batches, the first FLOAT_CONVS convolutions kept
    fp32, 7-bit weights where the calibration asks for them (reduce_range: see cache.int8_weight_bits).
    The graph is pre-processed first (shape inference, batch norms folded into convolutions) so whole
    convolutions are quantised."""
    with _root_logging_kept():
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Batches(CalibrationDataReader):
            def __init__(self):
                self.batches = iter(calibration.batches)

            def get_next(self) -> dict | None:
                batch = next(self.batches, None)
                return None if batch is None else {k: v.numpy() for k, v in batch.items()}

        import onnx

        prepared = path.with_name("prepared.onnx")
        quant_pre_process(str(source), str(prepared))
        convs = [n.name for n in onnx.load(prepared).graph.node if n.op_type == "Conv"]  # in graph order
        quantize_static(str(prepared), str(path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=convs[:FLOAT_CONVS], reduce_range=calibration.weight_bits == 7)
        prepared.unlink()


class OnnxFeatures:
    """A session over an exported features graph: named torch inputs -> a (n, d) torch tensor."""

    def __init__(self, path: Path, quantization: str | None = None):
        """`quantization`: the dynamic int8 recipe of the graph (per_token.py), recorded in the spec."""
        ort = _onnxruntime()
        options = ort.SessionOptions()
        # As many threads as torch uses here (it respects the process's CPU affinity and OMP settings).
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: they would take CPU from our own tokeniser and writer threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path, self.quantization = path, quantization
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: inputs[name].cpu().numpy() for name in self.input_names}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def plain_export(module: torch.nn.Module, example: dict[str, torch.Tensor], dynamic: dict[str, tuple[int, ...]],
                 spec: ModelSpec) -> Path:
    """The cached directory of `module`'s plain fp32 export (MODEL_FILE), what every other model derives from."""
    return cached(export_dir(spec, "onnx", "fp32"), lambda d: export_onnx(module, example, dynamic, d / MODEL_FILE))


def onnx_features(module: torch.nn.Module, example: dict[str, torch.Tensor], dynamic: dict[str, tuple[int, ...]],
                  spec: ModelSpec, precision: str, calibration: Calibration | None = None,
                  transformer: bool = False) -> OnnxFeatures:
    """`transformer`: fp32 runs on ONNX Runtime's fused transformer kernels (FUSED) where they give the
    same features, and int8 is per token (`spec.quantization`: the recorded recipe, or None to pick one);
    the features' `quantization` says which recipe ran."""
    _onnxruntime()  # before exporting for a minute only to fail
    if precision not in ("fp32", "int8"):
        raise IndexerError(f"--backend onnx runs fp32 or int8, not {precision}")
    plain = plain_export(module, example, dynamic, spec)
    if not transformer or (precision == "int8" and spec.quantization == PER_TENSOR):
        if precision == "fp32":
            return OnnxFeatures(plain / MODEL_FILE)
        int8 = cached(export_dir(spec, "onnx", "int8"), lambda d: _int8(plain / MODEL_FILE, d / MODEL_FILE, spec,
                                                                         calibration))
        return OnnxFeatures(int8 / MODEL_FILE, PER_TENSOR if calibration is None else None)
    fused = _fused_graph(plain, example, dynamic, spec)
    if precision == "fp32":
        return OnnxFeatures(fused or plain / MODEL_FILE)
    recipe = spec.quantization or (PER_TOKEN if fused else PER_TOKEN_PLAIN)
    if recipe == PER_TOKEN and fused is None:
        raise IndexerError(f"the int8 vectors were made on ONNX Runtime's fused kernels, which do not run here "
                           f"(the log says why): embed {spec.name} where they do, or ingest into a new collection")
    if recipe not in (PER_TOKEN, PER_TOKEN_PLAIN):
        raise IndexerError(f"int8 recipe {recipe!r} is unknown to this version of indexer: upgrade it")
    graph = fused if recipe == PER_TOKEN else plain / MODEL_FILE
    int8 = cached(export_dir(spec, "onnx", "int8", recipe), lambda d: _quantize_per_token(graph, d / MODEL_FILE))
    return OnnxFeatures(int8 / MODEL_FILE, recipe)


def _fused_graph(plain: Path, example: dict[str, torch.Tensor], dynamic: dict[str, tuple[int, ...]],
                 spec: ModelSpec) -> Path | None:
    """The plain export rewritten to fused kernels, or None (logged) where the rewrite is not used."""
    fused = cached(export_dir(spec, "onnx", "fp32", FUSED), lambda d: _fuse(plain / MODEL_FILE, d, example, dynamic))
    reason = _unfused_reason(fused)
    if reason is None:
        return fused / MODEL_FILE
    log.log(logging.INFO if reason == NO_MATCH else logging.WARNING, "ONNX Runtime's fused kernels %s for %s: "
            "running the plain export (delete %s to try again)", reason, spec.name, fused)
    return None


def _int8(source: Path, path: Path, spec: ModelSpec, calibration: Calibration | None) -> None:
    if calibration is None:
        _quantize(source, path)
    elif calibration.batches is None:
        raise calibrated_export_missing(spec, "onnx")
    else:
        _quantize_static(source, path, calibration)
