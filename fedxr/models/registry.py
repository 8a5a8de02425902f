"""Named model builders: teachers, students and a tiny CNN for tests.

Every entry knows its default input size and normalisation (``ModelSpec.preprocessing``); a recipe's
``data.image_size`` replaces the size (:meth:`fedxr.config.Recipe.preprocessing`), and the result travels
with the model from there on. Parameter counts and MACs are computed (on the
meta device, so no memory is allocated) with ``torch.utils.flop_counter``. This module imports torch
only inside the functions that build models, so the recipe checker can validate names cheaply.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedxr.errors import FedxrError
from fedxr.labels import NUM_LABELS
from fedxr.preprocessing import Preprocessing

#: Gray-scale equivalents of ImageNet normalisation (timm averages the RGB stem for in_chans=1).
GRAY_IMAGENET_MEAN, GRAY_IMAGENET_STD = 0.449, 0.226


def _gray(size: int) -> Preprocessing:
    return Preprocessing(size, GRAY_IMAGENET_MEAN, GRAY_IMAGENET_STD)


class UnknownModelError(FedxrError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    role: str              # teacher | student | test
    timm_name: str | None  # None for models defined here
    default: Preprocessing  # the input the architecture was designed for (ImageNet-style normalisation)
    description: str

    @property
    def input_size(self) -> int:
        return self.default.size

    def preprocessing(self, size: int | None = None) -> Preprocessing:
        """The model's normalisation at ``size`` pixels (default: its own input size)."""
        return Preprocessing(size or self.default.size, self.default.mean, self.default.std)


_SPECS = (
    ModelSpec("densenet121", "teacher", "densenet121", _gray(224), "CheXNet architecture (default teacher)"),
    ModelSpec("resnet50", "teacher", "resnet50", _gray(224), "ResNet-50"),
    ModelSpec("convnext_tiny", "teacher", "convnext_tiny", _gray(224), "ConvNeXt-T"),
    ModelSpec("efficientnet_b3", "teacher", "efficientnet_b3", _gray(288), "EfficientNet-B3"),
    ModelSpec("mobilenetv3_small_100", "student", "mobilenetv3_small_100", _gray(224), "MobileNetV3-Small"),
    ModelSpec("mobilenetv3_large_100", "student", "mobilenetv3_large_100", _gray(224), "MobileNetV3-Large"),
    ModelSpec("efficientnet_lite0", "student", "efficientnet_lite0", _gray(224), "EfficientNet-Lite0 (edge-friendly ops)"),
    ModelSpec("resnet18", "student", "resnet18", _gray(224), "ResNet-18"),
    ModelSpec("resnet18_quarter", "student", None, _gray(224),
              "ResNet-18 at 1/4 width (16-128 channels; ResNet's 64-channel stem): 10x fewer MACs"),
    ModelSpec("resnet18_narrow", "student", None, _gray(224),
              "ResNet-18 at 1/4 width, stem included (16-128 channels): 15x fewer MACs, the fastest at the edge"),
    ModelSpec("resnet18_eighth", "student", None, _gray(224),
              "ResNet-18 at 1/8 width (8-64 channels): 22x fewer MACs, 0.18M parameters"),
    ModelSpec("tiny_cnn", "test", None, Preprocessing(64), "4-block CNN for tests and CPU demos"),
)
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
#: Narrow ResNet-18 students: registry name → width of the first stage (ResNet-18 itself: 64).
SLIM_RESNET18 = {"resnet18_quarter": 16, "resnet18_eighth": 8, "resnet18_narrow": 16}
#: Students whose stem is narrowed too. timm's plain ResNet stem is 64 channels whatever the stages' width
#: (``stem_width`` shapes only its deep stems): in resnet18_quarter that 7 x 7 convolution over the full-size input
#: is a quarter of the MACs and, with one input channel, about 40 % of the INT8 latency at the edge.
NARROW_STEM = {"resnet18_narrow"}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; unknown names fail with the list and a "did you mean"."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownModelError(f"unknown model {name!r}; {hint}known models: {', '.join(REGISTRY)}")


def build_model(name: str, pretrained: bool = False, num_classes: int = NUM_LABELS, norm: str = "batch"):
    """Build a registry model (a torch ``nn.Module``) with one input channel and ``num_classes`` logits.

    ``norm="group"``: the model as differential privacy trains it, BatchNorm replaced by GroupNorm
    (:func:`fedxr.models.private.private_model`); checkpoints record it, so every later stage rebuilds the same network.
    """
    if norm == "group":
        from fedxr.models.private import private_model

        return private_model(build_model(name, pretrained, num_classes))
    if norm != "batch":
        raise FedxrError(f"unknown normalisation {norm!r} for model {name!r}; use batch or group")
    spec = get_spec(name)
    if spec.timm_name is None:
        if pretrained:
            raise FedxrError(f"model {name!r} has no pretrained weights; set model.pretrained: false")
        if name in SLIM_RESNET18:
            from timm.models.resnet import BasicBlock, ResNet

            # timm's ResNet-18 with the stem and every stage narrowed: plain 3x3 convolutions and ReLU, which
            # edge CPUs, NPUs and INT8 kernels run well, and the teacher's own layout, which helps distillation.
            width = SLIM_RESNET18[name]
            # timm annotates `block` as an instance (BasicBlock | Bottleneck); it takes the class, as in timm's own
            # resnet18.
            net: Any = ResNet(BasicBlock, (2, 2, 2, 2), in_chans=1, num_classes=num_classes,  # type: ignore[arg-type]
                              channels=tuple(width * 2**i for i in range(4)), stem_width=width)
            if name in NARROW_STEM:  # the same 7 x 7 stride-2 stem, `width` channels wide; no 1 x 1 shortcut needed
                import torch

                net.conv1 = torch.nn.Conv2d(1, width, kernel_size=7, stride=2, padding=3, bias=False)
                net.bn1 = torch.nn.BatchNorm2d(width)
                net.layer1[0] = BasicBlock(width, width)
                net.feature_info[0]["num_chs"] = width  # what timm's features_only and feature hooks read
                net.init_weights(zero_init_last=True)
            return net
        from fedxr.models.tiny import TinyCNN

        return TinyCNN(num_classes)
    import timm

    try:
        return timm.create_model(spec.timm_name, pretrained=pretrained, in_chans=1, num_classes=num_classes)
    except Exception as exc:
        if pretrained:
            raise FedxrError(
                f"could not fetch pretrained weights for {name!r} ({type(exc).__name__}: {exc}); "
                "pretrained: true needs network access to the weight hub — set model.pretrained: false"
            ) from None
        raise


@lru_cache(maxsize=None)
def complexity(name: str, input_size: int | None = None) -> tuple[int, int]:
    """(parameters, multiply-accumulates for one image) at ``input_size`` (default: the entry's)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = input_size or get_spec(name).input_size
    with torch.device("meta"):
        model = build_model(name).eval()
        x = torch.zeros(1, 1, size, size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    return sum(p.numel() for p in model.parameters()), int(counter.get_total_flops() // 2)


def format_table() -> str:
    lines = [f"{'name':<24}{'role':<9}{'params':>10}{'MACs':>10}{'input':>7}  description", "-" * 86]
    for spec in REGISTRY.values():
        params, macs = complexity(spec.name)
        lines.append(f"{spec.name:<24}{spec.role:<9}{params / 1e6:>9.2f}M{macs / 1e9:>9.3f}G{spec.input_size:>7}  {spec.description}")
    return "\n".join(lines)
