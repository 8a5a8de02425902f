"""Fit everything :mod:`fedxr.trust` exports from a checkpoint and its run's site manifests.

Each site computes its own statistics — the feature sums of its training images (OOD), the logits and labels of
its validation images (calibration, operating points, the OOD threshold) — and only those leave it; the
coordinator combines them (:func:`combine`). In the simulator every site's manifest is on this machine and the
same function runs for each in turn; in a deployment a site runs :func:`site_statistics` on its own manifest.
The test split is read for reporting only (the model card and the README's figures): nothing is chosen on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedxr.data.manifest import read_manifest
from fedxr.errors import FedxrError
from fedxr.labels import LABELS, NO_FINDING
from fedxr.trust import calibration as cal
from fedxr.trust import ood as O
from fedxr.trust.operating import operating_points

#: Images per split (all sites together) the fit reads at most; sites share it evenly.
DEFAULT_MAX_IMAGES = 2000


@dataclass
class SplitOutputs:
    stages: list[np.ndarray]  # per stage (N, 2C): channel means and standard deviations (the OOD score's input)
    logits: np.ndarray
    targets: np.ndarray
    normal: np.ndarray  # No Finding per image (NaN unknown): normal vs abnormal in the card


@torch.no_grad()
def run_network(net, prep, paths: list[str], batch: int = 64, progress: str | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """(per-stage statistics, logits) of a registry network on image files, in batches; an empty list of
    stages for no images."""
    from tqdm.auto import tqdm

    net.eval()
    stats, logits = [], []
    for i in tqdm(range(0, len(paths), batch), desc=progress, disable=progress is None, leave=False):
        x = torch.from_numpy(prep.batch([prep.load(p) for p in paths[i:i + batch]]))
        f, z = O.stage_statistics(net, x)
        stats.append([t.double().numpy() for t in f])
        logits.append(z.float().numpy())
    if not stats:
        return [], np.zeros((0, len(LABELS)), np.float32)
    return [np.concatenate([b[k] for b in stats]) for k in range(len(stats[0]))], np.concatenate(logits)


def site_statistics(net, prep, manifest: Path, per_split: int, seed: int = 0, progress: bool = True) -> dict:
    """One site's share: training feature sums (OOD), validation and test outputs (at most ``per_split`` each)."""
    rows = read_manifest(manifest)
    out: dict[str, Any] = {}  # SplitOutputs per split, and the training feature sums
    for split in ("train", "val", "test"):
        part = rows[rows["split"] == split]
        if len(part) > per_split:
            part = part.sample(per_split, random_state=seed).sort_index()
        f, z = run_network(net, prep, list(part["path"]), progress=f"{manifest.stem} {split}" if progress else None)
        normal = part[NO_FINDING].to_numpy(float) if NO_FINDING in part else np.full(len(part), np.nan)
        out[split] = SplitOutputs(f, z, part[list(LABELS)].to_numpy(np.float64), normal)
    out["train_sums"] = [O.site_feature_sums(f) for f in out["train"].stages]
    return out


def _cat(parts: list[SplitOutputs]) -> SplitOutputs:
    parts = [p for p in parts if len(p.logits)]
    if not parts:
        return SplitOutputs([], np.zeros((0, len(LABELS))), np.zeros((0, len(LABELS))), np.zeros(0))
    stages = [np.concatenate([p.stages[k] for p in parts]) for k in range(len(parts[0].stages))]
    return SplitOutputs(stages, *(np.concatenate([getattr(p, k) for p in parts]) for k in ("logits", "targets", "normal")))


def _auroc_ci(probs: np.ndarray, targets: np.ndarray, min_cases: int = 10) -> dict[str, list[float] | None]:
    from fedxr.evaluation import BOOTSTRAP_RESAMPLES
    from fedxr.models.metrics import bootstrap_macro_auroc, interval

    out: dict[str, list[float] | None] = {}
    for c, name in enumerate(LABELS):
        y = targets[:, c]
        if (y == 1).sum() >= min_cases and (y == 0).sum() >= min_cases:
            out[name] = [round(v, 4) for v in interval(bootstrap_macro_auroc([probs], targets, [name], BOOTSTRAP_RESAMPLES)[0])]
        else:
            out[name] = None
    return out


