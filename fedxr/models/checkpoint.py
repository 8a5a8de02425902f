"""The one fedxr checkpoint format, written by training, federation and distillation alike.

A checkpoint is a ``torch.save`` dict of tensors and plain data (loadable with ``weights_only=True``):

=================  =====================================================================
``format``         ``fedxr-checkpoint-v2``
``model_name``     registry name: the model is rebuilt from the file alone
``state_dict``     the network's weights (no optimizer state)
``preprocessing``  ``{"size", "mean", "std"}``: the model's input (:class:`fedxr.preprocessing.Preprocessing`)
``labels``         the label names in output order
``thresholds``     per-class decision thresholds chosen on validation (list of floats)
``metrics``        validation (and test) scores at save time
``recipe``         the resolved recipe that produced it
``fedxr_version``  the fedxr version that wrote it; ``source``: train/federate/distill
``trained_on``     what it was trained on: data source, synthetic or not, sites with image counts, the
                   labels trained and those no site labelled (:func:`fedxr.data.provenance.trained_on`)
``norm``           optional: ``group`` when the network was trained with differential privacy (its
                   BatchNorm layers are GroupNorm); absent or ``batch`` otherwise
``weights_sha256`` SHA-256 of ``state_dict`` (names, dtypes, shapes, bytes: :func:`state_dict_sha256`),
                   checked on every load: a torch file whose weights changed after it was written (a bit
                   flipped on a disk, a bad copy) otherwise loads silently with the wrong weights
=================  =====================================================================

Version 1 files (``image_size``, ``mean``, ``std`` at the top level) still load. :func:`load_checkpoint`
returns the dict with ``preprocessing`` as a :class:`~fedxr.preprocessing.Preprocessing` value.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedxr import __version__
from fedxr.data.atomic import save_torch_atomic
from fedxr.data.provenance import trained_on
from fedxr.errors import FedxrError
from fedxr.labels import LABELS
from fedxr.preprocessing import Preprocessing

CHECKPOINT_FORMAT = "fedxr-checkpoint-v2"
_V1_FORMAT = "fedxr-checkpoint-v1"
REQUIRED_KEYS = ("format", "model_name", "state_dict", "preprocessing", "labels", "thresholds")
_V1_REQUIRED = ("format", "model_name", "state_dict", "image_size", "mean", "std", "labels", "thresholds")


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes, in name order (independent of the file's
    layout, so the same weights give the same digest however they were saved)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # as bytes: bf16 has no numpy dtype
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path, *, model_name: str, state_dict: dict[str, torch.Tensor], preprocessing: Preprocessing,
    thresholds: list[float] | torch.Tensor, metrics: dict | None = None,
    recipe: dict | None = None, source: str = "train", extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach().cpu().tolist()
    weights = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT, "model_name": model_name, "state_dict": weights,
        "weights_sha256": state_dict_sha256(weights),
        "preprocessing": Preprocessing.coerce(preprocessing).as_dict(), "labels": list(LABELS),
        "thresholds": [float(t) for t in thresholds], "metrics": metrics or {}, "recipe": recipe or {},
        "fedxr_version": __version__, "source": source, "trained_on": trained_on(recipe or {}), **(extra or {}),
    }
    return save_torch_atomic(path, payload)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a fedxr checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FedxrError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FedxrError(f"{path}: not a readable fedxr checkpoint ({type(exc).__name__}: {exc})") from None
    version = ckpt.get("format") if isinstance(ckpt, dict) else None
    required = _V1_REQUIRED if version == _V1_FORMAT else REQUIRED_KEYS
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or version not in (CHECKPOINT_FORMAT, _V1_FORMAT):
        raise FedxrError(f"{path}: not a {CHECKPOINT_FORMAT} file (missing {', '.join(missing) or 'format tag'})")
    if "weights_sha256" in ckpt and state_dict_sha256(ckpt["state_dict"]) != ckpt["weights_sha256"]:
        raise FedxrError(f"{path}: its weights are not the ones written (SHA-256 differs from the one recorded "
                         "inside the file): the file was damaged or altered after it was saved. Copy it again from "
                         "where it was written, or rerun the stage that wrote it (`fedxr run RECIPE --from STAGE`)")
    if list(ckpt["labels"]) != list(LABELS):
        raise FedxrError(f"{path}: its labels {ckpt['labels']} differ from this fedxr's label order")
    if version == _V1_FORMAT:
        ckpt["preprocessing"] = {"size": ckpt.pop("image_size"), "mean": ckpt.pop("mean"), "std": ckpt.pop("std")}
    ckpt["preprocessing"] = Preprocessing.coerce(ckpt["preprocessing"])
    return ckpt


#: ``fedbn.batchnorm`` of a FedBN global checkpoint whose BatchNorm no site trained (production: the sites' own
#: models stay at the sites, fedxr.federated.fedbn).
UNTRAINED_BATCHNORM = "untrained"


def require_trained_batchnorm(ckpt: dict, path: str | Path) -> None:
    """Refuse a FedBN global checkpoint whose BatchNorm no site trained: it would predict garbage."""
    if (ckpt.get("fedbn") or {}).get("batchnorm") == UNTRAINED_BATCHNORM:
        raise FedxrError(f"{path}: a FedBN federation's global model, whose BatchNorm stayed at the sites (production): "
                         "it is no model on its own. Use a site's own model (personal.pt in that site's run folder), or "
                         "run the federation in simulation or POC, where fedxr gathers them")


def model_from_checkpoint(path_or_ckpt: str | Path | dict) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from a checkpoint; returns (model in eval mode, checkpoint dict)."""
    from fedxr.models.registry import build_model

    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt)
    require_trained_batchnorm(ckpt, "the checkpoint" if isinstance(path_or_ckpt, dict) else path_or_ckpt)
    model = build_model(ckpt["model_name"], norm=ckpt.get("norm", "batch"))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
