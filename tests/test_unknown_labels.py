"""Unknown labels (NaN: the source never labelled that finding) are left out of the loss, the class weights,
the metrics, the thresholds and the bootstrap — never read as negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedxr.labels import LABELS
from fedxr.models.classifier import pos_weight_from_labels
from fedxr.models.loss import masked_bce_with_logits
from fedxr.models.metrics import (batched_auroc, bootstrap_macro_auroc, choose_thresholds, multilabel_scores,
                                  sensitivity_specificity)
from fedxr.evaluation import thresholds_at_specificity


def test_masked_bce_equals_plain_bce_when_every_label_is_known():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(8, 14, generator=g), (torch.rand(8, 14, generator=g) > 0.7).float()
    w = torch.linspace(1, 3, 14)
    assert masked_bce_with_logits(logits, targets, w) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, targets, pos_weight=w)), rel=1e-6)


def test_unknown_labels_give_no_gradient_and_do_not_count_as_negatives():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 14, generator=g, requires_grad=True)
    targets = torch.full((6, 14), float("nan"))
    targets[:, 6] = torch.tensor([1.0, 0, 1, 0, 1, 1])  # only Pneumonia is known (a pediatric-style site)
    loss = masked_bce_with_logits(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad[:, 6].abs().sum() > 0
    assert logits.grad[:, [c for c in range(14) if c != 6]].abs().sum() == 0  # unknown: no push either way
    # The loss is the mean over the known entries only: treating unknown as 0 would be a different number.
    as_negative = F.binary_cross_entropy_with_logits(logits.detach(), torch.nan_to_num(targets, nan=0.0))
    assert float(loss) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits.detach()[:, 6], targets[:, 6])))
    assert float(loss) != pytest.approx(float(as_negative))


def test_metrics_count_only_known_labels():
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.3).astype(float)
    score = y * 0.5 + rng.random(n) * 0.7
    probs = torch.tensor(np.tile(score[:, None], (1, 14)), dtype=torch.float32)
    targets = torch.tensor(np.tile(y[:, None], (1, 14)))
    truth = multilabel_scores(probs, targets, min_positives=10)["auroc"][LABELS[0]]
    # Hide half of the labels of class 0 and make the hidden ones look like confident negatives if read as 0.
    hidden = np.arange(n) % 2 == 0
    t2 = targets.clone()
    t2[hidden, 0] = float("nan")
    p2 = probs.clone()
    p2[hidden, 0] = 0.99
    s = multilabel_scores(p2, t2, min_positives=10)
    known_only = multilabel_scores(probs[~hidden], targets[~hidden], min_positives=10)["auroc"][LABELS[0]]
    assert s["auroc"][LABELS[0]] == pytest.approx(known_only)
    assert s["known"][LABELS[0]] == int((~hidden).sum())
    assert abs(s["auroc"][LABELS[0]] - truth) < 0.1  # the hidden rows (scored 0.99) did not drag it down
    # A class nobody labelled is unknown, not "no positives", and out of the macro.
    t3 = targets.clone()
    t3[:, 13] = float("nan")
    s3 = multilabel_scores(probs, t3, min_positives=10)
    assert s3["auroc"][LABELS[13]] is None and LABELS[13] in s3["unknown"] and LABELS[13] not in s3["counted"]


def test_batched_and_bootstrap_auroc_ignore_unknown():
    rng = np.random.default_rng(2)
    scores = rng.random((3, 200))
    labels = (rng.random((3, 200)) < 0.4).astype(float)
    masked = labels.copy()
    masked[:, ::3] = np.nan
    keep = ~np.isnan(masked[0])
    want = batched_auroc(scores[:, keep], labels[:, keep])
    assert np.allclose(batched_auroc(scores, masked), want)
    targets = np.tile(masked[0][:, None], (1, 14))
    probs = np.tile(scores[0][:, None], (1, 14))
    samples = bootstrap_macro_auroc([probs], targets, [LABELS[0]], resamples=50, seed=0)
    assert np.isfinite(samples).all() and abs(np.median(samples) - want[0]) < 0.1


def test_thresholds_class_weights_and_sensitivity_use_known_labels():
    targets = torch.tensor([[1.0], [0.0], [float("nan")], [1.0], [0.0]]).repeat(1, 14)
    probs = torch.tensor([[0.9], [0.2], [0.95], [0.8], [0.1]]).repeat(1, 14)
    thr = choose_thresholds(probs, targets)
    assert 0.2 < float(thr[0]) <= 0.8 + 1e-6
    at = sensitivity_specificity(probs, targets, thr)[LABELS[0]]
    assert (at["positives"], at["negatives"], at["sensitivity"], at["specificity"]) == (2, 2, 1.0, 1.0)
    labels = np.array([[1.0], [np.nan], [np.nan], [0.0], [0.0]])
    assert pos_weight_from_labels(labels, cap=10) == [2.0]  # 2 known negatives / 1 positive; unknowns ignored


def test_threshold_at_specificity_leaves_that_share_of_known_negatives_below_it():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(200, 14, generator=g)
    targets = (torch.rand(200, 14, generator=g) > 0.5).float()
    targets[:50, 2] = float("nan")  # unknown: not a negative
    targets[:, 5] = 1.0  # no negative at all: no threshold
    thr = thresholds_at_specificity(probs, targets, 0.9)
    assert torch.isnan(thr[5]) and not torch.isnan(thr[[0, 2]]).any()
    for c in (0, 2):
        neg = probs[targets[:, c] == 0, c]
        spec = float((neg < thr[c]).double().mean())
        assert 0.9 <= spec < 0.9 + 1 / len(neg) + 1e-9  # the lowest threshold that reaches 90 %
    # ties: every negative scores the same; the threshold must still leave them all below it
    same = torch.full((10, 14), 0.7)
    assert float((same[:, 0] < thresholds_at_specificity(same, torch.zeros(10, 14), 0.9)[0]).float().mean()) == 1.0


def test_a_one_class_site_does_not_get_sensitivity_free_from_a_model_that_calls_everything_positive():
    """A COVID cohort's test split is all Pneumonia: a model that says "Pneumonia" to every film has sensitivity
    1.0 at a low threshold of its own; at the threshold for 90 % specificity on validation negatives it has what
    a coin has. A model that separates the classes keeps its sensitivity."""
    from fedxr.evaluation import _site_scores

    pneumonia = LABELS.index("Pneumonia")
    g = torch.Generator().manual_seed(4)
    val_targets = torch.full((200, 14), float("nan"))
    val_targets[:, pneumonia] = (torch.arange(200) % 2).float()
    test_targets = torch.full((60, 14), float("nan"))
    test_targets[:, pneumonia] = 1.0
    normal = np.full(60, np.nan)
    for name, val_probs, test_probs, want in (
            ("everything positive", 0.95 + 0.04 * torch.rand(200, 14, generator=g),
             0.95 + 0.04 * torch.rand(60, 14, generator=g), (1.0, 0.2)),
            ("separates", 0.2 + 0.6 * val_targets.nan_to_num(0) + 0.1 * torch.rand(200, 14, generator=g),
             0.8 + 0.1 * torch.rand(60, 14, generator=g), (1.0, 1.0))):
        spec_thr = thresholds_at_specificity(val_probs, val_targets, 0.9)
        s = _site_scores(test_probs, test_targets, normal, torch.full((14,), 0.5), ["Pneumonia"],
                         lambda t=spec_thr: (0.9, t))
        v = s["sensitivity_only"]["Pneumonia"]
        assert v["sensitivity"] == want[0], name
        assert v["at_specificity"]["validation_specificity"] == 0.9
        if want[1] < 1:
            assert v["at_specificity"]["sensitivity"] < want[1], name
        else:
            assert v["at_specificity"]["sensitivity"] == 1.0, name
