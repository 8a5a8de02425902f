"""Multi-label distillation losses: zero at agreement, gradient sign, known values, mixing."""

import math

import pytest
import torch

from fedxr.distill.losses import bernoulli_kd, distillation_loss, task_loss


def test_zero_when_student_equals_teacher():
    t = torch.randn(8, 14) * 3
    assert float(bernoulli_kd(t.clone(), t, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(bernoulli_kd(t + 0.5, t)) > 0


def test_equals_soft_bce_minus_teacher_entropy():
    """The KL form differs from the BCE(σ(s/T), σ(t/T)) form by the teacher's entropy only."""
    s, t, T = torch.randn(4, 14), torch.randn(4, 14), 3.0
    p = torch.sigmoid(t / T)
    soft_bce = torch.nn.functional.binary_cross_entropy_with_logits(s / T, p)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    assert float(bernoulli_kd(s, t, T)) == pytest.approx(float((soft_bce - entropy) * T**2), rel=1e-5)


def test_gradient_pulls_student_towards_teacher():
    t = torch.tensor([[2.0, -1.0]])
    s = torch.tensor([[0.0, 0.0]], requires_grad=True)
    bernoulli_kd(s, t, 1.0).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]  # raise the first logit, lower the second
    t.requires_grad_(True)
    bernoulli_kd(torch.zeros(1, 2), t, 1.0)  # the teacher is a constant target: no graph through it
    assert t.grad is None


def test_known_value():
    # One class, T = 1: teacher logit 0 (p = 0.5), student logit ln 3 (q = 0.75).
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(bernoulli_kd(torch.tensor([[math.log(3)]]), torch.tensor([[0.0]]), 1.0)) == pytest.approx(kl, rel=1e-6)
    # T = 2 scales logits by 1/2 and the result by 4.
    q = 1 / (1 + math.exp(-math.log(3) / 2))
    kl2 = 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))
    assert float(bernoulli_kd(torch.tensor([[math.log(3)]]), torch.tensor([[0.0]]), 2.0)) == pytest.approx(4 * kl2, rel=1e-6)


def test_mixing_and_bad_arguments():
    s, t, y = torch.randn(5, 14), torch.randn(5, 14), (torch.rand(5, 14) < 0.2).float()
    total, task, kd = distillation_loss(s, t, y, alpha=0.3, temperature=2.0)
    assert float(total) == pytest.approx(0.7 * float(task) + 0.3 * float(kd), rel=1e-6)
    assert float(distillation_loss(s, t, y, alpha=0.0)[0]) == pytest.approx(float(task_loss(s, y)), rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, y, temperature=0)
