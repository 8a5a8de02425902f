"""`fedxr evaluate`: score a checkpoint on a split of site manifests; metrics.json and ROC curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedxr.data.datamodule import SiteDataModule
from fedxr.data.manifest import site_manifest_paths
from fedxr.errors import FedxrError
from fedxr.labels import LABELS
from fedxr.models.checkpoint import model_from_checkpoint
from fedxr.models.metrics import (MIN_TEST_POSITIVES, bootstrap_macro_auroc, interval, multilabel_scores,
                                  sensitivity_specificity)
from fedxr.plots import saved_figure

#: Bootstrap resamples of the images for the 95 % interval of a macro AUROC (seeded: same interval every run).
BOOTSTRAP_RESAMPLES = 1000
PREDICTIONS_FILE = "predictions.npz"


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
                fpr, tpr, _ = binary_roc(probs[:, c], targets[:, c].int())
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
                        batch_size: int = 64, num_workers: int = 0, cache_dir: str | Path = ".cache/fedxr",
                        progress: bool = True) -> dict:
    """Per-class AUROC/AP, macro AUROC and sensitivity/specificity at the checkpoint's thresholds."""
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
    result = {
        "checkpoint": str(ckpt_path), "model_name": ckpt["model_name"], "image_size": ckpt["preprocessing"].size,
        "split": split, "data": str(data),
        "images": scores["n"], "macro_auroc": scores["macro_auroc"], "macro_auroc_ci95": interval(samples),
        "macro_auroc_all": scores["macro_auroc_all"], "macro_ap": scores["macro_ap"],
        "counted": scores["counted"], "min_positives": MIN_TEST_POSITIVES, "positives": scores["positives"],
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": 0, "unit": "image"},
        "auroc": scores["auroc"], "ap": scores["ap"], "excluded": scores["excluded"], "note": scores["note"],
        "at_thresholds": sensitivity_specificity(probs, targets, thresholds),
        "prevalence": dict(zip(LABELS, np.round(targets.mean(0).numpy(), 4).tolist())),
    }
    out = Path(out) if out else Path(ckpt_path).parent / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    # Kept for paired comparisons between models scored on the same images (KD gain, student vs teacher).
    np.savez_compressed(out / PREDICTIONS_FILE, probs=probs.numpy(), targets=targets.numpy())
    plot_roc(probs, targets, scores, out / "roc_curves.png", f"{ckpt['model_name']} on {split}")
    result["out"] = str(out)
    return result


def format_result(result: dict) -> str:
    lo, hi = result["macro_auroc_ci95"]
    lines = [f"{result['model_name']} on {result['split']} ({result['images']} images): "
             f"macro AUROC {result['macro_auroc']:.4f} (95 % CI {lo:.3f}-{hi:.3f}, {len(result['counted'])} classes "
             f"with >= {result['min_positives']} positives), macro AP {result['macro_ap']:.4f}",
             f"{'finding':<20}{'AUROC':>8}{'AP':>8}{'thresh':>8}{'sens':>7}{'spec':>7}{'pos':>6}"]
    fmt = lambda v: f"{v:.3f}" if v is not None else "  -  "  # noqa: E731
    for name in LABELS:
        t = result["at_thresholds"][name]
        if name not in result["counted"]:
            lines.append(f"{name:<20}{'too few positives':>31}{t['positives']:>21}")
            continue
        lines.append(f"{name:<20}{fmt(result['auroc'][name]):>8}{fmt(result['ap'][name]):>8}{t['threshold']:>8.3f}"
                     f"{fmt(t['sensitivity']):>7}{fmt(t['specificity']):>7}{t['positives']:>6}")
    if result["note"]:
        lines.append(result["note"])
    lines.append(f"wrote {result['out']}/metrics.json and roc_curves.png")
    return "\n".join(lines)
