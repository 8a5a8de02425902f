"""Who the phantom patients are: hospitals, patients, follow-ups, views and label sets. Pure numpy.

Labels are drawn per image from a Gaussian copula fitted to NIH ChestX-ray14 (Data_Entry_2017_v2020):
``NIH_PREVALENCE`` holds each finding's share of images and ``NIH_LATENT_CORR`` the latent correlation
whose thresholded draws reproduce NIH's pairwise co-occurrence (e.g. Edema with Pneumonia, Emphysema
with Pneumothorax, Effusion with Atelectasis and Cardiomegaly). Images of one patient share part of
their latent draw, so follow-ups resemble each other. Each hospital scales the prevalences by its own
case-mix factors (normalised so that the pooled prevalence stays NIH's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedxr.labels import LABELS, NUM_LABELS

#: Share of images positive for each finding in NIH ChestX-ray14 (canonical label order).
NIH_PREVALENCE = np.array([0.1031, 0.0248, 0.1188, 0.1774, 0.0516, 0.0565, 0.0128, 0.0473, 0.0416,
                           0.0205, 0.0224, 0.0150, 0.0302, 0.0020])
#: Latent (tetrachoric) correlation of the 14 findings in NIH, made positive definite.
NIH_LATENT_CORR = np.array([
    [1.00, 0.07, 0.37, 0.21, 0.06, -0.03, 0.14, 0.10, 0.31, -0.02, 0.13, 0.06, 0.10, 0.11],
    [0.07, 1.00, 0.39, 0.05, -0.07, -0.07, 0.02, -0.17, 0.08, 0.16, -0.06, 0.04, 0.06, 0.03],
    [0.37, 0.39, 1.00, 0.25, 0.20, 0.06, 0.12, 0.15, 0.28, 0.23, 0.05, -0.01, 0.23, -0.05],
    [0.21, 0.05, 0.25, 1.00, 0.04, 0.12, 0.29, 0.00, 0.14, 0.31, 0.00, 0.04, 0.07, -0.04],
    [0.06, -0.07, 0.20, 0.04, 1.00, 0.30, -0.01, 0.12, 0.25, 0.02, 0.11, 0.06, 0.24, 0.13],
    [-0.03, -0.07, 0.06, 0.12, 0.30, 1.00, -0.03, 0.03, 0.12, 0.00, -0.04, 0.12, 0.19, -0.04],
    [0.14, 0.02, 0.12, 0.29, -0.01, -0.03, 1.00, -0.09, 0.15, 0.56, -0.05, -0.09, 0.02, 0.00],
    [0.10, -0.17, 0.15, 0.00, 0.12, 0.03, -0.09, 1.00, 0.00, -0.20, 0.51, 0.00, 0.14, -0.03],
    [0.31, 0.08, 0.28, 0.14, 0.25, 0.12, 0.15, 0.00, 1.00, 0.11, 0.00, 0.02, 0.13, -0.11],
    [-0.02, 0.16, 0.23, 0.31, 0.02, 0.00, 0.56, -0.20, 0.11, 1.00, -0.09, -0.19, -0.01, -0.05],
    [0.13, -0.06, 0.05, 0.00, 0.11, -0.04, -0.05, 0.51, 0.00, -0.09, 1.00, -0.01, 0.14, -0.03],
    [0.06, 0.04, -0.01, 0.04, 0.06, 0.12, -0.09, 0.00, 0.02, -0.19, -0.01, 1.00, 0.26, 0.12],
    [0.10, 0.06, 0.23, 0.07, 0.24, 0.19, 0.02, 0.14, 0.13, -0.01, 0.14, 0.26, 1.00, 0.02],
    [0.11, 0.03, -0.05, -0.04, 0.13, -0.04, 0.00, -0.03, -0.11, -0.05, -0.03, 0.12, 0.02, 1.00],
])
#: Share of a follow-up's latent draw that it keeps from the patient (chronic findings persist).
PATIENT_SHARE = 0.6
_CHOL = np.linalg.cholesky(NIH_LATENT_CORR)


@dataclass(frozen=True)
class HospitalProfile:
    """How one hospital's images look (acquisition) and whom it sees (case mix)."""

    name: str
    exposure: float        # added to the image (brighter/darker overall)
    gamma: float           # detector response curve
    contrast: float        # window width
    noise: float           # quantum noise std (0..1 scale)
    blur_px: float         # focal-spot / processing blur at 256 px
    collimation: float     # probability of visible collimator borders
    marker_corner: int     # 0..3: where the burned-in side marker sits
    ap_fraction: float     # share of AP (portable, supine) views
    case_mix: np.ndarray = field(repr=False)  # (14,) prevalence multipliers


@dataclass(frozen=True)
class ImageCase:
    """One image to draw: identity, acquisition and its (true) findings."""

    patient_id: int
    follow_up: int
    hospital: int
    age: int
    sex: str
    view: str
    labels: np.ndarray       # (14,) uint8, what the report says
    drawn: np.ndarray        # (14,) bool, what the image shows (differs by label noise)
    seed: tuple

    @property
    def image(self) -> str:
        return f"{self.patient_id:08d}_{self.follow_up:03d}.png"


