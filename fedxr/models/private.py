"""The network differential privacy trains (``norm: group`` in checkpoints): kept apart from fedxr.privacy so
that the model registry can build it without importing the privacy package (which imports the registry)."""

from __future__ import annotations

import torch


def private_model(model):
    """``model`` made trainable with per-sample gradients: BatchNorm → GroupNorm (Opacus' own fix), and no
    in-place activations (Opacus' backward hooks cannot follow a tensor changed in place). The state dict's
    keys stay those of the network's parameters; the BatchNorm statistics are gone."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    for module in list(fixed.modules()):
        if getattr(module, "inplace", False) is True:
            module.inplace = False
        # timm's residual blocks add the shortcut in place into their last norm's output (`x += shortcut`), a tensor
        # Opacus' hook owns; their empty drop-path slot gets a copy step instead (no weights: the state dict is unchanged).
        if type(module).__name__ in ("BasicBlock", "Bottleneck") and getattr(module, "drop_path", 0) is None:
            module.drop_path = _FreshCopy()
    return fixed


class _FreshCopy(torch.nn.Module):
    """Identity that returns a new tensor (so a later in-place add does not touch a hooked layer's output)."""

    def forward(self, x):
        return x.clone()
