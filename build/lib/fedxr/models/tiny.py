"""A tiny CNN for tests and CPU demos (not a timm model)."""

from __future__ import annotations

import torch
from torch import nn

from fedxr.labels import NUM_LABELS


class TinyCNN(nn.Module):
    """Four conv-BN-ReLU blocks, global average pooling and a linear head. (N,1,H,W) → (N,classes)."""

    def __init__(self, num_classes: int = NUM_LABELS, width: int = 16, in_chans: int = 1):
        super().__init__()
        layers, c_in = [], in_chans
        for i in range(4):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2 if i else 1, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(c_in), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))
