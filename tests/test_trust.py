"""fedxr.trust's pure parts: Platt calibration, operating points, the OOD statistics (no model needed)."""

import numpy as np
import pytest

from fedxr.labels import LABELS
from fedxr.models.metrics import batched_auroc
from fedxr.trust import calibration as cal
from fedxr.trust import ood as O
from fedxr.trust.operating import operating_points, parse_rule, wilson


def _miscalibrated(n=4000, seed=0):
    """True log-odds z; labels drawn from sigmoid(z); a model that reports 3z + 2 (over-confident and shifted, as
    positive-class weights shift a network's logits)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.5, 1.5, size=(n, len(LABELS)))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    return 3 * z + 2, y


def test_platt_scaling_halves_the_calibration_error_and_keeps_the_ranking():
    logits, y = _miscalibrated()
    val, test = slice(0, 2000), slice(2000, None)
    fitted = cal.fit_calibration(logits[val], y[val], list(LABELS))
    assert all(fitted["calibrated"])
    assert np.allclose(fitted["a"], 1 / 3, atol=0.05) and np.allclose(fitted["b"], -2 / 3, atol=0.15)
    table = cal.ece_table(logits[test], y[test], fitted, list(LABELS), list(LABELS))
    assert table["macro_after"] <= table["macro_before"] / 2, table
    raw, calibrated = cal.apply_calibration(logits[test], None), cal.apply_calibration(logits[test], fitted)
    assert np.allclose(batched_auroc(raw.T, y[test].T), batched_auroc(calibrated.T, y[test].T))


def test_calibration_leaves_unknown_and_rare_labels_alone():
    logits, y = _miscalibrated(400)
    y[:, 0] = np.nan                       # never labelled
    y[:, 1] = 0.0
    y[:3, 1] = 1.0                         # 3 positives: too few to fit two numbers on
    fitted = cal.fit_calibration(logits, y, list(LABELS))
    assert fitted["calibrated"][:2] == [False, False] and fitted["a"][:2] == [1.0, 1.0]
    assert cal.expected_calibration_error(np.full(5, 0.5), np.full(5, np.nan)) is None


def test_operating_points_reproduce_their_stated_sensitivity_and_specificity():
    rng = np.random.default_rng(1)
    y = (rng.random((500, len(LABELS))) < 0.2).astype(float)
    probs = np.clip(0.3 * y + rng.random(y.shape) * 0.7, 0, 1)
    for rule in ("sensitivity:0.90", "specificity:0.95", "youden"):
        for c, point in enumerate(operating_points(probs, y, list(LABELS), rule)):
            called = probs[:, c] >= point["threshold"]
            sens = called[y[:, c] == 1].mean()
            spec = (~called)[y[:, c] == 0].mean()
            assert point["sensitivity"][0] == pytest.approx(sens, abs=1e-4)
            assert point["specificity"][0] == pytest.approx(spec, abs=1e-4)
            lo, hi = point["sensitivity"][1:]
            assert lo <= sens <= hi
            if rule.startswith("sensitivity"):
                assert sens >= 0.90
            if rule.startswith("specificity"):
                assert spec >= 0.95


def test_unreliable_findings_say_why():
    rng = np.random.default_rng(2)
    y = (rng.random((300, len(LABELS))) < 0.3).astype(float)
    y[:, 1] = 0
    y[:4, 1] = 1                           # too few positives
    y[:, 2] = np.nan                       # never labelled here
    probs = rng.random(y.shape)
    points = operating_points(probs, y, list(LABELS), "youden", auroc_ci={LABELS[0]: [0.45, 0.6]},
                              trained=[lab for lab in LABELS if lab != LABELS[3]])
    assert "includes 0.5" in points[0]["why"] and not points[0]["reliable"]
    assert "too few known validation cases (4 positive" in points[1]["why"]
    assert "too few" in points[2]["why"]
    assert points[3]["why"] == "never trained: no site labelled it"
    assert all(p["reliable"] for p in points[4:])


def test_rules_and_intervals():
    assert parse_rule("sensitivity:0.9") == ("sensitivity", 0.9)
    assert parse_rule("youden") == ("youden", None)
    with pytest.raises(ValueError, match="use youden, sensitivity:0.90"):
        parse_rule("sensitivity=0.9")
    lo, hi = wilson(0, 20)
    assert lo == 0 and 0.1 < hi < 0.2      # 0 of 20: the interval still admits up to ~16 %
    assert wilson(0, 0) is None


def test_ood_statistics_from_site_sums_match_the_pooled_fit():
    """Sites send (n, Σf, Σffᵀ) only; the shared covariance and the scores equal a direct fit on the images."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, (300, 6)), rng.normal(3, 1, (200, 6))
    fitted = O.fit_gaussians([O.site_feature_sums(a), O.site_feature_sums(b)], shrinkage=0.0)
    within = np.concatenate([a - a.mean(0), b - b.mean(0)])
    cov = within.T @ within / (len(within) - 2)
    w = np.asarray(fitted["whiten"], np.float64)
    assert np.allclose(w.T @ cov @ w, np.eye(6), atol=1e-4)  # whitening of the shared covariance
    inside = O.distances(a[:50], fitted)
    far = O.distances(rng.normal(10, 1, (50, 6)), fitted)
    assert inside.mean() < 1.5 and far.min() > 3      # ~1 for a training image, far for a shifted one
    between = O.distances(np.full((1, 6), 1.5), fitted)  # between the two sites: nearest site counts
    assert between[0] < O.distances(np.full((1, 6), 6.0), fitted)[0]
    with pytest.raises(ValueError, match="two or more training images"):
        O.fit_gaussians([O.site_feature_sums(a[:1])])