def _flagged(scores: np.ndarray, threshold: float) -> float | None:
    return round(float((scores > threshold).mean()), 4) if len(scores) else None


def combine(ckpt: dict, sites: dict[str, dict], rule: str, quantile: float) -> dict:
    """The trust fit from every site's statistics: ``{"ood", "calibration", "operating_points", "report"}``."""
    from fedxr.evaluation import _site_scores
    from fedxr.models.metrics import MIN_TEST_POSITIVES

    trained = (ckpt.get("trained_on") or {}).get("trained_labels")
    val = _cat([s["val"] for s in sites.values()])
    test = _cat([s["test"] for s in sites.values()])
    if not len(val.logits):
        raise FedxrError("no validation images at any site: calibration, operating points and the OOD threshold "
                         "are chosen on validation data; give each site a val split (data.val_fraction > 0)")
    # Out-of-distribution: per stage, Gaussians from the sites' training sums; scales and threshold on validation.
    trained_sites = [s["train_sums"] for s in sites.values() if s["train_sums"] and s["train_sums"][0]["n"] > 1]
    if not trained_sites:
        raise ValueError("no site has two or more training images to fit the out-of-distribution score on")
    fitted = O.fit_stages(trained_sites, val.stages, quantile)
    val_d = O.scores(val.stages, fitted)
    threshold = float(np.quantile(val_d, quantile))
    test_d = O.scores(test.stages, fitted) if len(test.logits) else np.zeros(0)
    ood = {**fitted, "threshold": round(threshold, 6), "quantile": quantile, "images": sum(s[0]["n"] for s in trained_sites),
           "method": ("Mahalanobis distance of per-stage channel means and standard deviations, and of the input's "
                      "texture and intensity statistics and of its coarse layout, to the nearest site (the largest of "
                      f"the network stages' mean and the image's two; {len(fitted['stages']) - O.IMAGE_STAGES} network "
                      f"stages, one Gaussian per site, shared covariance shrunk by {O.SHRINKAGE})"),
           "val_flagged": _flagged(val_d, threshold), "test_flagged": _flagged(test_d, threshold),
           "test_flagged_per_site": {name: _flagged(O.scores(s["test"].stages, fitted), threshold)
                                     for name, s in sites.items() if len(s["test"].logits)}}
    # Calibration on validation; ECE before and after on validation and (reported only) on test.
    calibration = cal.fit_calibration(val.logits, val.targets, list(LABELS))
    counted = lambda t: [c for i, c in enumerate(LABELS) if (t[:, i] == 1).sum() >= MIN_TEST_POSITIVES  # noqa: E731
                         and (t[:, i] == 0).sum() >= MIN_TEST_POSITIVES]
    ece = {"val": cal.ece_table(val.logits, val.targets, calibration, list(LABELS), counted(val.targets))}
    if len(test.logits):
        ece["test"] = cal.ece_table(test.logits, test.targets, calibration, list(LABELS), counted(test.targets))
    val_p = cal.apply_calibration(val.logits, calibration)
    test_p = cal.apply_calibration(test.logits, calibration) if len(test.logits) else None
    # A finding is unreliable when its AUROC interval includes 0.5: on test where the test split can score it.
    ci_val = _auroc_ci(val_p, val.targets)
    ci_test = _auroc_ci(test_p, test.targets) if test_p is not None else {}
    ci = {c: ci_test.get(c) or ci_val.get(c) for c in LABELS}
    points = operating_points(val_p, val.targets, list(LABELS), rule, auroc_ci=ci, trained=trained)
    report = {"rule": rule, "auroc_ci95": ci, "auroc_ci95_source": {c: ("test" if ci_test.get(c) else "val") for c in LABELS},
              "ece": ece, "images": {"train": int(ood["images"]), "val": int(len(val.logits)), "test": int(len(test.logits))}}
    if test_p is not None:
        thresholds = torch.tensor([p["threshold"] for p in points], dtype=torch.float32)
        per_site = {}
        for name, s in sites.items():
            if len(s["test"].logits):
                probs = torch.from_numpy(cal.apply_calibration(s["test"].logits, calibration)).float()
                per_site[name] = _site_scores(probs, torch.from_numpy(s["test"].targets).float(), s["test"].normal,
                                              thresholds, trained or list(LABELS))
        pooled = _site_scores(torch.from_numpy(test_p).float(), torch.from_numpy(test.targets).float(), test.normal,
                              thresholds, trained or list(LABELS))
        report["test"] = {"per_site": per_site, "pooled": pooled}
    report["_curves"] = {"val": (val.logits, val.targets), "test": (test.logits, test.targets) if len(test.logits) else None,
                         "val_distances": val_d, "test_distances": test_d}
    return {"ood": ood, "calibration": calibration, "operating_points": points, "report": report}


