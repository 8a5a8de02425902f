"""Multi-label metrics and decision thresholds. Pure: tensors in, numbers out.

A class whose split has no positives (or no negatives) has no AUROC; it is reported as ``None`` and left
out of the macro average, and the note says so — never a crash or a NaN in the macro.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_average_precision, binary_auroc, binary_roc

from fedxr.labels import LABELS


def defined_classes(targets: torch.Tensor) -> torch.Tensor:
    """(C,) bool: classes with at least one positive and one negative."""
    pos = targets.sum(0)
    return (pos > 0) & (pos < targets.shape[0])


def multilabel_scores(probs: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-class and macro AUROC / average precision. probs, targets: (N, C)."""
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
    kept = [v for v in auroc.values() if v is not None]
    kept_ap = [v for v in ap.values() if v is not None]
    excluded = [n for n, v in auroc.items() if v is None]
    return {
        "macro_auroc": sum(kept) / len(kept) if kept else float("nan"),
        "macro_ap": sum(kept_ap) / len(kept_ap) if kept_ap else float("nan"),
        "auroc": auroc,
        "ap": ap,
        "excluded": excluded,
        "note": (f"excluded from the macro (no positives or no negatives in this split): {', '.join(excluded)}"
                 if excluded else ""),
        "n": int(targets.shape[0]),
    }


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
