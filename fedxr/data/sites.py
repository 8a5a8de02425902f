"""Partitioning patients into hospital sites and into train/val/test. Pure functions.

Every function takes per-patient arrays and a seed and returns per-patient assignments. Patients are
first sorted by id, so the result depends only on the set of patients (not on row order) and the seed.
A patient is always assigned to exactly one site and one split: no patient can leak across them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedxr.errors import DataError

SCHEMES = ("iid", "dirichlet", "quantity", "column")


class PartitionError(DataError):
    """A partition that cannot be made (too few patients, too few column values, ...)."""


def site_names(num_sites: int) -> list[str]:
    """NVFlare-style site names: site-1 … site-K."""
    return [f"site-{i + 1}" for i in range(num_sites)]


def _order(patient_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(patient_ids)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("patient_ids must be unique (one entry per patient)")
    return np.argsort(ids, kind="stable")


def _check_feasible(n: int, num_sites: int, min_size: int) -> None:
    if num_sites < 1:
        raise PartitionError("the number of sites must be at least 1")
    if n < num_sites * min_size:
        raise PartitionError(
            f"cannot make {num_sites} sites of at least {min_size} patient(s) each from {n} patients; "
            f"use fewer sites or a smaller minimum site size"
        )


def _check_sizes(assign: np.ndarray, num_sites: int, min_size: int, what: str) -> None:
    sizes = np.bincount(assign, minlength=num_sites)
    small = [i for i, s in enumerate(sizes) if s < min_size]
    if small:
        raise PartitionError(
            f"{what}: site-{small[0] + 1} would have {sizes[small[0]]} patient(s) (minimum {min_size}); "
            "use fewer sites, a larger alpha, or a smaller minimum"
        )


def partition_iid(patient_ids: Sequence[int] | np.ndarray, num_sites: int, seed: int, min_size: int = 1) -> np.ndarray:
    """Shuffle patients and deal them out like cards: site sizes differ by at most one patient."""
    ids = np.asarray(patient_ids)
    _check_feasible(len(ids), num_sites, min_size)
    order = _order(ids)
    rng = np.random.default_rng(seed)
    assign = np.empty(len(ids), dtype=np.int64)
    assign[order[rng.permutation(len(ids))]] = np.arange(len(ids)) % num_sites
    return assign


def partition_quantity(
    patient_ids: Sequence[int] | np.ndarray, num_sites: int, seed: int, alpha: float = 1.0, min_size: int = 1
) -> np.ndarray:
    """Skewed site sizes: shares ~ Dirichlet(alpha), on top of ``min_size`` patients per site."""
    ids = np.asarray(patient_ids)
    _check_feasible(len(ids), num_sites, min_size)
    rng = np.random.default_rng(seed)
    extra = rng.multinomial(len(ids) - num_sites * min_size, rng.dirichlet(np.full(num_sites, alpha)))
    sizes = extra + min_size
    assign = np.empty(len(ids), dtype=np.int64)
    assign[_order(ids)[rng.permutation(len(ids))]] = np.repeat(np.arange(num_sites), sizes)
    return assign


def primary_label(patient_labels: np.ndarray, label_counts: np.ndarray | None = None) -> np.ndarray:
    """Each patient's label profile as one class: its rarest positive finding, or C (= `No Finding`).

    ``patient_labels`` is (P, C) 0/1: a patient is positive for a class if any of their images is.
    Rarest is judged by ``label_counts`` (default: the column sums), so rare findings drive the skew.
    """
    labels = np.asarray(patient_labels, dtype=bool)
    counts = labels.sum(0) if label_counts is None else np.asarray(label_counts)
    rarity = np.where(labels, counts[None, :], np.inf)
    return np.where(labels.any(1), rarity.argmin(1), labels.shape[1])


def partition_dirichlet(
    patient_ids: Sequence[int] | np.ndarray,
    patient_labels: np.ndarray,
    num_sites: int,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 1,
    max_tries: int = 100,
) -> np.ndarray:
    """Label-skewed sites (the usual federated benchmark split, adapted to multi-label data).

    Chest X-ray labels are multi-label, so each patient is reduced to one *label profile*: their
    rarest positive finding across all their images, or `No Finding` (see :func:`primary_label`).
    For each profile a site mixture ``p ~ Dirichlet(alpha · 1_K)`` is drawn and that profile's patients
    are dealt to the sites in those proportions. Small ``alpha`` → each finding concentrates in few sites.
    Draws are repeated (up to ``max_tries``) until every site has ``min_size`` patients.
    """
    ids = np.asarray(patient_ids)
    _check_feasible(len(ids), num_sites, min_size)
    order = _order(ids)
    profile = primary_label(np.asarray(patient_labels)[order])
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        assign_sorted = np.empty(len(ids), dtype=np.int64)
        for cls in np.unique(profile):
            members = np.flatnonzero(profile == cls)
            members = members[rng.permutation(len(members))]
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
            for site, part in enumerate(np.split(members, cuts)):
                assign_sorted[part] = site
        if np.bincount(assign_sorted, minlength=num_sites).min() >= min_size:
            assign = np.empty_like(assign_sorted)
            assign[order] = assign_sorted
            return assign
    raise PartitionError(
        f"dirichlet split (alpha={alpha}) left a site under {min_size} patient(s) in {max_tries} draws; "
        "raise alpha, use fewer sites or lower the minimum site size"
    )


def partition_column(
    patient_ids: Sequence[int] | np.ndarray, values: Sequence[str], num_sites: int, min_size: int = 1
) -> tuple[np.ndarray, list[list[str]]]:
    """Natural sites from a per-patient column (hospital id, scanner, view position).

    With exactly ``num_sites`` distinct values each value is one site (in sorted order). With more values
    than sites, values are grouped greedily (largest first onto the smallest site). Fewer values than
    sites is an error. Returns the assignment and the values each site holds.
    """
    ids = np.asarray(patient_ids)
    vals = np.asarray([str(v) for v in values])
    _order(ids)
    uniq, counts = np.unique(vals, return_counts=True)
    if len(uniq) < num_sites:
        raise PartitionError(
            f"the column has only {len(uniq)} distinct value(s) ({', '.join(uniq[:10])}) for {num_sites} sites; "
            f"use --sites {len(uniq)} or another scheme"
        )
    groups: list[list[str]] = [[] for _ in range(num_sites)]
    load = np.zeros(num_sites, dtype=np.int64)
    if len(uniq) == num_sites:
        for i, v in enumerate(uniq):
            groups[i].append(str(v))
            load[i] = counts[i]
    else:
        for i in sorted(range(len(uniq)), key=lambda j: (-counts[j], uniq[j])):
            site = int(load.argmin())
            groups[site].append(str(uniq[i]))
            load[site] += counts[i]
    lookup = {v: s for s, g in enumerate(groups) for v in g}
    assign = np.array([lookup[v] for v in vals], dtype=np.int64)
    _check_sizes(assign, num_sites, min_size, "column split")
    return assign, groups


def split_patients(
    patient_ids: Sequence[int] | np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Seeded patient-wise split: an array of 'train' / 'val' / 'test', one per patient."""
    ids = np.asarray(patient_ids)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to below 1")
    n = len(ids)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    # Keep at least one patient in a non-empty split when the fraction asks for it.
    if test_fraction > 0 and n >= 3:
        n_test = max(n_test, 1)
    if val_fraction > 0 and n >= 3:
        n_val = max(n_val, 1)
    rng = np.random.default_rng(seed)
    ranked = _order(ids)[rng.permutation(n)]
    out = np.full(n, "train", dtype=object)
    out[ranked[:n_test]] = "test"
    out[ranked[n_test : n_test + n_val]] = "val"
    return out


def assert_patient_disjoint(patient_ids: Sequence[int] | np.ndarray, groups: Sequence[object], what: str) -> None:
    """Raise DataError when one patient id appears in two different groups (sites or splits)."""
    pairs: dict[int, object] = {}
    for pid, g in zip(patient_ids, groups):
        if pairs.setdefault(pid, g) != g:
            raise DataError(f"patient {pid} appears in two {what}s ({pairs[pid]} and {g}); {what}s must be patient-disjoint")
