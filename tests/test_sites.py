"""Partitioning is pure: complete, patient-disjoint, deterministic and independent of row order."""

import numpy as np
import pytest

from fedxr.data import sites as S

N = 400
IDS = np.arange(1000, 1000 + N)
RNG = np.random.default_rng(0)
LABELS = (RNG.random((N, 14)) < np.linspace(0.02, 0.3, 14)).astype(np.uint8)


def _schemes():
    return {
        "iid": lambda ids, lab, seed: S.partition_iid(ids, 4, seed, min_size=5),
        "quantity": lambda ids, lab, seed: S.partition_quantity(ids, 4, seed, alpha=1.0, min_size=5),
        "dirichlet": lambda ids, lab, seed: S.partition_dirichlet(ids, lab, 4, seed, alpha=0.5, min_size=5),
        "column": lambda ids, lab, seed: S.partition_column(ids, [f"h{i % 4}" for i in ids], 4, min_size=5)[0],
    }


@pytest.mark.parametrize("scheme", list(_schemes()))
def test_complete_deterministic_order_independent(scheme):
    fn = _schemes()[scheme]
    a = fn(IDS, LABELS, 7)
    assert a.shape == (N,)
    assert set(np.unique(a)) == {0, 1, 2, 3}
    assert np.bincount(a).min() >= 5
    np.testing.assert_array_equal(a, fn(IDS, LABELS, 7))
    perm = np.random.default_rng(1).permutation(N)
    b = fn(IDS[perm], LABELS[perm], 7)
    np.testing.assert_array_equal(b, a[perm])  # same patient → same site, whatever the row order


def test_seed_changes_the_draw():
    assert not np.array_equal(S.partition_iid(IDS, 4, 0), S.partition_iid(IDS, 4, 1))


def test_iid_sizes_equal():
    sizes = np.bincount(S.partition_iid(IDS, 3, 0))
    assert sizes.max() - sizes.min() <= 1


def _skew(assign, labels, k):
    """Mean total-variation distance between each site's label profile mix and the global one."""
    prof = S.primary_label(labels)
    glob = np.bincount(prof, minlength=15) / len(prof)
    return np.mean([0.5 * np.abs(np.bincount(prof[assign == s], minlength=15) / max(1, (assign == s).sum()) - glob).sum()
                    for s in range(k)])


def test_dirichlet_smaller_alpha_more_skew():
    skews = {}
    for alpha in (100.0, 0.3):
        skews[alpha] = np.mean([_skew(S.partition_dirichlet(IDS, LABELS, 4, s, alpha=alpha), LABELS, 4) for s in range(5)])
    assert skews[0.3] > skews[100.0] + 0.1


def test_primary_label_is_rarest_positive():
    labels = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(S.primary_label(labels, np.array([100, 5, 1])), [1, 3, 0])


def test_quantity_skews_sizes():
    sizes = np.bincount(S.partition_quantity(IDS, 4, 3, alpha=0.3, min_size=2), minlength=4)
    assert sizes.sum() == N
    assert sizes.max() > 2 * sizes.min()


def test_minimum_size_impossible():
    with pytest.raises(S.PartitionError, match="cannot make 5 sites of at least 100"):
        S.partition_iid(IDS, 5, 0, min_size=100)
    with pytest.raises(S.PartitionError, match="left a site under 45 patient.*raise alpha"):
        S.partition_dirichlet(IDS, LABELS, 8, 0, alpha=0.01, min_size=45, max_tries=5)


def test_column_grouping_and_too_few_values():
    vals = ["A"] * 50 + ["B"] * 30 + ["C"] * 20 + ["D"] * 20
    ids = np.arange(len(vals))
    assign, groups = S.partition_column(ids, vals, 2)
    assert sorted(sum(groups, [])) == ["A", "B", "C", "D"]
    assert groups == [["A", "D"], ["B", "C"]]
    assert np.bincount(assign).tolist() == [70, 50]  # greedy: largest first onto the lightest site
    with pytest.raises(S.PartitionError, match="only 4 distinct value"):
        S.partition_column(ids, vals, 5)


def test_split_patients_fractions_and_disjoint():
    split = S.split_patients(IDS, 0.15, 0.2, 0)
    counts = {k: int((split == k).sum()) for k in ("train", "val", "test")}
    assert counts == {"train": 260, "val": 60, "test": 80}
    perm = np.random.default_rng(3).permutation(N)
    np.testing.assert_array_equal(S.split_patients(IDS[perm], 0.15, 0.2, 0), split[perm])


def test_assert_patient_disjoint():
    S.assert_patient_disjoint([1, 1, 2], ["a", "a", "b"], "site")
    with pytest.raises(Exception, match="patient 1 appears in two sites"):
        S.assert_patient_disjoint([1, 1, 2], ["a", "b", "b"], "site")
