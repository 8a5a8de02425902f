"""Multi-label metrics and decision thresholds. Pure: tensors in, numbers out.

A class whose split has no positives (or no negatives) has no AUROC; it is reported as ``None`` and left
out of the macro average, and the note says so — never a crash or a NaN in the macro.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import binary_average_precision, binary_auroc, binary_roc

from fedxr.labels import LABELS


def defined_classes(targets: torch.Tensor) -> torch.Tensor:
    """(C,) bool: classes with at least one positive and one negative."""
    pos = targets.sum(0)
    return (pos > 0) & (pos < targets.shape[0])


#: A test-set AUROC is shown, and counted in the headline macro, only for a class with at least this many
#: positives: with 2-7 positives a class's AUROC swings by ±0.2 between equally good models.
MIN_TEST_POSITIVES = 10


def multilabel_scores(probs: torch.Tensor, targets: torch.Tensor, min_positives: int = 1) -> dict:
    """Per-class and macro AUROC / average precision. probs, targets: (N, C).

    ``macro_auroc`` averages the classes with at least ``min_positives`` positives (and a negative);
    ``macro_auroc_all`` every class with both. ``counted`` names the classes in ``macro_auroc``.
    """
    targets = targets.int()
    valid = defined_classes(targets)
    auroc: dict[str, float | None] = {}
    ap: dict[str, float | None] = {}
    for c, name in enumerate(LABELS[: probs.shape[1]]):
        if valid[c]:
            auroc[name] = float(binary_auroc(probs[:, c], targets[:, c]))
            ap[name] = float(binary_average_precision(probs[:, c], targets[:, c]))
        else:
            auroc[name] = ap[name] = None
    positives = targets.sum(0).tolist()
    defined = [n for n in LABELS[: probs.shape[1]] if auroc[n] is not None]
    counted = [n for n, p in zip(LABELS, positives) if n in defined and p >= min_positives]
    kept_all = [auroc[n] for n in defined]
    excluded = [n for n, v in auroc.items() if v is None]
    too_few = [n for n in defined if n not in counted]
    notes = []
    if excluded:
        notes.append(f"excluded from the macro (no positives or no negatives in this split): {', '.join(excluded)}")
    if too_few and counted:
        notes.append(f"too few positives (< {min_positives}) to count in the macro: {', '.join(too_few)}")
    elif too_few:
        # A toy split: no class reaches the minimum. Average what there is rather than report nothing.
        counted, too_few = defined, []
        notes.append(f"no class has {min_positives} positives: the macro averages every class with one (unstable)")
    return {
        "macro_auroc": sum(auroc[n] for n in counted) / len(counted) if counted else float("nan"),
        "macro_auroc_all": sum(kept_all) / len(kept_all) if kept_all else float("nan"),
        "macro_ap": sum(ap[n] for n in counted) / len(counted) if counted else float("nan"),
        "auroc": auroc,
        "ap": ap,
        "counted": counted,
        "min_positives": min_positives,
        "positives": dict(zip(LABELS, positives)),
        "excluded": excluded,
        "note": "; ".join(notes),
        "n": int(targets.shape[0]),
    }


def batched_auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each row (Mann-Whitney U / (n+ n-)): scores, labels (B, n) -> (B,); NaN without both classes."""
    labels = labels.astype(bool)
    pos = labels.sum(1)
    neg = labels.shape[1] - pos
    from scipy.stats import rankdata

    rank_sum = np.where(labels, rankdata(scores, axis=1), 0.0).sum(1)  # ties share their average rank
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((pos > 0) & (neg > 0), (rank_sum - pos * (pos + 1) / 2) / (pos * neg), np.nan)


def bootstrap_macro_auroc(probs: list[np.ndarray], targets: np.ndarray, classes: list[str],
                          resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Macro AUROC over ``classes`` for each model in ``probs`` on ``resamples`` bootstrap resamples of the
    images (the same resamples for every model, so differences between models are paired).
    Returns (models, resamples). A class without positives in a resample is left out of that resample's mean.
    """
    idx_cls = [LABELS.index(c) for c in classes]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(targets), size=(resamples, len(targets)))
    out = np.zeros((len(probs), resamples))
    for m, p in enumerate(probs):
        per_class = np.stack([batched_auroc(p[draws, c], targets[draws, c]) for c in idx_cls])  # (C, B)
        out[m] = np.nanmean(per_class, axis=0)
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval of bootstrap samples."""
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))]


def choose_thresholds(probs: torch.Tensor, targets: torch.Tensor, rule: str = "youden") -> torch.Tensor:
    """Per-class decision thresholds chosen on validation data.

    ``youden``: maximise sensitivity + specificity − 1 (Youden's J) along the ROC curve.
    ``f1``: maximise F1 over the distinct predicted probabilities.
    Classes without both positives and negatives keep 0.5.
    """
    targets = targets.int()
    out = torch.full((probs.shape[1],), 0.5)
    valid = defined_classes(targets)
    for c in range(probs.shape[1]):
        if not valid[c]:
            continue
        p, t = probs[:, c].float(), targets[:, c]
        if rule == "youden":
            fpr, tpr, thr = binary_roc(p, t)
            best = int(torch.argmax(tpr - fpr))
            out[c] = float(thr[best].clamp(0, 1))
        elif rule == "f1":
            cands = torch.unique(p)
            pred = p[None, :] >= cands[:, None]
            tp = (pred & (t[None, :] == 1)).sum(1).float()
            f1 = 2 * tp / (pred.sum(1) + t.sum() + 1e-9)
            out[c] = float(cands[int(torch.argmax(f1))])
        else:
            raise ValueError(f"unknown threshold rule {rule!r}; use youden or f1")
    return out


def sensitivity_specificity(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor) -> dict:
    """Per class: sensitivity and specificity at the given thresholds (None where undefined)."""
    pred = probs >= thresholds[None, :]
    t = targets.bool()
    out = {}
    for c, name in enumerate(LABELS[: probs.shape[1]]):
        pos, neg = int(t[:, c].sum()), int((~t[:, c]).sum())
        sens = float((pred[:, c] & t[:, c]).sum() / pos) if pos else None
        spec = float((~pred[:, c] & ~t[:, c]).sum() / neg) if neg else None
        out[name] = {"threshold": float(thresholds[c]), "sensitivity": sens, "specificity": spec,
                     "positives": pos}
    return out
