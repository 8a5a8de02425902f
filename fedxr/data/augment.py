"""Training augmentation of whole batches, on the device the model trains on.

The training loader hands over the cached uint8 images untouched; this module turns a batch into the
model's normalised input with random geometry and intensity, after the batch has reached the device.
Done per image inside the loader's worker processes instead, augmentation capped an H200's DenseNet-121
training at the loader's ~1,400 img/s with 16 workers (benchmarks/results/train_throughput_gpu.json);
batched on the GPU it costs a few milliseconds per batch, and on a CPU-only machine the batched tensor
operations still beat per-image calls.

Random draws come from torch's global generator on the CPU (seeded per round by the trainers), so a seed
gives the same augmentation on any device.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from fedxr.imaging import standardize

#: Mild, anatomically sane geometry: rotation ±5°, shift ±4 % of the side, zoom 0.95–1.05; no flips (the
#: heart is on the left, and flipping would teach the model anatomy it will never see).
ROTATION_DEG, SHIFT_FRACTION, ZOOM_RANGE = 5.0, 0.04, (0.95, 1.05)
#: Intensity jitter over the range hospitals' detectors and processing differ by: gamma in [e^-r, e^r]
#: (0.74–1.35), contrast ±20 %, brightness ±8 %. A site's model then also fits the other sites' images,
#: which keeps federated averaging from pulling apart per-hospital intensity statistics.
GAMMA_LOG_RANGE, CONTRAST_RANGE, BRIGHTNESS_RANGE = 0.3, 0.2, 0.08


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n)


def augment_batch(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (N, 1, S, S) on any device → augmented, normalised float32 (N, 1, S, S) on that device."""
    n, device = len(images), images.device
    angle = torch.deg2rad(_uniform(n, -ROTATION_DEG, ROTATION_DEG))
    zoom = _uniform(n, *ZOOM_RANGE)
    # affine_grid works in [-1, 1] coordinates, so a shift of f of the side is 2f there.
    shift = _uniform(2 * n, -2 * SHIFT_FRACTION, 2 * SHIFT_FRACTION).view(n, 2)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    gamma = torch.exp(_uniform(n, -GAMMA_LOG_RANGE, GAMMA_LOG_RANGE))
    contrast = _uniform(n, 1 - CONTRAST_RANGE, 1 + CONTRAST_RANGE)
    brightness = _uniform(n, -BRIGHTNESS_RANGE, BRIGHTNESS_RANGE)
    # Every random parameter in one copy to the device, without waiting for it.
    params = torch.cat([theta.reshape(n, 6), torch.stack([gamma, contrast, brightness], 1)], 1).to(device, non_blocking=True)
    theta = params[:, :6].view(n, 2, 3)
    gamma, contrast, brightness = (params[:, 6 + k].view(n, 1, 1, 1) for k in range(3))
    x = images.float() / 255.0  # fedxr.imaging.to_unit, in torch (it works on numpy arrays)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Pixels moved in from outside the image are black, as with torchvision's RandomAffine.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x.clamp(0, 1) ** gamma
    level = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - level) * contrast + level + brightness).clamp_(0, 1)
    return standardize(x, mean, std)  # the model's one input normalisation (also the edge runtime's)
