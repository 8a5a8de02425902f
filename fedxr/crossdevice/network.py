"""The student as NVFlare's edge job builds it on the server and on every device."""

from __future__ import annotations

import torch
from torch import nn

from fedxr.models.registry import build_model


class EdgeStudent(nn.Module):
    """A registry network (``net``) started from a fedxr checkpoint's weights.

    NVFlare's job builder rebuilds a model from its class path and its constructor arguments, read back from
    same-named attributes — so the arguments are plain strings kept as attributes, and the weights come from
    a file rather than from the instance."""

    def __init__(self, model_name: str, weights: str = "", norm: str = "batch"):
        super().__init__()
        self.model_name, self.weights, self.norm = model_name, weights, norm
        self.net = build_model(model_name, norm=norm)
        if weights:
            from fedxr.models.checkpoint import load_checkpoint

            self.net.load_state_dict(load_checkpoint(weights)["state_dict"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


#: State-dict names of the edge job's model are the checkpoint's with this prefix (the ``net`` attribute).
PREFIX = "net."


def to_checkpoint_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v for k, v in state.items()}