def hospital_profiles(num: int, seed: int) -> list[HospitalProfile]:
    """Deterministic per-hospital profiles; case mix normalised so the pooled prevalence is kept."""
    rng = np.random.default_rng([seed, 7919])
    mix = np.exp(rng.normal(0.0, 0.45, size=(num, NUM_LABELS)))
    mix /= mix.mean(0, keepdims=True)
    profiles = []
    for h in range(num):
        profiles.append(HospitalProfile(
            name=f"H{h + 1}",
            exposure=float(rng.uniform(-0.08, 0.08)), gamma=float(rng.uniform(0.8, 1.25)),
            contrast=float(rng.uniform(0.8, 1.2)), noise=float(rng.uniform(0.01, 0.05)),
            blur_px=float(rng.uniform(0.0, 1.3)), collimation=float(rng.uniform(0.0, 0.8)),
            marker_corner=int(rng.integers(0, 4)), ap_fraction=float(rng.uniform(0.2, 0.6)),
            case_mix=mix[h],
        ))
    return profiles


def _norm_ppf(p: np.ndarray) -> np.ndarray:
    """Inverse standard normal CDF (Acklam's rational approximation; |error| < 1.2e-9)."""
    a = [-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00]
    b = [-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01]
    c = [-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00]
    d = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00]
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    q = np.where(p < 0.5, p, 1 - p)
    t = np.sqrt(-2 * np.log(q))
    tail = (((((c[0] * t + c[1]) * t + c[2]) * t + c[3]) * t + c[4]) * t + c[5]) / ((((d[0] * t + d[1]) * t + d[2]) * t + d[3]) * t + 1)
    r = (p - 0.5) ** 2
    mid = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * (p - 0.5) / (
        ((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    return np.where(np.abs(p - 0.5) <= 0.425, mid, np.where(p < 0.5, tail, -tail))


def sample_cases(
    patients: int, profiles: list[HospitalProfile], seed: int, label_noise: float = 0.08,
    max_follow_ups: int = 5, label_source: list[list[tuple[np.ndarray, str]]] | None = None,
) -> list[list[ImageCase]]:
    """Per patient, the list of images to draw. ``label_source`` (from --labels-from) gives real
    patients' label vectors and views to reuse instead of the copula."""
    rng = np.random.default_rng([seed, 104729])
    k = len(profiles)
    if patients < k:
        raise ValueError(f"{patients} patients cannot fill {k} hospitals; use at least one patient per hospital")
    # Hospital sizes differ (Dirichlet shares) but every hospital sees at least one patient.
    sizes = 1 + rng.multinomial(patients - k, rng.dirichlet(np.full(k, 4.0)))
    hospital_of = rng.permutation(np.repeat(np.arange(k), sizes))
    out: list[list[ImageCase]] = []
    for i in range(patients):
        prng = np.random.default_rng([seed, 15485863, i])
        h = int(hospital_of[i])
        prof = profiles[h]
        pid = i + 1
        age0 = int(np.clip(prng.normal(47, 17), 1, 94))
        sex = "M" if prng.random() < 0.56 else "F"
        if label_source is not None:
            real = label_source[i % len(label_source)][:max_follow_ups]
            pairs = [(vec.astype(np.uint8), view) for vec, view in real]
        else:
            n = int(min(max_follow_ups, prng.geometric(0.55)))
            thresh = _norm_ppf(1 - np.clip(NIH_PREVALENCE * prof.case_mix, 1e-4, 0.6))
            z_patient = _CHOL @ prng.standard_normal(NUM_LABELS)
            pairs = []
            for _ in range(n):
                z = np.sqrt(PATIENT_SHARE) * z_patient + np.sqrt(1 - PATIENT_SHARE) * (_CHOL @ prng.standard_normal(NUM_LABELS))
                view = "AP" if prng.random() < prof.ap_fraction else "PA"
                pairs.append(((z > thresh).astype(np.uint8), view))
        cases = []
        for f, (vec, view) in enumerate(pairs):
            # Report noise: a reported finding the image does not show, or a drawn one the report missed.
            drawn = vec.astype(bool) & (prng.random(NUM_LABELS) >= label_noise)
            drawn |= (~vec.astype(bool)) & (prng.random(NUM_LABELS) < label_noise * NIH_PREVALENCE)
            cases.append(ImageCase(pid, f, h, min(99, age0 + f // 2), sex, view, vec, drawn, (seed, pid, f)))
        out.append(cases)
    return out


def label_sets_from_table(table, labels_cols=LABELS) -> list[list[tuple[np.ndarray, str]]]:
    """Real patients' (label vector, view) sequences from an NIH table, in patient order."""
    out = []
    for _, group in table.sort_values(["patient_id", "follow_up"]).groupby("patient_id", sort=True):
        vecs = group[list(labels_cols)].to_numpy(dtype=np.uint8)
        out.append(list(zip(vecs, group["view"].astype(str).replace("", "PA"))))
    return out
