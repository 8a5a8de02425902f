"""Operating points a clinician can read: per finding, the threshold chosen on validation for a named rule, the
sensitivity and specificity it gave there (Wilson 95 % intervals), and whether the finding can be trusted at all."""

from __future__ import annotations

import math
import re

import numpy as np

#: A finding needs this many known validation positives and negatives for its operating point to mean anything.
MIN_OPERATING_CASES = 10
_RULE = re.compile(r"^(youden|(sensitivity|specificity):(0?\.\d+|1(\.0*)?))$")


def parse_rule(rule: str) -> tuple[str, float | None]:
    """``youden`` | ``sensitivity:0.90`` | ``specificity:0.95`` → (kind, target)."""
    m = _RULE.match(str(rule).strip())
    if not m:
        raise ValueError(f"unknown operating point {rule!r}; use youden, sensitivity:0.90 or specificity:0.95")
    return (m.group(2), float(m.group(3))) if m.group(2) else ("youden", None)


def describe_rule(rule: str) -> str:
    kind, target = parse_rule(rule)
    return "Youden's J (sensitivity + specificity − 1 largest)" if kind == "youden" else f"{target:.0%} {kind}"


def wilson(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    """Wilson score 95 % interval of a proportion (well-behaved at 0 %, 100 % and small n)."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def threshold_for(p: np.ndarray, y: np.ndarray, kind: str, target: float | None) -> float:
    """One finding's threshold for a rule (``p >= t`` is a positive call): the same rule at export (operating
    points) and in evaluation (a one-class site read at a fixed validation specificity)."""
    pos, neg = np.sort(p[y == 1])[::-1], np.sort(p[y == 0])
    if kind == "sensitivity":
        assert target is not None, "a sensitivity rule has a target (parse_rule gives one)"
        # The highest threshold that still calls ceil(target × positives) of the positives: sensitivity >= target.
        return float(pos[max(0, math.ceil(target * len(pos)) - 1)])
    if kind == "specificity":
        # The lowest threshold above floor-enough negatives: specificity >= target. The next value in the scores'
        # own dtype: a float64 neighbour of a float32 score rounds back onto it when stored as float32.
        assert target is not None, "a specificity rule has a target (parse_rule gives one)"
        k = math.ceil(target * len(neg))
        return float(np.nextafter(neg[k - 1], neg.dtype.type(np.inf))) if k > 0 else float(neg[0])
    # Youden's J: fedxr's one rule for it (fedxr.models.metrics, torch; imported here so the edge, which reads
    # rules only, stays torch-free).
    import torch

    from fedxr.models.metrics import choose_thresholds

    return float(choose_thresholds(torch.from_numpy(p[:, None]), torch.from_numpy(y[:, None]))[0])


def operating_points(probs: np.ndarray, targets: np.ndarray, labels: list[str], rule: str,
                     auroc_ci: dict[str, list[float] | None] | None = None, trained: list[str] | None = None) -> list[dict]:
    """Per finding: threshold (in the probabilities given — calibrated ones at export), the validation
    sensitivity/specificity it gives with intervals, and ``reliable`` with ``why`` when not. ``auroc_ci``: a
    95 % AUROC interval per finding (an interval that includes 0.5 makes the finding unreliable)."""
    kind, target = parse_rule(rule)
    out = []
    for c, name in enumerate(labels):
        known = ~np.isnan(targets[:, c])
        p, y = probs[known, c], targets[known, c]
        npos, nneg = int((y == 1).sum()), int((y == 0).sum())
        point = {"label": name, "rule": rule, "positives": npos, "negatives": nneg, "reliable": True, "why": None}
        if trained is not None and name not in trained:
            point.update(threshold=1.0, sensitivity=None, specificity=None, reliable=False,
                         why="never trained: no site labelled it")
        elif npos < MIN_OPERATING_CASES or nneg < MIN_OPERATING_CASES:
            point.update(threshold=1.0, sensitivity=None, specificity=None, reliable=False,
                         why=f"too few known validation cases ({npos} positive, {nneg} negative; needs "
                             f"{MIN_OPERATING_CASES} of each)")
        else:
            t = threshold_for(p, y, kind, target)
            tp, tn = int(((p >= t) & (y == 1)).sum()), int(((p < t) & (y == 0)).sum())
            sensitivity_ci, specificity_ci = wilson(tp, npos), wilson(tn, nneg)
            assert sensitivity_ci is not None and specificity_ci is not None  # npos, nneg >= MIN_OPERATING_CASES > 0
            point.update(threshold=t, sensitivity=[round(tp / npos, 4), *sensitivity_ci],
                         specificity=[round(tn / nneg, 4), *specificity_ci])
            ci = (auroc_ci or {}).get(name)
            if ci is not None and ci[0] <= 0.5:
                point.update(reliable=False, why=f"its AUROC interval ({ci[0]:.2f}-{ci[1]:.2f}) includes 0.5: "
                                                 "no better than chance")
        out.append(point)
    return out
