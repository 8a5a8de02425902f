"""LightningDataModule for one site (or several sites pooled), reading from the image cache."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from fedxr.data.cache import build_cache
from fedxr.data.manifest import SPLITS, read_manifest
from fedxr.errors import DataError
from fedxr.imaging import standardize, to_unit
from fedxr.labels import LABELS
from fedxr.preprocessing import Preprocessing

#: Training-time intensity augmentation: gamma in [e^-r, e^r] (0.74-1.35), contrast ±20 %, brightness ±8 %.
GAMMA_LOG_RANGE, CONTRAST_RANGE, BRIGHTNESS_RANGE = 0.3, 0.2, 0.08


class XRayDataset(Dataset):
    """Items are ``(image, target)``: image (1, S, S) float32 normalised, target (14,) float32."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, preprocessing: Preprocessing, augment: bool):
        self.images, self.labels = images, labels.astype(np.float32)
        self.mean, self.std = preprocessing.mean, preprocessing.std
        # Mild, anatomically sane augmentation: small rotation/shift/zoom; no horizontal flip by default
        # (the heart is on the left, and flipping would teach the model anatomy it will never see).
        self.affine = v2.RandomAffine(degrees=5, translate=(0.04, 0.04), scale=(0.95, 1.05)) if augment else None
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The same to_unit / standardize functions as the edge runtime: one preprocessing implementation.
        unit = to_unit(self.images[i])
        if self.augment:
            x = self.affine(torch.from_numpy(unit).unsqueeze(0))
            # Intensity jitter over the range hospitals' detectors and processing differ by (gamma, window,
            # level): a site's model then also fits the other sites' images, which keeps federated
            # averaging from pulling apart per-hospital intensity statistics.
            gamma = torch.exp((torch.rand(()) - 0.5) * 2 * GAMMA_LOG_RANGE)
            x = x.clamp(0, 1) ** gamma
            contrast = 1.0 + (torch.rand(()) - 0.5) * 2 * CONTRAST_RANGE
            brightness = (torch.rand(()) - 0.5) * 2 * BRIGHTNESS_RANGE
            unit = ((x - x.mean()) * contrast + x.mean() + brightness).clamp_(0, 1)[0].numpy()
        x = torch.from_numpy(standardize(unit, self.mean, self.std)).unsqueeze(0)
        return x, torch.from_numpy(self.labels[i])


class SiteDataModule(L.LightningDataModule):
    """Train/val/test loaders for the rows of one or more site manifests.

    Several manifests are pooled (central training); one manifest is one hospital's data. Images are
    cached at ``preprocessing.size`` and normalised with its mean and std.
    """

    def __init__(
        self, manifests: Sequence[str | Path], preprocessing: Preprocessing, batch_size: int = 32, num_workers: int = 2,
        augment: bool = True, cache_dir: str | Path = ".cache/fedxr", progress: bool = True,
    ):
        super().__init__()
        if not manifests:
            raise DataError("no site manifest given; run `fedxr data split ROOT --out DIR` first")
        self.manifests = [Path(m) for m in manifests]
        self.preprocessing, self.batch_size, self.num_workers = preprocessing, batch_size, num_workers
        self.augment = augment
        self.cache_dir, self.progress = Path(cache_dir), progress
        self.rows: pd.DataFrame | None = None
        self.datasets: dict[str, XRayDataset] = {}

    @property
    def name(self) -> str:
        return "+".join(m.stem for m in self.manifests)

    def setup(self, stage: str | None = None) -> None:
        if self.rows is not None:
            return  # the cache is opened once and reused across rounds
        self.rows = pd.concat([read_manifest(m) for m in self.manifests], ignore_index=True)
        for split in SPLITS:
            part = self.rows[self.rows["split"] == split]
            if part.empty:
                continue
            images = build_cache(part["path"].tolist(), self.preprocessing.size, self.cache_dir,
                                 workers=max(1, self.num_workers), progress=self.progress,
                                 desc=f"{self.name} {split}")
            labels = part[list(LABELS)].to_numpy(dtype=np.float32)
            self.datasets[split] = XRayDataset(images, labels, self.preprocessing, self.augment and split == "train")

    def split_labels(self, split: str) -> np.ndarray:
        """(N, 14) label matrix of a split (e.g. for BCE pos_weight from the training labels)."""
        return self._dataset(split).labels

    def _dataset(self, split: str) -> XRayDataset:
        self.setup()
        if split not in self.datasets:
            raise DataError(
                f"{self.name}: the {split!r} split has no images; re-split with larger fractions "
                f"(`fedxr data split --val-fraction/--test-fraction`) or add data at this site"
            )
        return self.datasets[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._dataset(split), batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
