"""Transformer text encoders (BERT, sentence-transformers, any AutoModel) with explicit pooling."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import IndexerError
from ..spec import ModelSpec
from .base import Embedder
from .device import Runtime
from .runtimes import compile_module

log = logging.getLogger(__name__)

POOLINGS = ("cls", "pooler", "mean", "max")


def sentence_transformers_config(model_dir: Path) -> tuple[str | None, bool, int | None]:
    """(pooling, normalize, max_seq_length) configured by a sentence-transformers directory, if any."""
    modules_file = model_dir / "modules.json"
    if not modules_file.exists():
        return None, False, None
    modules = json.loads(modules_file.read_text())
    pooling, normalize = None, False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg = json.loads((model_dir / module["path"] / "config.json").read_text())
            modes = [m for m, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                                      ("max", "pooling_mode_max_tokens")) if cfg.get(key)]
            if len(modes) != 1:
                raise IndexerError(f"{model_dir}: unsupported sentence-transformers pooling {cfg}; pass --pooling")
            pooling = modes[0]
        elif kind.endswith("Normalize"):
            normalize = True
    max_len = None
    st_cfg = model_dir / "sentence_bert_config.json"
    if st_cfg.exists():
        max_len = json.loads(st_cfg.read_text()).get("max_seq_length")
    return pooling, normalize, max_len


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (n, t, d) token states to (n, d); `mean` and `max` ignore padding."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if pooling == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    raise ValueError(pooling)


class PooledEncoder(torch.nn.Module):
    """A transformers encoder and its pooling as one module: token ids -> (n, d) features. What the
    torch backend runs, and what the other backends export."""

    def __init__(self, model: torch.nn.Module, layer: int, last_layer: bool, pooling: str):
        super().__init__()
        self.model, self.layer, self.last_layer, self.pooling = model, layer, last_layer, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=not self.last_layer,
                         **extra)
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state if self.last_layer else out.hidden_states[self.layer]
        return pool(hidden, attention_mask, self.pooling)


class TextEmbedder(Embedder):
    """Any transformers encoder. `layer` indexes `hidden_states` (0 = embeddings, -1 = last)."""

    backends = ("torch", "onnx", "openvino")
    prepare_in_thread = True  # the fast tokenizer releases the GIL: it runs beside the GPU's forward pass

    def __init__(self, spec: ModelSpec, runtime: Runtime):
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(spec.path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModel.from_pretrained(model_dir)
        self.model = runtime.prepare_model(model)
        self.runtime = runtime
        self.truncated = 0

        n_layers = model.config.num_hidden_layers
        layer = -1 if spec.layer is None else int(spec.layer)
        if not -(n_layers + 1) <= layer <= n_layers:
            raise IndexerError(
                f"--layer {layer}: {spec.name} has hidden states 0..{n_layers} (or -1..-{n_layers + 1})")
        layer %= n_layers + 1
        self._last_layer = layer == n_layers

        st_pooling, st_normalize, st_max_len = sentence_transformers_config(model_dir)
        pooling = spec.pooling or st_pooling
        if pooling is None:
            raise IndexerError(
                f"{spec.name} configures no pooling: pass --pooling cls|pooler|mean|max")
        if pooling not in POOLINGS:
            raise IndexerError(f"--pooling {pooling}: choose one of {', '.join(POOLINGS)}")
        if pooling == "pooler" and (not self._last_layer or getattr(model, "pooler", None) is None):
            raise IndexerError(
                f"--pooling pooler needs the model's pooler on the last layer; {spec.name} "
                + ("has no pooler" if getattr(model, "pooler", None) is None else f"was asked for layer {layer}")
                + " (use cls, mean or max)")
        limit = st_max_len or spec.max_length or self.tokenizer.model_max_length
        limit = min(limit, getattr(model.config, "max_position_embeddings", limit) or limit)
        dim = model.config.hidden_size
        # onnx int8: the recorded recipe, or (None) the one the runtime picks and reports (per_token.py).
        onnx_int8 = (runtime.backend, runtime.precision) == ("onnx", "int8")
        self.spec = ModelSpec(**{**spec.to_dict(), "layer": layer, "pooling": pooling, "dim": dim,
                                 "max_length": int(limit), "quantization": spec.quantization if onnx_int8 else None})
        self.encoder = PooledEncoder(self.model, layer, self._last_layer, pooling)
        example = self.tokenizer(["an example to export with", "and a second, longer one, padded to the first"],
                                 padding=True, return_tensors="pt")
        example = {k: example[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in example}
        self.features = compile_module(self.encoder, example, {k: (0, 1) for k in example}, self.spec, runtime,
                                       transformer=True)
        if onnx_int8:
            self.spec = replace(self.spec, quantization=self.features.quantization)

    @property
    def default_batch_size(self) -> int:
        """64 on a GPU (where free memory then sizes it). On a CPU, small batches of length-sorted texts:
        less padding, and activations that stay in cache. MiniLM, 1,000 passages, 2 cores: OpenVINO fp32
        87 texts/s at 8 vs 67 at 64, int8 114 vs 112; torch (sentence-transformers) 57 at 8 or 16, 47 at 64."""
        if self.runtime.is_cuda:
            return 64
        return 16 if self.runtime.backend == "torch" else 8

    def batch_order(self, items: Sequence[str]) -> list[int]:
        return sorted(range(len(items)), key=lambda i: len(items[i]))

    def probe_items(self, n: int) -> list[str]:
        # exactly max_length tokens with the two special ones: the longest batch, none counted as truncated
        return [" ".join(["a"] * (self.spec.max_length - 2))] * n

    def _prepare(self, items: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(items), padding=True, truncation=True, max_length=self.spec.max_length,
                             return_tensors="pt")
        if enc.encodings is not None:
            self.truncated += sum(1 for e in enc.encodings if e.overflowing)
        return {k: self.runtime.to_device(v) for k, v in enc.items()}

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.features(inputs)
