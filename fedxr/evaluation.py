"""`fedxr evaluate`: score a checkpoint on a split of site manifests; metrics.json and ROC curves."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedxr.artifacts import EvalResult
from fedxr.data.atomic import write_json_atomic
from fedxr.data.datamodule import SiteDataModule
from fedxr.defaults import CACHE_DIR
from fedxr.data.manifest import site_manifest_paths
from fedxr.errors import FedxrError
from fedxr.labels import LABELS
from fedxr.models.checkpoint import model_from_checkpoint
from fedxr.models.metrics import (MIN_TEST_POSITIVES, bootstrap_macro_auroc, interval, multilabel_scores,
                                  sensitivity_specificity)
from fedxr.trust.operating import threshold_for
from fedxr.plots import saved_figure

#: Bootstrap resamples of the images for the 95 % interval of a macro AUROC (seeded: same interval every run).
BOOTSTRAP_RESAMPLES = 1000
PREDICTIONS_FILE = "predictions.npz"
#: Where a site's test split holds one class only (a COVID cohort), its sensitivity is also read at the threshold
#: that leaves this share of all sites' validation negatives below it: the same rule for every model, so a model
#: that calls every film positive (all a site with positives only can learn) does not get its sensitivity free.
OPERATING_SPECIFICITY = 0.90


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid probabilities and targets, both (N, 14), for every batch of a loader."""
    model.eval()
    probs, targets = [], []
    for x, y in loader:
        probs.append(torch.sigmoid(model(x).float()))
        targets.append(y)
    return torch.cat(probs), torch.cat(targets)


def manifests_of(data: str | Path) -> list[Path]:
    data = Path(data)
    if data.is_file() and data.suffix == ".csv":
        return [data]
    if data.is_dir():
        return list(site_manifest_paths(data).values())
    raise FedxrError(f"{data}: expected a site manifest (site-N.csv) or a folder of them (from `fedxr data split`)")


def plot_roc(probs: torch.Tensor, targets: torch.Tensor, scores: dict, path: Path, title: str) -> None:
    from torchmetrics.functional.classification import binary_roc

    with saved_figure(path, dpi=90, nrows=4, ncols=4, figsize=(12, 12)) as (fig, axes):
        for c, (ax, name) in enumerate(zip(axes.flat, LABELS)):
            auc = scores["auroc"][name]
            if auc is not None:
                keep = ~torch.isnan(targets[:, c])  # unknown labels are not part of a curve
                fpr, tpr, _ = binary_roc(probs[keep, c], targets[keep, c].int())
                ax.plot(fpr.numpy(), tpr.numpy(), lw=1.5)
            ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
            if auc is None:
                heading = f"{name}\n(no positives)"
            elif name in scores["counted"]:
                heading = f"{name}\nAUROC {auc:.3f}"
            else:
                heading = f"{name}\n{scores['positives'][name]} positives: too few"
            ax.set_title(heading, fontsize=9)
            ax.set_xticks([0, 0.5, 1])
            ax.set_yticks([0, 0.5, 1])
        for ax in list(axes.flat)[len(LABELS):]:
            ax.axis("off")
        fig.suptitle(f"{title} — macro AUROC {scores['macro_auroc']:.3f}")


