"""Out-of-distribution score: how far an image's feature statistics lie from the training images', stage by stage.

Method (justified in the README): at every stage of the network from 1/4 of the input resolution down, the feature map's
per-channel mean and standard deviation — the statistics Gram-matrix and feature-statistics detectors use
(Sastry & Oore, ICML 2020) — are modelled as one Gaussian per training site with a covariance shared by the sites
(Lee et al., NeurIPS 2018, with "class" = site: a federation's sites differ in scanner and case mix, and one
Gaussian over all of them would be wide where no image lies). Per stage, an image's score is its Mahalanobis
distance to the nearest site divided by that distance's validation quantile (1 ≈ the edge of validation images).
The same is done for two small descriptions of the input image itself — its texture at four scales with its
intensity moments (:func:`image_statistics`) and its coarse layout (:func:`image_layout`) — and the image's score
is the largest of the network stages' mean and those two distances (:func:`combined`). Early stages see what the image is made of (noise, contrast,
texture — a photograph, an inverted film), the last what the network makes of it; the last stage alone missed
most of those in benchmarks/ood.py, and the network's stages alone put most phantom images inside a real-film
model's distribution, which the input's texture gives away. Energy or max-logit scores come from the 14 sigmoid
outputs alone and miss inputs the network maps to ordinary logits (measured beside, in the same benchmark).
Each site contributes only feature sums per stage (n, Σf, Σffᵀ): no image or per-image feature leaves a site.

The score is computed inside the exported graph (a second output ``ood_score``), so every runtime — laptop,
board, phone, INT8 — gets it from onnxruntime alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

OOD_OUTPUT = "ood_score"
#: Shrinkage of the shared covariance towards a multiple of the identity: pooled ReLU features have directions of
#: (near) zero variance whose inverse would make any small change look infinitely far. Chosen a priori, not tuned.
SHRINKAGE = 0.1
#: Validation quantile the threshold is set at: about 1 % of in-distribution images are flagged.
DEFAULT_QUANTILE = 0.99


#: Scales (halvings of the input) the image statistics look at.
IMAGE_SCALES = 4
#: The image's mean intensity on a LAYOUT_CELLS x LAYOUT_CELLS grid: where it is bright and dark (a rotated film has
#: its abdomen at the side).
LAYOUT_CELLS = 4
#: Stages the image itself contributes after the network's: its texture statistics and its layout.
IMAGE_STAGES = 2

# How the head is written matters at the edge as much as what it computes: onnxruntime runs a one-channel 3 x 3
# convolution in its blocked layout, 8 channels wide (7 of them padding), and each node costs a few microseconds
# whatever its size. So the Laplacian is two one-dimensional average pools, spatial means and second moments are
# ReduceMean / ReduceL2 (no squared copy of a feature map), and the distances of all stages are one computation.
# Same quantities as before (to float rounding): the fitted statistics and the benchmarks' figures carry over.


def _mean(t: torch.Tensor) -> torch.Tensor:
    """(N, C) spatial means."""
    return t.mean((2, 3))


def _mean_square(t: torch.Tensor) -> torch.Tensor:
    """(N, C) spatial means of the squares, as (ReduceL2 / √n)²: no squared copy of the map, and divided before it
    is squared, so that an FP16 file's sum of squares (past 65,504 for a bright 224 px image) never becomes inf."""
    return (torch.linalg.vector_norm(t, 2, dim=(2, 3)) / math.sqrt(t.shape[-1] * t.shape[-2])) ** 2


def _laplacian_over_3(h: torch.Tensor) -> torch.Tensor:
    """The 4-neighbour Laplacian (zero padding) divided by 3, as two 1-D average pools: (up + x + down) / 3 +
    (left + x + right) / 3 − 2x = (up + down + left + right − 4x) / 3: the 3 x 3 kernel [[0, 1, 0], [1, −4, 1],
    [0, 1, 0]] / 3, exactly."""
    vertical = torch.nn.functional.avg_pool2d(h, (3, 1), stride=1, padding=(1, 0), count_include_pad=True)
    horizontal = torch.nn.functional.avg_pool2d(h, (1, 3), stride=1, padding=(0, 1), count_include_pad=True)
    return vertical + horizontal - 2 * h