def test_image_statistics_see_texture_and_polarity():
    """Grain (the Laplacian's energy) tells a rendered-smooth image from a grainy film of the same shape, and an
    inverted film flips the third moment."""
    import torch

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    smooth = np.exp(-((xx - 0.5) ** 2 + (yy - 0.6) ** 2) / 0.05) - 0.3 * yy
    grainy = smooth + 0.05 * rng.standard_normal(smooth.shape)
    x = torch.tensor(np.stack([smooth, grainy, -grainy])[:, None], dtype=torch.float32)
    f = O.image_statistics(x).numpy()
    assert f.shape == (3, 2 * O.IMAGE_SCALES + 3)
    assert O.image_layout(x).shape == (3, O.LAYOUT_CELLS ** 2)
    assert f[1, 0] > 5 * f[0, 0]                       # finest-scale |Laplacian|: grain
    assert np.sign(f[1, -1]) == -np.sign(f[2, -1]) != 0  # third moment: polarity
    assert np.allclose(f[1, :-3], f[2, :-3], rtol=1e-5)  # texture does not depend on polarity


def test_the_laplacian_is_the_4_neighbour_kernel_with_zero_padding():
    """The head's Laplacian (two 1-D average pools, fast at the edge) is the 3 x 3 kernel it stands for, borders
    included, at an odd size too."""
    import torch

    x = torch.rand(2, 1, 33, 40)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).reshape(1, 1, 3, 3)
    expected = torch.nn.functional.conv2d(x, kernel, padding=1)
    assert torch.allclose(O._laplacian_over_3(x) * 3, expected, atol=1e-5)


def test_the_graphs_score_is_the_fitted_score():
    """ScoredNetwork (all stages' distances in one matrix product, scales folded in) gives what the numpy
    :func:`scores` gives from the same statistics, so the threshold fitted in numpy holds in the graph."""
    import torch

    from fedxr.models.registry import build_model

    torch.manual_seed(0)
    net = build_model("resnet18_narrow").eval()
    x = torch.rand(16, 1, 64, 64)
    with torch.no_grad():
        stats, _ = O.stage_statistics(net, x)
    stats = [s.numpy() for s in stats]
    sums = [[O.site_feature_sums(f[: 8]) for f in stats], [O.site_feature_sums(f[8:] + 0.1) for f in stats]]
    ood = O.fit_stages(sums, stats, 0.9)
    with torch.no_grad():
        _, graph = O.ScoredNetwork(net, ood)(x)
    assert np.allclose(graph.numpy(), O.scores(stats, ood), rtol=1e-4)
    assert len(ood["stages"]) == 4 + O.IMAGE_STAGES  # the narrow ResNet's 4 stages from 1/4 resolution down


def test_score_is_the_larger_of_the_network_mean_and_the_image_statistics():
    import torch

    assert O.IMAGE_STAGES == 2  # texture, layout
    parts = np.array([[0.5, 0.7, 3.0, 0.1],    # normal features, an image made differently (texture)
                      [0.5, 0.7, 0.1, 2.0],    # normal features and texture, laid out differently (rotated)
                      [2.0, 3.0, 0.2, 0.3],    # unusual features, an ordinary-looking image
                      [0.4, 0.6, 0.5, 0.2]])
    assert np.allclose(O.combined(parts), [3.0, 2.0, 2.5, 0.5])
    assert np.allclose(O.combined(torch.tensor(parts)).numpy(), O.combined(parts))
    assert np.allclose(O.combined(parts[:, :2]), parts[:, :2].max(1))  # only image stages (no network stage)
