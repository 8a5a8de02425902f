"""A site's training films dealt out to simulated devices, and the files a device reads them from.

A device is deep-copied from one task processor (NVFlare's ``TPODeviceFactory``), so it holds no data itself:
it reads its films by index from the site's image cache (a read-only memmap) with the index lists written here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedxr.data.atomic import write_json_atomic
from fedxr.errors import DataError
from fedxr.labels import LABELS

POPULATION_FILE = "population.json"
LABELS_FILE = "labels.npy"
SHARDS_FILE = "devices.npz"


def deal_devices(labels: np.ndarray, devices: int, low: int, high: int, seed: int,
                 skew: float | None = None) -> list[np.ndarray]:
    """Row indices of the films each of ``devices`` devices holds: a count drawn uniformly from ``low..high``,
    films drawn without replacement within a device. Devices together may hold more films than the site has:
    then films are shared between devices (each device its own draw), as one patient's films can be seen at
    several points of care.

    ``skew`` (a Beta(a, a) concentration) makes devices differ in case mix: each device draws its share of
    abnormal films (any known positive finding) from Beta(skew, skew) — small values give devices that see
    almost only normal or only abnormal films; None draws every film alike."""
    n = len(labels)
    if n == 0:
        raise DataError("the device population has no training films; choose a site with a training split")
    rng = np.random.default_rng([seed, devices, low, high])
    abnormal = np.flatnonzero(np.nan_to_num(labels, nan=0.0).max(1) > 0)
    normal = np.setdiff1d(np.arange(n), abnormal)
    shards = []
    for _ in range(devices):
        k = min(int(rng.integers(low, high + 1)), n)
        if skew is None or len(abnormal) == 0 or len(normal) == 0:
            shards.append(np.sort(rng.choice(n, size=k, replace=False)))
            continue
        share = rng.beta(skew, skew)
        k_abn = min(int(round(k * share)), len(abnormal))
        k_norm = min(k - k_abn, len(normal))
        picked = np.concatenate([rng.choice(abnormal, size=k_abn, replace=False),
                                 rng.choice(normal, size=k_norm, replace=False)])
        shards.append(np.sort(picked))
    return shards


@dataclass(frozen=True)
class Population:
    """What the devices read: the cache of the site's training films, their labels and each device's rows."""

    folder: Path
    cache: Path
    devices: int
    films: int
    size: int

    @classmethod
    def read(cls, folder: str | Path) -> "Population":
        folder = Path(folder)
        meta = json.loads((folder / POPULATION_FILE).read_text())
        return cls(folder, Path(meta["cache"]), meta["devices"], meta["films"], meta["size"])

    def shard(self, device: int) -> np.ndarray:
        with np.load(self.folder / SHARDS_FILE) as z:
            start, end = z["offsets"][device], z["offsets"][device + 1]
            return z["rows"][start:end]

    def films_of(self, device: int) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (k, S, S), labels float32 (k, 14) with NaN = unknown) of one device."""
        rows = self.shard(device)
        images = np.load(self.cache, mmap_mode="r")
        return np.asarray(images[rows]), np.load(self.folder / LABELS_FILE, mmap_mode="r")[rows].astype(np.float32)


def write_population(folder: Path, cache: Path, labels: np.ndarray, shards: list[np.ndarray], size: int,
                     settings: dict) -> Population:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / LABELS_FILE, labels.astype(np.float32))
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)
    rows = np.concatenate(shards).astype(np.int64) if shards else np.zeros(0, np.int64)
    np.savez(folder / SHARDS_FILE, offsets=offsets, rows=rows)
    sizes = np.diff(offsets)
    covered = len(np.unique(rows))
    write_json_atomic(folder / POPULATION_FILE, {
        "cache": str(Path(cache).resolve()), "devices": len(shards), "films": int(len(labels)), "size": size,
        "films_per_device": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                             "total": int(sizes.sum())},
        "films_held_by_a_device": covered, "labels": list(LABELS), "settings": settings,
    })
    return Population.read(folder)
