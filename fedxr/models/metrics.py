"""Multi-label metrics and decision thresholds. Pure: tensors in, numbers out.

Targets are 1 (present), 0 (absent) or NaN (unknown: the image's source never labelled that finding).
Every metric of a class counts only the images whose label for that class is known. A class without
known positives or negatives has no AUROC; it is reported as ``None`` and left out of the macro average,
and the note says so — never a crash or a NaN in the macro.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchmetrics.functional.classification import binary_average_precision, binary_auroc, binary_roc

from fedxr.labels import LABELS


def known_mask(targets: torch.Tensor) -> torch.Tensor:
    """(N, C) bool: the labels that are known (not NaN)."""
    return ~torch.isnan(targets.float())


def class_counts(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Known positives and known negatives per class, each (C,) int."""
    t = targets.float()
    return (t == 1).sum(0), (t == 0).sum(0)


def defined_classes(targets: torch.Tensor) -> torch.Tensor:
    """(C,) bool: classes with at least one known positive and one known negative."""
    pos, neg = class_counts(targets)
    return (pos > 0) & (neg > 0)


def _known_column(probs: torch.Tensor, targets: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and integer labels of class ``c`` over the images where its label is known."""
    keep = ~torch.isnan(targets[:, c].float())
    return probs[keep, c].float(), targets[keep, c].int()


#: A test-set AUROC is shown, and counted in the headline macro, only for a class with at least this many
#: known positives and known negatives: with 2-7 of either a class's AUROC swings by ±0.2 between equally good models.
MIN_TEST_POSITIVES = 10


def multilabel_scores(probs: torch.Tensor, targets: torch.Tensor, min_positives: int = 1) -> dict:
    """Per-class and macro AUROC / average precision. probs, targets: (N, C); targets may hold NaN (unknown).

    ``macro_auroc`` averages the classes with at least ``min_positives`` known positives and as many known
    negatives; ``macro_auroc_all`` every class with both. ``counted`` names the classes in ``macro_auroc``;
    ``unknown`` names the classes no image of this split has a known label for.
    """
    targets = targets.float()
    valid = defined_classes(targets)
    pos_t, neg_t = class_counts(targets)
    known_t = known_mask(targets).sum(0)
    names = list(LABELS[: probs.shape[1]])
    auroc: dict[str, float | None] = {}
    ap: dict[str, float | None] = {}
    for c, name in enumerate(names):
        if valid[c]:
            p, t = _known_column(probs, targets, c)
            auroc[name] = float(binary_auroc(p, t))
            ap[name] = float(binary_average_precision(p, t))
        else:
            auroc[name] = ap[name] = None
    positives = [int(v) for v in pos_t.tolist()]
    negatives = [int(v) for v in neg_t.tolist()]
    # The classes with a score (AP is defined exactly where AUROC is).
    defined_auroc = {n: v for n, v in auroc.items() if v is not None}
    defined_ap = {n: v for n, v in ap.items() if v is not None}
    defined = list(defined_auroc)
    counted = [n for n, p, q in zip(names, positives, negatives)
               if n in defined and p >= min_positives and q >= min_positives]
    kept_all = list(defined_auroc.values())
    unknown = [n for n, k in zip(names, known_t.tolist()) if k == 0]
    excluded = [n for n, v in auroc.items() if v is None]
    too_few = [n for n in defined if n not in counted]
    notes = []
    if unknown:
        notes.append(f"no known label in this split: {', '.join(unknown)}")
    one_class = [n for n in excluded if n not in unknown]
    if one_class:
        notes.append(f"excluded from the macro (no known positives or no known negatives): {', '.join(one_class)}")
    if too_few and counted:
        notes.append(f"too few known positives or negatives (< {min_positives}) to count in the macro: {', '.join(too_few)}")
    elif too_few:
        # A toy split: no class reaches the minimum. Average what there is rather than report nothing.
        counted, too_few = defined, []
        notes.append(f"no class has {min_positives} positives and negatives: the macro averages every class with both (unstable)")
    return {
        "macro_auroc": sum(defined_auroc[n] for n in counted) / len(counted) if counted else float("nan"),
        "macro_auroc_all": sum(kept_all) / len(kept_all) if kept_all else float("nan"),
        "macro_ap": sum(defined_ap[n] for n in counted) / len(counted) if counted else float("nan"),
        "auroc": auroc,
        "ap": ap,
        "counted": counted,
        "min_positives": min_positives,
        "positives": dict(zip(names, positives)),
        "negatives": dict(zip(names, negatives)),
        "known": dict(zip(names, [int(v) for v in known_t.tolist()])),
        "unknown": unknown,
        "excluded": excluded,
        "note": "; ".join(notes),
        "n": int(targets.shape[0]),
    }


def batched_auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each row (Mann-Whitney U / (n+ n-)): scores, labels (B, n) -> (B,); NaN without both classes.

    Labels may be NaN (unknown): those entries are left out. They are ranked below every known score
    (score −inf), so each known entry's rank is its rank among the known ones plus the row's unknown count,
    which is subtracted again.
    """
    labels = np.asarray(labels, dtype=np.float64)
    unknown = np.isnan(labels)
    positive = labels == 1
    pos = positive.sum(1)
    neg = (labels == 0).sum(1)
    n_unknown = unknown.sum(1)
    from scipy.stats import rankdata

    ranked = rankdata(np.where(unknown, -np.inf, scores), axis=1)  # ties share their average rank
    rank_sum = np.where(positive, ranked, 0.0).sum(1) - pos * n_unknown
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((pos > 0) & (neg > 0), (rank_sum - pos * (pos + 1) / 2) / (pos * neg), np.nan)


def bootstrap_macro_auroc(probs: list[np.ndarray], targets: np.ndarray, classes: list[str],
                          resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Macro AUROC over ``classes`` for each model in ``probs`` on ``resamples`` bootstrap resamples of the
    images (the same resamples for every model, so differences between models are paired).
    Returns (models, resamples). A class without known positives or negatives in a resample is left out of that
    resample's mean; unknown labels (NaN) are left out of their class's AUROC.
    """
    idx_cls = [LABELS.index(c) for c in classes]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(targets), size=(resamples, len(targets)))
    out = np.zeros((len(probs), resamples))
    targets = np.asarray(targets, dtype=np.float64)
    for m, p in enumerate(probs):
        per_class = np.stack([batched_auroc(p[draws, c], targets[draws, c]) for c in idx_cls])  # (C, B)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no class is defined
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
    Only images whose label is known count; classes without known positives and negatives keep 0.5.
    """
    targets = targets.float()
    out = torch.full((probs.shape[1],), 0.5)
    valid = defined_classes(targets)
    for c in range(probs.shape[1]):
        if not valid[c]:
            continue
        p, t = _known_column(probs, targets, c)
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
    """Per class: sensitivity and specificity at the given thresholds over the images whose label is known
    (None where undefined)."""
    pred = probs >= thresholds[None, :]
    targets = targets.float()
    is_pos, is_neg = targets == 1, targets == 0
    out = {}
    for c, name in enumerate(LABELS[: probs.shape[1]]):
        pos, neg = int(is_pos[:, c].sum()), int(is_neg[:, c].sum())
        sens = float((pred[:, c] & is_pos[:, c]).sum() / pos) if pos else None
        spec = float((~pred[:, c] & is_neg[:, c]).sum() / neg) if neg else None
        out[name] = {"threshold": float(thresholds[c]), "sensitivity": sens, "specificity": spec,
                     "positives": pos, "negatives": neg}
    return out
