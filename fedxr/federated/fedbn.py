"""FedBN's models: each site's own, and a global one that can stand alone.

With ``federated.fedbn`` every BatchNorm tensor stays at its site, so the server's global model never holds
trained BatchNorm: its affine weights are 1 and 0 and its statistics 0 and 1, and on its own it predicts
garbage. What a federation with FedBN really produces is one model per site — the shared layers plus that
site's BatchNorm. So:

- **each site keeps its personalised model** (:func:`keep_personal`): after every validation the site scores the
  model it just received with its own BatchNorm, and keeps the one its own validation split liked best
  (``SITE_WORK/personal.pt``; a site whose validation cannot be scored — one class only — keeps the last). In
  production this file never leaves the site.
- in simulation and POC, where the sites' folders are on this machine, :func:`gather` turns them into fedxr
  checkpoints ``RUN/fedbn_sites/SITE.ckpt`` (what evaluation scores within each site and what distillation
  gives each site as its teacher), and gives the global checkpoints **pooled BatchNorm**: the weighted moments
  of the sites' statistics (mean of the means; mean of the variances plus the variance of the means) and the
  mean of their affine weights, weighted by training images. That global model is the one to export and to
  score pooled; it is not any site's model, and the checkpoint says so.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from fedxr.data.atomic import save_torch_atomic, write_json_atomic

#: A site's personalised model, in its own work folder (records/SITE in simulation and POC).
PERSONAL_FILE = "personal.pt"
#: Beside the sites' models: which round each was kept from, its validation score and training images.
SUMMARY_FILE = "site_models.json"
#: Source recorded in each site's FedBN checkpoint.
SITE_SOURCE = "federate:fedbn"


def batchnorm_of(module) -> dict[str, torch.Tensor]:
    """A copy of a module's BatchNorm tensors (parameters and statistics), by state-dict name."""
    out = {}
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            out.update({prefix + k: v.detach().clone() for k, v in mod.state_dict().items()})
    return out


def keep_personal(work: Path, module, rnd: int | str, val_auroc: float | None, train_images: int) -> bool:
    """Keep the site's model as just validated if its own validation score beats the kept one's (or none is
    kept, or neither can be scored: then the latest wins). Written atomically; returns whether it was kept."""
    path = Path(work) / PERSONAL_FILE
    score = val_auroc if val_auroc is not None and math.isfinite(val_auroc) else None
    if path.is_file():
        kept = torch.load(path, map_location="cpu", weights_only=True)
        best = kept.get("val_auroc")
        if best is not None and (score is None or score <= best):
            return False
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    save_torch_atomic(path, {"state_dict": state, "round": str(rnd), "val_auroc": score, "train_images": train_images})
    return True