def evaluate_checkpoint(ckpt_path: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
                        batch_size: int = 64, num_workers: int = 0, cache_dir: str | Path = CACHE_DIR,
                        progress: bool = True) -> EvalResult:
    """Per-class AUROC/AP, macro AUROC and sensitivity/specificity at the checkpoint's thresholds; written to
    ``out/metrics.json`` (default: beside the checkpoint, ``eval_SPLIT``)."""
    model, ckpt = model_from_checkpoint(ckpt_path)
    dm = SiteDataModule(manifests_of(data), ckpt["preprocessing"], batch_size=batch_size, num_workers=num_workers,
                        augment=False, cache_dir=cache_dir, progress=progress)
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}.get(split)
    if loader is None:
        raise FedxrError(f"unknown --split {split!r}; use train, val or test")
    probs, targets = predict(model, loader())
    scores = multilabel_scores(probs, targets, min_positives=MIN_TEST_POSITIVES)
    thresholds = torch.tensor(ckpt["thresholds"])
    samples = bootstrap_macro_auroc([probs.numpy()], targets.numpy(), scores["counted"], BOOTSTRAP_RESAMPLES)[0]
    out = Path(out) if out else Path(ckpt_path).parent / f"eval_{split}"
    result = EvalResult(
        checkpoint=str(ckpt_path), model_name=ckpt["model_name"], image_size=ckpt["preprocessing"].size,
        split=split, data=str(data),
        images=scores["n"], macro_auroc=scores["macro_auroc"], macro_auroc_ci95=interval(samples),
        macro_auroc_all=scores["macro_auroc_all"], macro_ap=scores["macro_ap"],
        counted=scores["counted"], min_positives=MIN_TEST_POSITIVES, positives=scores["positives"],
        bootstrap={"resamples": BOOTSTRAP_RESAMPLES, "seed": 0, "unit": "image"},
        auroc=scores["auroc"], ap=scores["ap"], excluded=scores["excluded"], note=scores["note"],
        at_thresholds=sensitivity_specificity(probs, targets, thresholds),
        # Among the images whose label is known; None where no image's is.
        prevalence={c: (round(scores["positives"][c] / scores["known"][c], 4) if scores["known"][c] else None)
                    for c in LABELS},
        known=scores["known"], unknown=scores["unknown"], out=str(out),
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result.metrics_file, result.to_json())
    # Kept for paired comparisons between models scored on the same images (KD gain, student vs teacher).
    np.savez_compressed(out / PREDICTIONS_FILE, probs=probs.numpy(), targets=targets.numpy())
    plot_roc(probs, targets, scores, out / "roc_curves.png", f"{ckpt['model_name']} on {split}")
    return result


def format_result(result: EvalResult) -> str:
    lo, hi = result.macro_auroc_ci95 or (float("nan"), float("nan"))
    fmt = lambda v: f"{v:.3f}" if v is not None else "  -  "  # noqa: E731
    fmt4 = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    counted = result.counted if result.counted is not None else list(LABELS)
    lines = [f"{result.model_name} on {result.split} ({result.images} images): "
             f"macro AUROC {fmt4(result.macro_auroc)} (95 % CI {lo:.3f}-{hi:.3f}, {len(counted)} classes "
             f"with >= {result.min_positives} positives), macro AP {fmt4(result.macro_ap)}",
             f"{'finding':<20}{'AUROC':>8}{'AP':>8}{'thresh':>8}{'sens':>7}{'spec':>7}{'pos':>6}"]
    for name in LABELS:
        t = result.at_thresholds[name]
        if name not in counted:
            lines.append(f"{name:<20}{'too few positives':>31}{t['positives']:>21}")
            continue
        lines.append(f"{name:<20}{fmt(result.auroc[name]):>8}{fmt(result.ap[name]):>8}{t['threshold']:>8.3f}"
                     f"{fmt(t['sensitivity']):>7}{fmt(t['specificity']):>7}{t['positives']:>6}")
    if result.note:
        lines.append(result.note)
    lines.append(f"wrote {result.metrics_file} and roc_curves.png")
    return "\n".join(lines)