def fit_trust(net, ckpt: dict, data: str | Path, rule: str = "youden", quantile: float = O.DEFAULT_QUANTILE,
              max_images: int = DEFAULT_MAX_IMAGES, progress: bool = True) -> dict:
    """Run every site's share on its manifest, then :func:`combine`."""
    data = Path(data)
    manifests = [data] if data.is_file() else sorted(data.glob("site-*.csv"))
    if not manifests:
        raise FedxrError(f"{data}: no site manifests to fit calibration and the OOD score on; pass --data SITES_DIR")
    per_split = max(1, max_images // len(manifests))
    sites = {m.stem: site_statistics(net, ckpt["preprocessing"], m, per_split, progress=progress) for m in manifests}
    return combine(ckpt, sites, rule, quantile)


def metadata_of(trust: dict) -> dict:
    """The JSON the exported file carries (``fedxr.calibration``, ``fedxr.operating_points``, ``fedxr.ood``)."""
    o = trust["ood"]
    return {
        "calibration": trust["calibration"],
        "operating_points": [{k: p[k] for k in ("label", "rule", "threshold", "sensitivity", "specificity", "reliable", "why")}
                             for p in trust["operating_points"]],
        "ood": {"output": O.OOD_OUTPUT, "threshold": o["threshold"], "quantile": o["quantile"], "method": o["method"],
                "val_flagged": o["val_flagged"], "test_flagged": o["test_flagged"]},
    }


def write_trust_files(out: Path, trust: dict, title: str) -> dict:
    """reliability.png and ood_scores.png beside the model; returns the JSON-safe report for the manifest."""
    from fedxr.plots import saved_figure

    curves = trust["report"]["_curves"]
    logits, targets = curves["test"] if curves["test"] is not None else curves["val"]
    split = "test" if curves["test"] is not None else "validation"
    cal.plot_reliability(logits, targets, trust["calibration"], list(LABELS), out / "reliability.png",
                         f"{title}: calibration on {split} (red before, blue after Platt scaling fitted on validation)")
    with saved_figure(out / "ood_scores.png", dpi=90, figsize=(7, 4)) as (fig, ax):
        both = np.concatenate([curves["val_distances"], curves["test_distances"]])
        bins = np.linspace(0, max(float(both.max()) if len(both) else 1.0, trust["ood"]["threshold"] * 1.5), 50)
        ax.hist(curves["val_distances"], bins=bins, alpha=0.6, label="validation", density=True)
        if len(curves["test_distances"]):
            ax.hist(curves["test_distances"], bins=bins, alpha=0.6, label="test", density=True)
        ax.axvline(trust["ood"]["threshold"], c="k", ls="--", label=f"threshold {trust['ood']['threshold']:.2f}")
        ax.set_xlabel("OOD score: mean over stages of the distance to the nearest site (1 = edge of validation)")
        ax.legend()
        ax.set_title(f"{title}: out-of-distribution score")
    report = {k: v for k, v in trust["report"].items() if not k.startswith("_")}
    ood = {k: v for k, v in trust["ood"].items() if k != "stages"}
    ood["stages"] = [{"dim": st["dim"], "scale": st["scale"], "sites": int(len(st["means"]))} for st in trust["ood"]["stages"]]
    return {**report, "ood": ood, "calibration": trust["calibration"], "operating_points": trust["operating_points"]}
