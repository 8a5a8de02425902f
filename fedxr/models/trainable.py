"""Which weights training may change (``model.trainable``): all, the last stage of blocks and the head, every
normalisation layer's scale and shift with the head, or the head.

Fine-tuning a model trained elsewhere (``model.init_from``, e.g. on public images) changes few weights where a
site's data is scarce, and under differential privacy the noise DP-SGD adds grows with the number of weights it
trains (its norm is about σ·C·√d / B). The groups follow timm's own coarse grouping of a network (stem, each stage
of blocks, head: what layer-wise learning-rate decay uses); fedxr's TinyCNN has its conv blocks and its head.
``norms_and_head`` trains the normalisation layers' affine weights everywhere in the network (~10 k for ResNet-18)
with the head: few weights, yet every layer's features can shift toward the sites' images (another population,
other equipment), which the head alone cannot do.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedxr.errors import FedxrError

TRAINABLE = ("all", "last_blocks", "norms_and_head", "head")
NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)


def parameter_groups(model: nn.Module) -> list[list[str]]:
    """The network's parameter names in groups from input to output: the stem, each stage of blocks, the head."""
    # Told apart by their attributes (timm's group_matcher; TinyCNN's features and head), which nn.Module's own
    # type cannot know: it types every unknown attribute as `Tensor | Module`.
    net: Any = model
    if hasattr(net, "group_matcher"):
        from timm.models._manipulate import group_parameters

        return [list(names) for names in group_parameters(model, net.group_matcher(coarse=True)).values()]
    if hasattr(net, "features") and hasattr(net, "head"):  # TinyCNN: each conv block, then the head
        groups: list[list[str]] = []
        for index, layer in enumerate(net.features):
            names = [f"features.{index}.{n}" for n, _ in layer.named_parameters()]
            if isinstance(layer, nn.Conv2d) or not groups:
                groups.append(names)
            else:
                groups[-1] += names  # the block's norm with its convolution
        return [g for g in groups if g] + [[f"head.{n}" for n, _ in net.head.named_parameters()]]
    raise FedxrError(f"{type(model).__name__}: fedxr does not know its stages; use model.trainable: all")


def trainable_names(model: nn.Module, which: str) -> set[str]:
    """The parameter names ``which`` (one of TRAINABLE) leaves trainable."""
    if which not in TRAINABLE:
        raise FedxrError(f"model.trainable: unknown choice {which!r}; use one of {', '.join(TRAINABLE)}")
    names = [n for n, _ in model.named_parameters()]
    if which == "all":
        return set(names)
    groups = parameter_groups(model)
    keep = {n for g in (groups[-2:] if which == "last_blocks" else groups[-1:]) for n in g}
    if which == "norms_and_head":
        keep |= {f"{m}.{n}" if m else n for m, module in model.named_modules() if isinstance(module, NORM_LAYERS)
                 for n, _ in module.named_parameters(recurse=False)}
    return keep


def freeze_except(model: nn.Module, which: str) -> nn.Module:
    """Set requires_grad False on every weight ``which`` does not train; returns the model."""
    keep = trainable_names(model, which)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return model