def _site_scores(probs: torch.Tensor, targets: torch.Tensor, normal: np.ndarray, thresholds: torch.Tensor,
                 trained: list[str] | None,
                 at_specificity: Callable[[], tuple[float, torch.Tensor] | None] | None = None) -> dict:
    """One model on one site's split: macro over known labels with enough known positives and negatives (95 %
    bootstrap interval), per label AUROC or, where the site's split has one class only, sensitivity or
    specificity at the validation threshold (and, given ``at_specificity`` — called only when such a label exists —
    returning (specificity, thresholds), the sensitivity at those thresholds too), and normal-vs-abnormal
    (``No Finding``) AUROC."""
    scores = multilabel_scores(probs, targets, min_positives=MIN_TEST_POSITIVES)
    counted = [c for c in scores["counted"] if scores["positives"][c] >= MIN_TEST_POSITIVES
               and scores["negatives"][c] >= MIN_TEST_POSITIVES]
    out = {"images": scores["n"], "counted": counted, "positives": scores["positives"], "negatives": scores["negatives"],
           "auroc": {c: scores["auroc"][c] for c in counted}, "unknown": scores["unknown"]}
    if counted:
        samples = bootstrap_macro_auroc([probs.numpy()], targets.numpy(), counted, BOOTSTRAP_RESAMPLES)[0]
        out["macro_auroc"] = sum(scores["auroc"][c] for c in counted) / len(counted)
        out["macro_auroc_ci95"] = interval(samples)
        out["per_label_ci95"] = {c: interval(bootstrap_macro_auroc([probs.numpy()], targets.numpy(), [c],
                                                                   BOOTSTRAP_RESAMPLES)[0]) for c in counted}
    else:
        out["macro_auroc"], out["macro_auroc_ci95"] = None, None
    at = sensitivity_specificity(probs, targets, thresholds)
    # A label this site's split knows with enough positives but too few negatives for an AUROC (a COVID cohort:
    # nearly every image Pneumonia) still has a sensitivity at the threshold chosen on validation.
    out["sensitivity_only"] = {c: {"positives": v["positives"], "negatives": v["negatives"], "threshold": v["threshold"],
                                   "sensitivity": v["sensitivity"], "specificity": v["specificity"]}
                               for c, v in at.items() if c not in counted and v["positives"] >= MIN_TEST_POSITIVES}
    spec = at_specificity() if at_specificity is not None and out["sensitivity_only"] else None
    if spec is not None:
        specificity, spec_thresholds = spec
        fixed = sensitivity_specificity(probs, targets, spec_thresholds)
        for c, v in out["sensitivity_only"].items():
            if not np.isnan(fixed[c]["threshold"]):
                v["at_specificity"] = {"validation_specificity": specificity, "threshold": fixed[c]["threshold"],
                                       "sensitivity": fixed[c]["sensitivity"]}
    known = ~np.isnan(normal)
    if trained and known.sum():
        idx = [LABELS.index(c) for c in trained]
        abnormal = probs[:, idx].max(1).values.numpy()  # the most confident finding: how abnormal the film looks
        y = 1.0 - normal[known]
        if 0 < y.sum() < len(y):
            from fedxr.models.metrics import batched_auroc

            auc = float(batched_auroc(abnormal[known][None], y[None])[0])
            draws = np.random.default_rng(0).integers(0, int(known.sum()), size=(BOOTSTRAP_RESAMPLES, int(known.sum())))
            boot = batched_auroc(abnormal[known][draws], y[draws])
            out["abnormal_auroc"] = {"auroc": auc, "ci95": interval(boot[~np.isnan(boot)]),
                                     "normal": int((y == 0).sum()), "abnormal": int(y.sum())}
    return out


#: A model to score within sites: one checkpoint, or one per site (a FedBN federation's: ``{site: checkpoint}``,
#: with ``"*"`` for the sites that have none of their own).
SiteModels = Union[str, Path, Mapping[str, Union[str, Path]]]


def _for_site(spec: SiteModels, site: str) -> str | Path:
    if isinstance(spec, Mapping):
        path = spec.get(site) or spec.get("*")
        if path is None:
            raise FedxrError(f"no model for site {site!r} (per-site models for {', '.join(spec)}; add '*' for the rest)")
        return path
    return spec