def _pooled(states: list[dict[str, torch.Tensor]], weights: list[float], keys: list[str]) -> dict[str, torch.Tensor]:
    """Pooled BatchNorm: each running mean/variance as the moments of the mixture of the sites' distributions,
    the affine weights averaged, the step counter the largest."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key in keys:
        values = [s[key] for s in states]
        if key.endswith("num_batches_tracked"):
            out[key] = max(values)
        elif key.endswith("running_var"):
            mean_key = key.removesuffix("running_var") + "running_mean"
            means = torch.stack([s[mean_key].double() for s in states])
            variances = torch.stack([v.double() for v in values])
            pooled_mean = (w[:, None] * means).sum(0)
            second = (w[:, None] * (variances + means ** 2)).sum(0)
            out[key] = (second - pooled_mean ** 2).clamp_min(0).to(values[0].dtype)
        else:
            out[key] = (w[:, None] * torch.stack([v.double().reshape(-1) for v in values])).sum(0) \
                .reshape(values[0].shape).to(values[0].dtype)
    return out


def gather(recipe, records: Path, global_checkpoints: dict[str, str], folder: Path) -> dict:
    """Sites' personalised models → ``folder/SITE.ckpt`` (the stage's ``fedbn_sites``); the global checkpoints get
    pooled BatchNorm. Returns what was written (also ``folder/site_models.json``); empty when no site kept a model."""
    from fedxr.models.checkpoint import save_checkpoint
    from fedxr.models.classifier import XRayClassifier

    personal = {p.parent.name: p for p in sorted(Path(records).glob(f"*/{PERSONAL_FILE}"))}
    if not personal:
        return {}
    shutil.rmtree(folder, ignore_errors=True)  # a previous run's sites must not linger
    sites: dict[str, dict] = {}
    states: list[dict[str, torch.Tensor]] = []
    weights: list[float] = []
    for site, path in personal.items():
        kept = torch.load(path, map_location="cpu", weights_only=True)
        module_state = kept["state_dict"]
        net = {k.removeprefix("model."): v for k, v in module_state.items() if k.startswith("model.")}
        dst = save_checkpoint(folder / f"{site}.ckpt", model_name=recipe.model.name, state_dict=net,
                              preprocessing=recipe.preprocessing, thresholds=module_state["thresholds"],
                              recipe=recipe.resolved(), source=SITE_SOURCE,
                              extra={"fedbn": {"site": site, "round": kept["round"], "val_auroc": kept["val_auroc"]}})
        sites[site] = {"checkpoint": str(dst), "round": kept["round"], "val_auroc": kept["val_auroc"],
                       "train_images": kept["train_images"]}
        states.append(module_state)
        weights.append(float(max(1, kept["train_images"])))
    keys = list(batchnorm_of(XRayClassifier(recipe.model.name)))  # "model.…", as in the sites' module states
    pooled = {k.removeprefix("model."): v for k, v in _pooled(states, weights, keys).items()}
    note = {"batchnorm": f"pooled from {len(sites)} sites' own BatchNorm, weighted by training images: not any "
                         f"site's model; each site's is under {folder.name}/ beside it",
            "site_models": {s: Path(v["checkpoint"]).name for s, v in sites.items()}}
    for global_path in global_checkpoints.values():
        _rewrite_global(global_path, note, pooled)
    summary = {"sites": sites, "pooled_into": sorted(global_checkpoints)}
    write_json_atomic(folder / SUMMARY_FILE, summary)
    return summary


def mark_untrained(global_checkpoints: dict[str, str]) -> None:
    """Say in the global checkpoints that their BatchNorm is untrained, so no later stage uses them as a model."""
    from fedxr.models.checkpoint import UNTRAINED_BATCHNORM

    for path in global_checkpoints.values():
        _rewrite_global(path, {"batchnorm": UNTRAINED_BATCHNORM, "site_models": {}})


def _rewrite_global(path: str | Path, note: dict, batchnorm: dict[str, torch.Tensor] | None = None) -> None:
    """Write a global checkpoint again with its ``fedbn`` note (and BatchNorm tensors replaced), keeping the rest."""
    from fedxr.models.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    extra: dict[str, Any] = {k: ckpt[k] for k in ("nvflare_meta", "norm") if k in ckpt}
    save_checkpoint(path, model_name=ckpt["model_name"], state_dict={**ckpt["state_dict"], **(batchnorm or {})},
                    preprocessing=ckpt["preprocessing"], thresholds=ckpt["thresholds"], metrics=ckpt.get("metrics"),
                    recipe=ckpt.get("recipe"), source=ckpt.get("source", "federate"), extra={**extra, "fedbn": note})


def site_models(checkpoint: str | Path) -> dict[str, Path]:
    """A FedBN global checkpoint's per-site models that exist beside it (``{}`` for any other checkpoint)."""
    from fedxr.models.checkpoint import load_checkpoint

    info = (load_checkpoint(checkpoint).get("fedbn") or {}).get("site_models")
    if not info:
        return {}
    folder = Path(checkpoint).resolve().parent / SITES_FOLDER
    return {site: folder / name for site, name in info.items() if (folder / name).is_file()}


#: The folder, beside a FedBN stage's global checkpoints, of each site's own model (RunLayout.fedbn_sites).
SITES_FOLDER = "fedbn_sites"
