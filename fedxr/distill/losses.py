"""Distillation losses for multi-label chest X-ray outputs. Pure functions of tensors.

Softmax KD is wrong for multi-label outputs (the 14 findings are not mutually exclusive), so each class
is a Bernoulli variable: the teacher's temperature-softened sigmoid ``σ(t/T)`` is the soft target for
the student's ``σ(s/T)``.

``bernoulli_kd`` is the Bernoulli KL divergence KL(σ(t/T) ‖ σ(s/T)), averaged over classes and batch,
times T². It equals BCE(σ(s/T), σ(t/T)) minus the teacher's entropy H(σ(t/T)) — a constant in the
student — so its gradient is that of the BCE form in the issue, and it is exactly zero when the
student's logits equal the teacher's. The T² factor keeps gradient magnitudes comparable across
temperatures (Hinton et al., 2015).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedxr.models.loss import masked_bce_with_logits


def bernoulli_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """T² · mean KL(σ(t/T) ‖ σ(s/T)); student/teacher logits (N, C). Zero iff they are equal."""
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    p = torch.sigmoid(t)
    # KL = p·(log p − log q) + (1 − p)·(log(1 − p) − log(1 − q)), in logsigmoid form for stability.
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.mean() * temperature**2


def task_loss(student_logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits against the known labels (NaN = unknown, left out), optionally with per-class pos_weight.

    The distillation term covers every class, unknown ones included: where a site never labelled a finding the
    teacher's soft label is the only signal the student gets for it there.
    """
    return masked_bce_with_logits(student_logits, targets, pos_weight=pos_weight)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float = 0.7, temperature: float = 2.0,
                      pos_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(1 − α)·task + α·KD``; returns (total, task, kd) so the two parts can be logged separately."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    task = task_loss(student_logits, targets, pos_weight)
    kd = bernoulli_kd(student_logits, teacher_logits, temperature)
    return (1 - alpha) * task + alpha * kd, task, kd
