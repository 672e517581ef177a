"""The blocks of a backbone, bottom to top: what `indexer finetune --unfreeze N` counts from the top.

Transformers: the encoder layers (the final LayerNorm, and the pooler when the features come from it,
belong to the top layer). CNNs: ResNet stages `layer1..layer4`; EfficientNet-Lite `_blocks[i]` plus the
1x1 conv head; torchvision `features[i]` (EfficientNet, MobileNet, ConvNeXt, ...). The stem (token
embeddings, first convolution) is never counted: it stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import IndexerError

# Where the layer stacks of transformers models live (BERT/MiniLM/RoBERTa/ViT, DistilBERT, GPT-2/BLOOM,
# torchvision ViT, many newer encoders).
_LAYER_STACKS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "transformer.h", "h", "blocks")
# Norms applied after the last layer, on the path to the features.
_FINAL_NORMS = ("layernorm", "layer_norm", "final_layer_norm", "ln_f", "norm", "encoder.ln", "encoder.norm")


@dataclass(frozen=True)
class Block:
    """One unit of unfreezing: a name for messages and manifests, and the modules it owns."""

    name: str
    modules: dict[str, nn.Module]  # qualified module name in the backbone -> module

    def parameters(self):
        for module in self.modules.values():
            yield from module.parameters()


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _stack_blocks(model: nn.Module, path: str, stack: nn.Module, top_extras: list[str]) -> list[Block]:
    blocks = [Block(f"{path}.{name}", {f"{path}.{name}": child}) for name, child in stack.named_children()
              if _has_params(child)]
    extras = {p: m for p in top_extras if (m := _get(model, p)) is not None and _has_params(m)}
    if blocks and extras:
        top = blocks[-1]
        blocks[-1] = Block(f"{top.name}+{'+'.join(extras)}", {**top.modules, **extras})
    return blocks


def backbone_blocks(model: nn.Module, *, pooling: str | None = None) -> list[Block]:
    """Blocks of `model` from the bottom to the top. `pooling="pooler"` puts a transformer's pooler in
    the top block (otherwise the pooler is not on the path to the features and stays frozen).

    >>> [b.name for b in backbone_blocks(torchvision.models.resnet18())]     # doctest: +SKIP
    ['layer1', 'layer2', 'layer3', 'layer4']
    """
    # EfficientNet-Lite (efficientnet-lite-pytorch): MBConv blocks, then the 1x1 conv head and its BN.
    if isinstance(getattr(model, "_blocks", None), nn.ModuleList) and hasattr(model, "_conv_head"):
        blocks = [Block(f"_blocks.{i}", {f"_blocks.{i}": b}) for i, b in enumerate(model._blocks)]
        head = {n: m for n in ("_conv_head", "_bn1") if (m := getattr(model, n, None)) is not None}
        return [*blocks, Block("_conv_head+_bn1", head)]
    # torchvision ResNet / ResNeXt / Wide ResNet: four stages.
    stages = [(f"layer{i}", _get(model, f"layer{i}")) for i in range(1, 5)]
    if all(m is not None for _, m in stages):
        return [Block(name, {name: m}) for name, m in stages]
    # Transformers: a stack of identical layers.
    for path in _LAYER_STACKS:
        stack = _get(model, path)
        if isinstance(stack, (nn.ModuleList, nn.Sequential)) and len(stack) > 0:
            return _stack_blocks(model, path, stack, [*_FINAL_NORMS, *(["pooler"] if pooling == "pooler" else [])])
    # torchvision EfficientNet / MobileNet / ConvNeXt / DenseNet: `features`, whose first entry is the stem.
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and len(features) > 1:
        return [Block(f"features.{name}", {f"features.{name}": child})
                for name, child in list(features.named_children())[1:] if _has_params(child)]
    top = ", ".join(n for n, _ in model.named_children()) or "none"
    raise IndexerError(
        f"cannot identify the blocks of {type(model).__name__} (top-level modules: {top}); fine-tuning "
        "supports transformers encoders, ResNets, EfficientNet(-Lite) and torchvision `features` CNNs")


def unfreeze_top(model: nn.Module, n: int, *, pooling: str | None = None, name: str = "the model") -> list[Block]:
    """Freeze every parameter and put the model in eval mode, then make the top `n` blocks trainable
    (and put them in train mode). Frozen BatchNorm layers stay in eval mode: their running statistics
    never move. Returns the unfrozen blocks, bottom to top."""
    blocks = backbone_blocks(model, pooling=pooling)
    if n < 0:
        raise IndexerError("--unfreeze must be 0 (head only) or more")
    if n > len(blocks):
        raise IndexerError(f"--unfreeze {n}: {name} has {len(blocks)} blocks "
                           f"({blocks[0].name} ... {blocks[-1].name}); use at most {len(blocks)}")
    model.eval().requires_grad_(False)
    chosen = blocks[len(blocks) - n :] if n else []
    for block in chosen:
        for module in block.modules.values():
            module.train().requires_grad_(True)
    return chosen