def evaluate_sites(checkpoints: Mapping[str, SiteModels], sites_dir: str | Path, split: str = "test",
                   out: str | Path | None = None, cache_dir: str | Path = CACHE_DIR, progress: bool = True,
                   keep_predictions: bool = False, operating_specificity: float | None = OPERATING_SPECIFICITY) -> dict:
    """Within-site figures (the primary ones across hospitals whose case mix differs): every model on each
    site's own ``split``, beside the pooled figure over all sites. A model given per site (:data:`SiteModels`)
    is scored at each site with that site's own model, and pooled over those predictions. Writes
    ``per_site.json``. With ``keep_predictions`` the result also holds ``predictions[site][model] = (probs,
    targets)`` (numpy) for paired comparisons between models on the same images. With ``operating_specificity``
    (test split only) a one-class site's sensitivity is also read at each model's threshold for that specificity
    on every site's validation negatives (:data:`OPERATING_SPECIFICITY`)."""
    from fedxr.data.manifest import site_manifest_paths
    from fedxr.labels import NO_FINDING

    sites = site_manifest_paths(sites_dir)
    cache: dict[str, tuple[nn.Module, dict]] = {}

    def load(path: str | Path) -> tuple[nn.Module, dict]:
        if str(path) not in cache:
            cache[str(path)] = model_from_checkpoint(path)
        return cache[str(path)]

    result: dict = {"split": split, "sites": {}, "pooled": {},
                    "models": {n: ({k: str(v) for k, v in p.items()} if isinstance(p, Mapping) else str(p))
                               for n, p in checkpoints.items()},
                    "note": "within-site figures are primary: a pooled AUROC across hospitals with different case mix "
                            "can reward recognising the hospital rather than the finding"}
    per_site_models = [n for n, p in checkpoints.items() if isinstance(p, Mapping)]
    if per_site_models:
        result["per_site_models"] = per_site_models
    pooled: dict[str, list] = {n: [] for n in checkpoints}
    predictions: dict[str, dict] = {}
    at_spec: dict[str, tuple[float, torch.Tensor] | None] = {}

    def spec_of(path: str | Path) -> Callable[[], tuple[float, torch.Tensor] | None] | None:
        """A model's thresholds at the operating specificity, computed the first time a one-class site needs them."""
        if operating_specificity is None or split != "test":
            return None

        def get() -> tuple[float, torch.Tensor] | None:
            if str(path) not in at_spec:
                t = _validation_thresholds(*load(path), sites, operating_specificity, cache_dir, progress)
                at_spec[str(path)] = None if t is None else (operating_specificity, t)
                result["operating_specificity"] = operating_specificity
            return at_spec[str(path)]
        return get
    for site, manifest in sites.items():
        per_model = {}
        for name, spec in checkpoints.items():
            path = _for_site(spec, site)
            model, ckpt = load(path)
            dm = SiteDataModule([manifest], ckpt["preprocessing"], batch_size=64, num_workers=0, augment=False,
                                cache_dir=cache_dir, progress=progress)
            try:
                loader = {"val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
            except FedxrError as exc:
                result["sites"][site] = {"skipped": str(exc)}
                break
            probs, targets = predict(model, loader)
            assert dm.rows is not None  # the loader's setup() read the manifest
            rows = dm.rows[dm.rows["split"] == split]
            normal = rows[NO_FINDING].to_numpy(dtype=float) if NO_FINDING in rows else np.full(len(rows), np.nan)
            trained = (ckpt.get("trained_on") or {}).get("trained_labels") or list(LABELS)
            per_model[name] = _site_scores(probs, targets, normal, torch.tensor(ckpt["thresholds"]), trained,
                                           spec_of(path))
            if keep_predictions:
                predictions.setdefault(site, {})[name] = (probs.numpy(), targets.numpy())
            pooled[name].append((probs, targets, normal, torch.tensor(ckpt["thresholds"]), trained, path))
        else:
            result["sites"][site] = per_model
    for name, parts in pooled.items():
        if parts:
            # Per-site models pooled: their predictions together, read at the first site's thresholds (AUROC
            # needs none; the operating point of a set of models is not one number).
            result["pooled"][name] = _site_scores(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                                  np.concatenate([p[2] for p in parts]), parts[0][3], parts[0][4],
                                                  spec_of(parts[0][5]) if len({str(p[5]) for p in parts}) == 1
                                                  else None)
    out = Path(out) if out else Path(sites_dir).parent / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "per_site.json", result)
    result["out"] = str(out)
    if keep_predictions:
        result["predictions"] = predictions
    return result


