"""What DP-SGD draws and clips: privacy units (an image, or all of a patient's images), Poisson-sampled.

DP-SGD's guarantee is about one *unit*: with ``privacy.dp.unit: image`` one training image, with ``patient``
every image of one patient. A step's logical batch takes each unit independently with probability ``q``
(Poisson sampling, what the accountant assumes) and all of a drawn unit's images; the per-image gradients of a
unit are summed into the unit's gradient, which is clipped as one (:func:`group_grad_samples`). Each item of a
DP training batch carries its unit's index for that purpose.

The logical batch (``privacy.dp.logical_batch_size`` images on average) is loaded as uint8 and trained in
physical chunks of at most ``data.batch_size`` images that never split a unit (:func:`physical_chunks`), so
logical batches far above what fits in memory cost only time (Opacus' BatchMemoryManager does the same
inside a plain loop; Lightning owns fedxr's loop, so the chunks are taken inside one training step).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


def units_of(patient_ids, unit: str) -> list[np.ndarray]:
    """Row indices of each privacy unit: one per image, or one per patient (first-appearance order)."""
    if unit == "image":
        return [np.array([i]) for i in range(len(patient_ids))]
    _, codes = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return list(np.split(order, bounds))


class SizedDataset(Protocol):
    """A map-style data set with a length (torch's ``Dataset`` type declares no ``__len__``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Any: ...


class UnitTagged(Dataset):
    """``dataset``'s items with the index of their privacy unit appended: ``(image, target, unit)``."""

    def __init__(self, dataset: SizedDataset, units: list[np.ndarray]):
        self.dataset = dataset
        self.unit_of = np.empty(len(dataset), dtype=np.int64)
        for u, rows in enumerate(units):
            self.unit_of[rows] = u

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (*self.dataset[i], torch.tensor(self.unit_of[i]))

    def __getitems__(self, indices: list[int]):
        items = (self.dataset.__getitems__(indices) if hasattr(self.dataset, "__getitems__")
                 else [self.dataset[i] for i in indices])
        return [(*item, torch.tensor(self.unit_of[i])) for item, i in zip(items, indices)]


class PoissonUnitSampler(Sampler[list[int]]):
    """``steps`` logical batches; each takes every unit with probability ``sample_rate`` and all its images
    (an empty batch is possible and kept: it is a step the accountant counts)."""

    def __init__(self, units: list[np.ndarray], sample_rate: float, steps: int, generator: torch.Generator):
        self.units, self.sample_rate, self.steps, self.generator = units, sample_rate, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            drawn = torch.nonzero(torch.rand(len(self.units), generator=self.generator) < self.sample_rate).flatten()
            yield np.concatenate([self.units[u] for u in drawn.tolist()]).tolist() if len(drawn) else []


def poisson_loader(dataset: SizedDataset, units: list[np.ndarray], sample_rate: float, num_workers: int) -> DataLoader:
    """One epoch of Poisson-sampled logical batches (``int(1 / sample_rate)`` steps, as Opacus' DPDataLoader)."""
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty

    from fedxr.privacy.dp import unpredictable_generator

    tagged = UnitTagged(dataset, units)
    first = tagged[0]
    return DataLoader(
        tagged, batch_sampler=PoissonUnitSampler(units, sample_rate, int(1 / sample_rate), unpredictable_generator()),
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
        collate_fn=wrap_collate_with_empty(collate_fn=default_collate, sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                                           dtypes=[dtype_safe(x) for x in first]))


def physical_chunks(units: torch.Tensor, max_images: int) -> list[slice]:
    """Consecutive slices of a logical batch with at most ``max_images`` images each, never splitting a unit (a
    unit's images are contiguous; a unit larger than ``max_images`` gets a chunk of its own)."""
    n = len(units)
    if n == 0:
        return []
    starts = [0] + (torch.nonzero(units[1:] != units[:-1]).flatten() + 1).tolist()
    ends = starts[1:] + [n]
    chunks, begin = [], 0
    for start, end in zip(starts, ends):
        if end - begin > max_images and start > begin:
            chunks.append(slice(begin, start))
            begin = start
    chunks.append(slice(begin, n))
    return chunks


def group_grad_samples(params, units: torch.Tensor, copies: int = 1) -> None:
    """Replace each parameter's per-image gradients (``p.grad_sample``, one row per image of the physical
    batch) by per-unit gradients: the sum over a unit's images, each image's gradient averaged over its
    ``copies`` augmented copies. DPOptimizer then clips one row per unit."""
    _, inverse = torch.unique_consecutive(units, return_inverse=True)
    groups = int(inverse.max()) + 1 if len(inverse) else 0
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        summed = torch.zeros((groups, *gs.shape[1:]), dtype=gs.dtype, device=gs.device)
        summed.index_add_(0, inverse.to(gs.device), gs)
        p.grad_sample = summed / copies if copies > 1 else summed