def image_statistics(x: torch.Tensor) -> torch.Tensor:
    """(N, 2 * IMAGE_SCALES + 3) statistics of the model's input itself, before any learned filter: the mean
    absolute and RMS Laplacian at 4 scales (texture and noise: a rendered phantom is smooth where a film has
    grain, a photograph has edges everywhere) and the intensity mean, spread and third moment (contrast and
    polarity: an inverted film). The network's feature statistics describe what it learned to look at; an
    image made differently can still land among them (a model trained on real films put 78 % of phantom
    images inside its training distribution on those alone)."""
    g = x[:, :1]
    absolute, square, h = [], [], g
    for scale in range(IMAGE_SCALES):
        e = _laplacian_over_3(h)
        n = h.shape[-1] * h.shape[-2]
        absolute.append(torch.linalg.vector_norm(e, 1, dim=(2, 3)) * (3.0 / n))
        square.append(_mean_square(e))
        if scale < IMAGE_SCALES - 1:
            h = torch.nn.functional.avg_pool2d(h, 2)
    # Raw moments (three reductions over the image) and the central ones from them.
    m1, m2, m3 = _mean(g), _mean_square(g), _mean(g * g * g)
    var = (m2 - m1 * m1).clamp_min(0)
    third = m3 - 3 * m1 * m2 + 2 * m1 * m1 * m1
    rms = (torch.cat([torch.cat(square, 1) * 9.0, var], 1) + 1e-6).sqrt()  # 9 = 3²: the Laplacian's own scale
    texture = torch.stack([torch.cat(absolute, 1), rms[:, :IMAGE_SCALES]], 2).flatten(1)  # |e|, rms per scale
    return torch.cat([texture, m1, rms[:, IMAGE_SCALES:], third], 1)


def image_layout(x: torch.Tensor) -> torch.Tensor:
    """(N, LAYOUT_CELLS²): the input's mean intensity on a coarse grid — where the film is bright and dark (a
    rotated film has its mediastinum across and its abdomen at the side). Kept apart from the texture
    statistics: in one Gaussian, the layout's wide spread between patients hid the phantom's texture."""
    return torch.nn.functional.adaptive_avg_pool2d(x[:, :1], LAYOUT_CELLS).flatten(1)


