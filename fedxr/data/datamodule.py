"""LightningDataModule for one site (or several sites pooled), reading from the image cache."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from fedxr.data.augment import augment_batch
from fedxr.data.cache import build_cache
from fedxr.data.manifest import SPLITS, read_manifest
from fedxr.defaults import CACHE_DIR
from fedxr.errors import DataError
from fedxr.imaging import standardize, to_unit
from fedxr.labels import LABELS
from fedxr.preprocessing import Preprocessing

class XRayDataset(Dataset):
    """Items are ``(image, target)``: target (14,) float32; image (1, S, S) float32 normalised, or, with
    ``augment``, the cached uint8 image itself, which :func:`fedxr.data.augment.augment_batch` turns into
    the normalised input batch-wise on the training device (``SiteDataModule.on_after_batch_transfer``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, preprocessing: Preprocessing, augment: bool):
        self.images, self.labels = images, labels.astype(np.float32)
        self.mean, self.std = preprocessing.mean, preprocessing.std
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment:
            return torch.from_numpy(np.array(self.images[i], dtype=np.uint8)).unsqueeze(0), torch.from_numpy(self.labels[i])
        # The same to_unit / standardize functions as the edge runtime: one preprocessing implementation.
        x = torch.from_numpy(standardize(to_unit(self.images[i]), self.mean, self.std)).unsqueeze(0)
        return x, torch.from_numpy(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A batch's items with one read of the cache (sorted, so a memmap reads forward) instead of one per image."""
        if not self.augment or not isinstance(self.images, np.ndarray):
            return [self[i] for i in indices]
        order = np.argsort(indices)
        block = np.empty((len(indices),) + self.images.shape[1:], dtype=np.uint8)
        block[order] = self.images[np.asarray(indices)[order]]
        images = torch.from_numpy(block).unsqueeze(1)
        return [(images[k], torch.from_numpy(self.labels[i])) for k, i in enumerate(indices)]


def make_loader(dataset: XRayDataset, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    """The DataLoader every fedxr training and evaluation uses (also measured by benchmarks/data_loading.py)."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(), drop_last=False,
    )


class SiteDataModule(L.LightningDataModule):
    """Train/val/test loaders for the rows of one or more site manifests.

    Several manifests are pooled (central training); one manifest is one hospital's data. Images are
    cached at ``preprocessing.size`` and normalised with its mean and std.
    """

    def __init__(
        self, manifests: Sequence[str | Path], preprocessing: Preprocessing, batch_size: int = 32, num_workers: int = 2,
        augment: bool = True, cache_dir: str | Path = CACHE_DIR, progress: bool = True,
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

    # Lightning declares `name` as a plain attribute (None) that it never sets; here it is read-only, the manifests'.
    @property
    def name(self) -> str:  # type: ignore[override]
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
        return make_loader(self._dataset(split), self.batch_size, shuffle, self.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Training batches arrive as uint8 on the training device: augment and normalise them there.
        # DP training batches carry a third item, each image's privacy unit (fedxr.privacy.sampling).
        x, y, *units = batch
        if x.dtype == torch.uint8 and units and self.dp_copies > 1:
            # Augmentation multiplicity: each image's copies stay next to each other (same unit, same chunk).
            x, y, units = x.repeat_interleave(self.dp_copies, 0), y.repeat_interleave(self.dp_copies, 0), \
                [units[0].repeat_interleave(self.dp_copies, 0)]
        if x.dtype == torch.uint8 and len(x) == 0:
            # Poisson sampling (differential privacy) can draw an empty batch: nothing to augment.
            return (torch.zeros(x.shape, dtype=torch.float32, device=x.device), y, *units)
        if x.dtype == torch.uint8:
            x = augment_batch(x, self.preprocessing.mean, self.preprocessing.std)
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                # Lightning casts a batch to the precision (bf16-true, 16-true) before this hook; uint8 was
                # left alone then, so the augmented float batch is cast here.
                x = trainer.precision_plugin.convert_input(x)
        return (x, y, *units)

    #: Set by a site training with differential privacy: the privacy units of the training split (row indices
    #: per image or per patient) and the chance of each to be in a step's batch (Poisson sampling, which is
    #: what the DP accountant's guarantee assumes); and how many augmented copies of each image to train on.
    dp_sampling: tuple[list[np.ndarray], float] | None = None
    dp_copies = 1

    def split_patients(self, split: str) -> np.ndarray:
        """Patient id of every image of a split, in the dataset's order."""
        self.setup()
        assert self.rows is not None  # setup() read the manifests
        return self.rows.loc[self.rows["split"] == split, "patient_id"].to_numpy()

    def train_dataloader(self) -> DataLoader:
        if self.dp_sampling is not None:
            from fedxr.privacy.sampling import poisson_loader

            units, rate = self.dp_sampling
            return poisson_loader(self._dataset("train"), units, rate, self.num_workers)
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