def thresholds_at_specificity(probs: torch.Tensor, targets: torch.Tensor, specificity: float) -> torch.Tensor:
    """Per class, the lowest threshold at which at least ``specificity`` of the known negatives score below it
    (``probs >= t`` is a positive call; the export's ``specificity:`` operating-point rule); NaN where a class has
    no known negative. One rule for every model: one that calls everything positive gets a high threshold rather
    than a free sensitivity."""
    out = torch.full((probs.shape[1],), float("nan"))
    for c in range(probs.shape[1]):
        known = ~torch.isnan(targets[:, c])
        y, p = targets[known, c].numpy(), probs[known, c].numpy().astype(np.float32)  # float32 as compared later
        if (y == 0).any():
            out[c] = threshold_for(p, y, "specificity", specificity)
    return out


def _validation_thresholds(model: nn.Module, ckpt: dict, sites: dict[str, Path], specificity: float,
                           cache_dir: str | Path, progress: bool) -> torch.Tensor | None:
    """A model's thresholds at ``specificity`` on the validation splits of all sites together (the known negatives
    of every site: a site with positives only has none of its own); None where no site has a validation split."""
    parts = []
    for manifest in sites.values():
        dm = SiteDataModule([manifest], ckpt["preprocessing"], batch_size=64, num_workers=0, augment=False,
                            cache_dir=cache_dir, progress=progress)
        try:
            parts.append(predict(model, dm.val_dataloader()))
        except FedxrError:
            continue  # a site without a validation split adds no negatives
    if not parts:
        return None
    return thresholds_at_specificity(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), specificity)


def format_sites(result: dict) -> str:
    """Per site and model: the within-site macro AUROC with its interval, one-class sensitivities, normal-vs-abnormal."""
    def one(s: dict) -> str:
        parts = []
        if s.get("macro_auroc") is not None:
            lo, hi = s["macro_auroc_ci95"]
            parts.append(f"macro AUROC {s['macro_auroc']:.3f} ({lo:.3f}-{hi:.3f}) over {', '.join(s['counted'])}")
        for c, v in s.get("sensitivity_only", {}).items():
            text = f"{c} sensitivity {v['sensitivity']:.2f} ({v['positives']} positives, {v['negatives']} negatives)"
            if "at_specificity" in v:
                a = v["at_specificity"]
                text += f", {a['sensitivity']:.2f} at {a['validation_specificity']:.0%} validation specificity"
            parts.append(text)
        if "abnormal_auroc" in s:
            a = s["abnormal_auroc"]
            parts.append(f"normal vs abnormal AUROC {a['auroc']:.3f} ({a['ci95'][0]:.3f}-{a['ci95'][1]:.3f})")
        return "; ".join(parts) or "nothing to score (too few known positives and negatives)"

    lines = [f"within-site figures on each site's {result['split']} split (primary):"]
    for site, models in result["sites"].items():
        if "skipped" in models:
            lines.append(f"  {site}: skipped ({models['skipped']})")
            continue
        for name, s in models.items():
            lines.append(f"  {site} [{name}, {s['images']} images]: {one(s)}")
    lines.append("pooled over all sites (not comparable across hospitals; shown beside):")
    lines += [f"  [{name}]: {one(s)}" for name, s in result["pooled"].items()]
    return "\n".join(lines)