def stage_statistics(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([per network stage from 1/4 resolution down: (N, 2C) channel means and standard deviations, then the
    image's own texture statistics and layout (:func:`image_statistics`, :func:`image_layout`)], logits)."""
    # Told apart by their attributes (timm's forward_intermediates; TinyCNN's features, pool and head), which
    # nn.Module's own type cannot know: it types every unknown attribute as `Tensor | Module`.
    model: Any = net
    if hasattr(model, "forward_intermediates"):
        final, maps = model.forward_intermediates(x, intermediates_only=False)
        logits = model.forward_head(final)
    elif hasattr(model, "pool") and hasattr(model, "head"):  # TinyCNN: the output of every conv-BN-ReLU block
        maps, h = [], x
        for layer in model.features:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                maps.append(h)
        logits = model.head(model.pool(h).flatten(1))
    else:
        raise TypeError(f"{type(net).__name__}: cannot read its stages for the out-of-distribution score")
    # Stages at 1/4 of the input resolution and below: the stem's full-size map holds little the next stage does
    # not, and its statistics were a quarter of a student's INT8 latency (a float pass over the largest map).
    maps = [m for m in maps if m.shape[-1] * 4 <= x.shape[-1]]
    # Population variance as E[x²] − E[x]², clamped: 0 — not NaN — for a 1 x 1 map at a toy input size.
    stats = []
    for m in maps:
        mean = _mean(m)
        var = (_mean_square(m) - mean * mean).clamp_min(0)
        stats.append(torch.cat([mean, (var + 1e-6).sqrt()], 1))
    return stats + [image_statistics(x), image_layout(x)], logits


def combined(parts: torch.Tensor | np.ndarray):
    """The image's score from its scaled per-stage distances (N, stages), the last IMAGE_STAGES being the image's
    own (texture, layout): the largest of the network stages' mean and those. Each may see what the others
    miss (a rotated film has a normal texture; a phantom has normal-looking features to a real-film model)."""
    k = IMAGE_STAGES
    if parts.shape[1] <= k:
        return parts.max(1).values if isinstance(parts, torch.Tensor) else parts.max(1)
    if isinstance(parts, torch.Tensor):
        return torch.maximum(parts[:, :-k].mean(1), parts[:, -k:].max(1).values)
    return np.maximum(parts[:, :-k].mean(1), parts[:, -k:].max(1))


class ScoredNetwork(nn.Module):
    """The classifier with its OOD score: ``forward(x) -> (logits, ood_score)``. Every stage's scaled distance to
    its nearest site is computed at once: the whitened features of all stages side by side, their squared
    differences to each site's whitened means, and one matrix product that averages each stage's squares and
    divides by its validation scale² — so the graph's node count does not grow with the stages."""

    means: torch.Tensor    # (sites, D) buffers (register_buffer below)
    average: torch.Tensor  # (D, stages)

    def __init__(self, net: nn.Module, ood: dict):
        super().__init__()
        self.net = net
        self.whiten = nn.ParameterList()
        sites = {np.asarray(stage["means"]).shape[0] for stage in ood["stages"]}
        if len(sites) != 1:  # every stage is fitted from the same sites' sums
            raise ValueError(f"OOD stages fitted on different numbers of sites: {sorted(sites)}")
        means, columns = [], []
        for i, stage in enumerate(ood["stages"]):
            w = torch.tensor(np.asarray(stage["whiten"]), dtype=torch.float32)          # (d, d)
            m = torch.tensor(np.asarray(stage["means"]), dtype=torch.float32)           # (sites, d)
            self.whiten.append(nn.Parameter(w, requires_grad=False))
            means.append(m @ w)
            column = torch.zeros(w.shape[1], len(ood["stages"]))
            column[:, i] = 1.0 / (w.shape[1] * float(stage["scale"]) ** 2)
            columns.append(column)
        self.register_buffer("means", torch.cat(means, 1))
        self.register_buffer("average", torch.cat(columns, 0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stats, logits = stage_statistics(self.net, x)
        z = torch.cat([f @ w for f, w in zip(stats, self.whiten)], 1)                  # (N, D)
        d = z[:, None, :] - self.means[None]                                            # (N, sites, D)
        parts = torch.sqrt(((d * d) @ self.average).min(dim=1).values)                  # (N, stages), scaled
        return logits, combined(parts)


def site_feature_sums(features: np.ndarray) -> dict:
    """What one site sends for the OOD fit: image count, feature sum and sum of outer products."""
    f = np.asarray(features, np.float64)
    return {"n": int(len(f)), "sum": f.sum(0), "outer": f.T @ f}


def fit_gaussians(sums: list[dict], shrinkage: float = SHRINKAGE) -> dict:
    """One stage: site means and the whitening matrix of the shared (within-site) covariance, from the sites' sums."""
    sums = [s for s in sums if s["n"] > 1]
    if not sums:
        raise ValueError("no site has two or more training images to fit the OOD statistics on")
    means = np.stack([s["sum"] / s["n"] for s in sums])
    n = sum(s["n"] for s in sums)
    scatter = sum(s["outer"] - s["n"] * np.outer(m, m) for s, m in zip(sums, means))
    cov = scatter / max(1, n - len(sums))
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
    vals, vecs = np.linalg.eigh(cov)
    whiten = vecs / np.sqrt(np.maximum(vals, 1e-12))[None, :]
    return {"means": means.astype(np.float32), "whiten": whiten.astype(np.float32), "images": n, "dim": d,
            "shrinkage": shrinkage}


def distances(features: np.ndarray, stage: dict) -> np.ndarray:
    """One stage's distance to the nearest site (1 ≈ a typical training image), in numpy."""
    z = np.asarray(features, np.float64) @ np.asarray(stage["whiten"], np.float64)
    m = np.asarray(stage["means"], np.float64) @ np.asarray(stage["whiten"], np.float64)
    return np.sqrt(((z[:, None, :] - m[None]) ** 2).mean(-1).min(1))


def fit_stages(train_sums: list[list[dict]], val_stats: list[np.ndarray], quantile: float) -> dict:
    """Every stage's Gaussians from the sites' sums (``train_sums[site][stage]``), each stage's distance scaled by
    its validation quantile; returns ``{"stages": [...]}`` as :class:`ScoredNetwork` takes it."""
    stages = []
    for level, val in enumerate(val_stats):
        stage = fit_gaussians([site[level] for site in train_sums])
        stage["scale"] = float(max(np.quantile(distances(val, stage), quantile), 1e-6))
        stages.append(stage)
    return {"stages": stages}


def scores(stats: list[np.ndarray], ood: dict) -> np.ndarray:
    """The score :class:`ScoredNetwork` computes, in numpy (:func:`combined` of the scaled distances)."""
    return combined(np.stack([distances(f, st) / st["scale"] for f, st in zip(stats, ood["stages"])], axis=1))


def joint_energy(logits: np.ndarray) -> np.ndarray:
    """JointEnergy (Wang et al., NeurIPS 2021), the multi-label energy score: Σ log(1 + e^z); lower = more unusual.
    Returned negated so that, like the Mahalanobis distance, higher means further from the training data."""
    return -np.logaddexp(0, np.asarray(logits, np.float64)).sum(1)
