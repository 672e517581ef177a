"""Device, precision and backend choice: CUDA with autocast when there is one, fp32 on CPU; torch
in process, or an exported graph (runtimes/)."""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import IndexerError

# default: fp16 autocast on CUDA, fp32 on CPU. auto: measured by ingest (ingest/autotune.py), never seen here.
Precision = Literal["default", "auto", "fp32", "fp16", "bf16", "int8"]
Backend = Literal["torch", "onnx", "openvino"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnx", "openvino")

CPUINFO = Path("/proc/cpuinfo")
# What decides which way is fastest on a CPU, and whether int8 products saturate (models/runtimes/cache.py).
INT8_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp")


def cpu_info() -> tuple[str, set[str]] | None:
    """This CPU's model name and instruction-set flags (Linux's /proc/cpuinfo), or None where unknown."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return None
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields.get("model name") or platform.processor() or platform.machine(), \
        set((fields.get("flags") or fields.get("Features") or "").split())


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs. The float precisions are not part of a model's identity: vectors
    made on a GPU in fp16 are searched with queries embedded on a CPU in fp32. The backend and int8
    are (the spec records them): their vectors drift from fp32, so queries are embedded the same way."""

    device: torch.device
    precision: Literal["fp32", "fp16", "bf16", "int8"]
    backend: Backend = "torch"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.is_cuda and self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def prepare_model(self, model: torch.nn.Module, *, convolutional: bool = False) -> torch.nn.Module:
        """Freeze a model and place it: eval mode, no grads, int8 dynamic quantisation of its Linear
        layers on request (CPU), channels-last memory for CNNs on CUDA."""
        model.eval().requires_grad_(False)
        if self.precision == "int8" and self.backend == "torch":  # other backends quantise their export
            if convolutional:
                raise IndexerError("--precision int8 for a CNN is static int8, calibrated on your images: "
                                   "add --backend onnx or openvino (torch's int8 quantises Linear layers only)")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        if convolutional and self.is_cuda:
            model = model.to(memory_format=torch.channels_last)
        return model.to(self.device)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # Pinned host memory (DataLoader pin_memory) makes this copy asynchronous on CUDA.
        return tensor.to(self.device, non_blocking=self.is_cuda)


def resolve_runtime(device: str = "auto", precision: Precision = "default", backend: Backend = "torch") -> Runtime:
    """Device `auto` picks CUDA when present. Precision `default`: fp16 autocast on CUDA, fp32 on CPU
    (int8 dynamic quantisation on request). The onnx and openvino backends run on the CPU, fp32 or int8."""
    if precision == "auto":
        raise IndexerError("--precision auto is measured by ingest on its inputs: name a precision here")
    if backend not in BACKENDS:
        raise IndexerError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend != "torch":
        if device not in ("auto", "cpu"):
            raise IndexerError(f"--backend {backend} runs on the CPU: use --device cpu (or --backend torch on a GPU)")
        if precision not in ("default", "fp32", "int8"):
            raise IndexerError(f"--backend {backend} runs fp32 or int8, not {precision}")
        return Runtime(torch.device("cpu"), "fp32" if precision == "default" else precision, backend)
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise IndexerError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise IndexerError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
        if dev.type not in ("cpu", "cuda"):
            raise IndexerError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    if precision == "default":
        precision = "fp16" if dev.type == "cuda" else "fp32"
    if dev.type == "cpu" and precision in ("fp16", "bf16"):
        raise IndexerError(
            f"--precision {precision} needs a GPU; on CPU use fp32 (or int8 for text models)"
        )
    if dev.type == "cuda" and precision == "int8":
        raise IndexerError("--precision int8 is a CPU mode (dynamic quantisation); on GPU use fp16 or bf16")
    return Runtime(dev, precision)


def query_runtime(backend: str, precision: str, device: str = "auto", float_backend: Backend = "torch") -> Runtime:
    """How to embed queries for vectors made with (backend, precision): the same backend, int8 again
    if they were int8; float vectors take whatever float the device runs, on a CPU through
    `float_backend` (an fp32 export of the same weights: the same vectors, faster for small batches)."""
    if backend == "torch" and precision != "int8":
        runtime = resolve_runtime(device)
        return runtime if runtime.is_cuda or float_backend == "torch" else resolve_runtime("cpu", "fp32", float_backend)
    return resolve_runtime("cpu" if device == "auto" else device, precision, backend)
