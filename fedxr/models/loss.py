"""The classification loss with unknown labels. Pure: tensors in, a scalar out.

A label is unknown (NaN in the targets) when the image's source never labelled that finding: a pediatric
pneumonia set says nothing about Emphysema. Treating it as 0 would teach every site that the findings it
never labels are absent; it is left out of the loss instead (a mask per image and label).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def masked_bce_with_logits(logits: torch.Tensor, targets: torch.Tensor,
                           pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE-with-logits over the known entries of ``targets`` (N, C); NaN entries count nothing.

    Equals ``F.binary_cross_entropy_with_logits`` (mean reduction) when every label is known. A batch with
    no known label gives a zero loss that still depends on the logits (so backward works).
    """
    targets = targets.float()
    known = ~torch.isnan(targets)
    per_entry = F.binary_cross_entropy_with_logits(logits.float(), torch.where(known, targets, 0.0),
                                                   pos_weight=pos_weight, reduction="none")
    per_entry = torch.where(known, per_entry, 0.0)
    return per_entry.sum() / known.sum().clamp(min=1)
