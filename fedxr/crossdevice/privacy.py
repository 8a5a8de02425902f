"""Differential privacy per device: each update clipped and noised on the device, accounted over the whole run.

The unit is the device: everything it holds. Each update it sends is a Gaussian mechanism — its change of the
parameters clipped to L2 norm ``clip`` as one vector, plus Gaussian noise,
added on the device, so neither the server nor anything between sees the exact update (local DP: the server is
not trusted with it). Two sets of films on one device may give any two updates within the clip, so the
sensitivity is ``2 * clip`` (replacement: the films changed, not added) and the noise's standard deviation is
``noise_multiplier * 2 * clip``. The noise multiplier is chosen before the run so that ``max_updates`` such
releases spend at most ``epsilon`` at ``delta`` under Opacus' RDP accountant (no subsampling amplification: the
server sees each update it receives); a device that has sent ``max_updates`` answers every later task as
dropped. Only the trainable parameters are released: buffers — BatchNorm's running statistics and step
counters — are sent as zero changes, so the student keeps the statistics it started with (noise on a running
variance can make it negative, and the step counter tells how many films a device has).

What ε means here: per device, per run. A film held by several devices (the simulation deals films out with
repetition when devices hold more than the site has) is exposed by each of them: :func:`film_epsilon_bound`. A
run started from an earlier DP run's model starts its devices' counts afresh: the two runs' ε add up. The noise
comes from torch's generator seeded from the operating system (not a cryptographic generator; Opacus'
``secure_mode`` would be for a deployment), and the task log keeps each update's norm before clipping, which a
deployment would not send.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=None)
def noise_multiplier(epsilon: float, delta: float, releases: int) -> float:
    """The Gaussian noise (in units of the sensitivity) that makes ``releases`` updates spend ``(epsilon, delta)``."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=releases,
                                      accountant="rdp"))


def epsilon_spent(multiplier: float, delta: float, releases: int) -> float:
    """ε a device has spent after ``releases`` noised updates."""
    if releases == 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(multiplier, 1.0, releases)]
    return float(accountant.get_epsilon(delta))


def film_epsilon_bound(multiplier: float, delta: float, max_updates: int, holders: int) -> float:
    """ε for one film held by ``holders`` devices that each send up to ``max_updates`` noised updates."""
    return epsilon_spent(multiplier, delta, max_updates * holders)


def privatise(diff: dict[str, np.ndarray], buffers: set[str], clip: float, std: float,
              generator: torch.Generator) -> tuple[dict, float]:
    """The update a DP device sends: the parameters' changes clipped together to L2 norm ``clip``, then N(0, std²)
    added to every coordinate; ``buffers`` (by state-dict name) sent as zero changes. Returns it and the norm of the
    parameters' change before clipping."""
    params = [k for k in diff if k not in buffers]
    norm = float(np.sqrt(sum(float(np.sum(np.square(diff[k], dtype=np.float64))) for k in params)))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    out = {}
    for k, v in diff.items():
        if k in buffers:
            out[k] = np.zeros_like(v)
            continue
        noise = torch.normal(0.0, std, size=tuple(v.shape), generator=generator).numpy() if std > 0 else 0.0
        out[k] = (v * scale + noise).astype(np.float32)
    return out, norm
