"""The one source of truth for label names and metric names.

Every other module (data reader, metrics, NVFlare key metric, ONNX metadata) imports from here, so a
label or metric is spelled in exactly one place.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

#: The 14 ChestX-ray14 findings in canonical order (NIH README, CheXNet, ChestMNIST).
LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_LABELS = len(LABELS)
LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(LABELS)}

#: `No Finding` is the all-zero label vector, never a 15th class.
NO_FINDING = "No Finding"

#: Spellings seen in NIH files that mean a canonical label (BBox_List_2017.csv says `Infiltrate`).
LABEL_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}

#: Metric names, shared by the LightningModule, the NVFlare key metric and reports.
VAL_AUROC = "val_auroc"
VAL_AP = "val_ap"
VAL_LOSS = "val_loss"
TRAIN_LOSS = "train_loss"
#: Distillation logs its two loss terms separately.
TRAIN_TASK_LOSS = "train_task_loss"
TRAIN_KD_LOSS = "train_kd_loss"
TEST_AUROC = "test_auroc"
TEST_AP = "test_ap"
#: The metric NVFlare uses to pick the best global model.
KEY_METRIC = VAL_AUROC


class UnknownLabelError(ValueError):
    """A label string that is neither one of LABELS, an alias, nor `No Finding`."""


def canonical_label(name: str) -> str:
    """Return the canonical spelling of one finding name, or raise UnknownLabelError."""
    name = name.strip()
    name = LABEL_ALIASES.get(name, name)
    if name not in LABEL_INDEX:
        raise UnknownLabelError(
            f"unknown label {name!r}; known labels are {', '.join(LABELS)} (or {NO_FINDING!r})"
        )
    return name


def encode_findings(text: str) -> np.ndarray:
    """Turn an NIH `Finding Labels` string (`A|B` or `No Finding`) into a (14,) uint8 vector."""
    vec = np.zeros(NUM_LABELS, dtype=np.uint8)
    text = (text or "").strip()
    if not text:
        raise UnknownLabelError("empty label string; use 'No Finding' for a normal image")
    if text == NO_FINDING:
        return vec
    for part in text.split("|"):
        if part.strip() == NO_FINDING:
            raise UnknownLabelError(f"{NO_FINDING!r} combined with findings in {text!r}")
        vec[LABEL_INDEX[canonical_label(part)]] = 1
    return vec


def decode_findings(vec: Iterable[int | bool | float]) -> str:
    """Inverse of encode_findings: a 0/1 vector back to `A|B` or `No Finding`."""
    names = [LABELS[i] for i, v in enumerate(vec) if v]
    return "|".join(names) if names else NO_FINDING


def per_class_metric(prefix: str, label: str) -> str:
    """Name of a per-class metric, e.g. ``val_auroc/Effusion``."""
    return f"{prefix}/{canonical_label(label)}"
