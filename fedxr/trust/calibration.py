"""Per-finding Platt scaling (a temperature and a bias on each logit), expected calibration error, reliability plots.

Why Platt and not a temperature alone or isotonic regression: fedxr trains with positive-class weights
(``pos_weight`` = negatives / positives), which shifts every logit upwards by roughly log(pos_weight) — a
temperature cannot undo a shift, a bias can. Isotonic regression needs many positives per finding (a
validation split often has 10–50 for a rare finding), turns scores into steps (ties that change the AUROC)
and is not a function the edge runtime can apply from two numbers. Platt's map ``sigmoid(a·z + b)`` with
``a > 0`` keeps every ranking (AUROCs unchanged) and travels as two floats per finding.
"""

from __future__ import annotations

import numpy as np

#: A finding needs this many known validation positives and negatives to be calibrated; fewer keep a = 1, b = 0.
MIN_CALIBRATION_CASES = 5
ECE_BINS = 15


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def fit_platt(z: np.ndarray, y: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """(a, b) minimising the log loss of ``sigmoid(a z + b)`` on one finding's known labels, by Newton's method
    with Platt's smoothed targets ((N+ + 1)/(N+ + 2), 1/(N− + 2)) so that a separable split stays finite."""
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    pos, neg = float((y == 1).sum()), float((y == 0).sum())
    t = np.where(y == 1, (pos + 1) / (pos + 2), 1 / (neg + 2))

    def loss(a: float, b: float) -> float:
        u = a * z + b  # log(1 + e^u) - t·u, written without overflow
        return float(np.sum(np.logaddexp(0, u) - t * u))

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(iterations):
        p = _sigmoid(a * z + b)
        w = p * (1 - p) + 1e-12
        g = np.array([np.sum((p - t) * z), np.sum(p - t)])
        h = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        scale = 1.0  # backtracking: a full Newton step can overshoot where the sigmoid saturates
        while scale > 1e-6 and loss(a - scale * step[0], b - scale * step[1]) > current:
            scale /= 2
        a, b = a - scale * step[0], b - scale * step[1]
        new = loss(a, b)
        if abs(current - new) < 1e-10 * max(1.0, abs(current)) or np.abs(scale * step).max() < 1e-9:
            break
        current = new
    if not np.isfinite(a) or a <= 0:  # a scorer that ranks backwards on validation: leave it as it is
        return 1.0, 0.0
    return float(a), float(b)


def fit_calibration(logits: np.ndarray, targets: np.ndarray, labels: list[str]) -> dict:
    """Per finding ``{"a", "b", "calibrated"}`` fitted on validation logits; unknown labels (NaN) are left out."""
    a_s: list[float] = []
    b_s: list[float] = []
    calibrated: list[bool] = []
    for c, _ in enumerate(labels):
        known = ~np.isnan(targets[:, c])
        y = targets[known, c]
        if (y == 1).sum() >= MIN_CALIBRATION_CASES and (y == 0).sum() >= MIN_CALIBRATION_CASES:
            a, b = fit_platt(logits[known, c], y)
            done = (a, b) != (1.0, 0.0)
        else:
            a, b, done = 1.0, 0.0, False
        a_s.append(round(a, 6))
        b_s.append(round(b, 6))
        calibrated.append(done)
    return {"method": "platt", "a": a_s, "b": b_s, "calibrated": calibrated}


def apply_calibration(logits: np.ndarray, calibration: dict | None) -> np.ndarray:
    """Calibrated probabilities (N, C) from logits; plain sigmoid without a calibration."""
    if not calibration:
        return _sigmoid(np.asarray(logits, np.float64))
    return _sigmoid(np.asarray(logits, np.float64) * np.asarray(calibration["a"]) + np.asarray(calibration["b"]))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """ECE of one finding over its known labels: the image-weighted mean |observed rate − mean probability| over
    equal-width probability bins. None without known labels."""
    known = ~np.isnan(y)
    p, y = np.asarray(probs)[known], np.asarray(y)[known]
    if not len(p):
        return None
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() * abs(y[sel].mean() - p[sel].mean())
    return float(total / len(p))


def reliability_curve(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean probability, observed rate, images) per non-empty bin over the known labels."""
    known = ~np.isnan(y)
    p, y = np.asarray(probs)[known], np.asarray(y)[known]
    idx = np.minimum((p * bins).astype(int), bins - 1)
    rows = [(p[idx == b].mean(), y[idx == b].mean(), int((idx == b).sum())) for b in range(bins) if (idx == b).any()]
    if not rows:
        return np.zeros(0), np.zeros(0), np.zeros(0, int)
    m, o, n = zip(*rows)
    return np.array(m), np.array(o), np.array(n)


def ece_table(logits: np.ndarray, targets: np.ndarray, calibration: dict, labels: list[str],
              counted: list[str]) -> dict:
    """Per finding ECE before and after calibration, and their macro means over ``counted`` findings."""
    raw, cal = apply_calibration(logits, None), apply_calibration(logits, calibration)
    per = {name: {"before": expected_calibration_error(raw[:, c], targets[:, c]),
                  "after": expected_calibration_error(cal[:, c], targets[:, c])} for c, name in enumerate(labels)}
    use = [c for c in counted if per[c]["before"] is not None]
    macro = {k: (float(np.mean([per[c][k] for c in use])) if use else None) for k in ("before", "after")}
    return {"per_finding": per, "macro_before": macro["before"], "macro_after": macro["after"], "findings": use,
            "bins": ECE_BINS, "images": int(len(logits))}


def plot_reliability(logits: np.ndarray, targets: np.ndarray, calibration: dict, labels: list[str], path,
                     title: str) -> None:
    """One panel per finding: observed positive rate against predicted probability, before and after."""
    from fedxr.plots import saved_figure

    raw, cal = apply_calibration(logits, None), apply_calibration(logits, calibration)
    with saved_figure(path, dpi=80, nrows=4, ncols=4, figsize=(12, 12)) as (fig, axes):
        for c, (ax, name) in enumerate(zip(axes.flat, labels)):
            ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
            for probs, colour, tag in ((raw, "tab:red", "before"), (cal, "tab:blue", "after")):
                m, o, _ = reliability_curve(probs[:, c], targets[:, c])
                e = expected_calibration_error(probs[:, c], targets[:, c])
                if len(m):
                    ax.plot(m, o, marker="o", ms=3, c=colour, lw=1.2, label=f"{tag} ECE {e:.3f}")
            ax.set_title(name, fontsize=9)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7, loc="upper left")
        for ax in list(axes.flat)[len(labels):]:
            ax.axis("off")
        fig.suptitle(title)
