"""Drawing one phantom chest radiograph: anatomy, findings with their boxes, then acquisition.

Coordinates are fractions of the image side (u to the right, v down); the patient's right lung is on
the image's left, as on a real PA film. The picture is built as a density map (bright = dense: bone,
soft tissue, fluid; dark = air) and only then passed through the hospital's acquisition profile, so a
finding's contrast depends on the hospital as it does in practice. All operations are vectorised numpy
on the full grid or on the finding's own window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fedxr.data.phantom_cases import HospitalProfile, ImageCase
from fedxr.labels import LABEL_INDEX

#: Phantom v2 made the four findings that a from-scratch CNN could barely learn at 128 px (test AUROC
#: 0.56-0.70 for a ResNet-18 on 3,300 images) easier to see: {finding: (size factor, contrast factor)}
#: relative to v1. Everything else is drawn as in v1. The README's Data section states the same numbers.
CONSPICUITY = {
    "Nodule": (1.3, 1.5),
    "Infiltration": (1.0, 1.5),
    "Pneumonia": (1.0, 1.4),
    "Consolidation": (1.0, 1.0),
    "Pleural_Thickening": (1.3, 1.4),
}
#: Findings that get a bounding box (diffuse bilateral ones — Edema, Emphysema — do not, as in NIH).
BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
         "Pneumothorax", "Consolidation", "Fibrosis", "Pleural_Thickening", "Hernia")


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur through the FFT (periodic edges; used on noise and soft maps)."""
    if sigma_px <= 0:
        return img
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.rfftfreq(img.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(img) * kernel, s=img.shape).astype(np.float32)


def _bandpass(img: np.ndarray, fine_px: float, coarse_px: float) -> np.ndarray:
    """blur(img, fine) - blur(img, coarse) with one FFT pair."""
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.rfftfreq(img.shape[1])[None, :]
    f2 = fx**2 + fy**2
    kernel = np.exp(-2 * (np.pi * fine_px) ** 2 * f2) - np.exp(-2 * (np.pi * coarse_px) ** 2 * f2)
    return np.fft.irfft2(np.fft.rfft2(img) * kernel, s=img.shape).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field: Gaussian noise on a coarse grid, upsampled bicubically, unit std."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def _sig(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


@dataclass
class Anatomy:
    """A patient's body, drawn at one size. Masks are float32 in [0, 1]."""

    u: np.ndarray
    v: np.ndarray
    sharp: float
    body: np.ndarray
    lungs: list[np.ndarray]          # [right lung (image left), left lung]
    lung_box: list[tuple[float, float, float, float]]  # u0, v0, u1, v1 per lung
    heart: np.ndarray
    heart_box: tuple[float, float, float, float]
    dome: list[float]                # diaphragm height (v) per side
    centres: list[float]             # lung centre u per side
    collapsed_side: int | None = None  # Atelectasis: the lung (0 image left, 1 image right) that lost volume


def _ellipse(u, v, cu, cv, ru, rv, sharp):
    f = 1 - ((u - cu) / ru) ** 2 - ((v - cv) / rv) ** 2
    return _sig(f * min(ru, rv) * sharp * 0.5)


def draw_anatomy(size: int, rng: np.random.Generator, view: str, drawn: np.ndarray) -> tuple[Anatomy, np.ndarray]:
    """Return the anatomy and its density map (size, size) float32."""
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(g, g)
    sharp = size / 1.5
    shift_u, shift_v = rng.normal(0, 0.015), rng.normal(0, 0.015)
    u = u - shift_u
    v = v - shift_v
    emph = drawn[LABEL_INDEX["Emphysema"]]
    width = rng.uniform(0.9, 1.05) * (1.06 if emph else 1.0)
    body = _ellipse(u, v, 0.5, 0.58, 0.42 * width, 0.62, sharp)
    density = 0.32 * body
    # Lungs: superellipses cut below by the diaphragm dome. Emphysema: larger lungs, flat low domes.
    base = rng.uniform(0.70, 0.76) + (0.05 if emph else 0.0)
    dome_h = rng.uniform(0.04, 0.07) * (0.35 if emph else 1.0)
    lungs, boxes, domes, centres = [], [], [], []
    # Atelectasis: the volume loss raises the hemidiaphragm on the collapsed lung's side, and the finding
    # (its band, its box) is drawn in that same lung, so the model's evidence lies inside the box.
    collapsed = int(rng.integers(0, 2)) if drawn[LABEL_INDEX["Atelectasis"]] else None
    for side in (-1, 1):
        cu = 0.5 + side * 0.18 * width
        ru, top = 0.15 * width * rng.uniform(0.95, 1.05), rng.uniform(0.13, 0.18)
        dome = base + (0.02 if side == 1 else 0.0)  # the left dome sits a little lower
        if collapsed is not None and (side + 1) // 2 == collapsed:
            dome -= 0.03  # volume loss raises the hemidiaphragm
        rv = (dome - top) * 0.62
        shape = 1 - np.abs((u - cu) / ru) ** 2.4 - np.abs((v - (top + rv)) / rv) ** 2.0
        dome_curve = dome - dome_h * np.clip(1 - ((u - cu) / ru) ** 2, 0, 1)
        m = _sig(shape * 0.1 * sharp) * _sig((dome_curve - v) * sharp)
        lungs.append(m)
        boxes.append((cu - ru, top, cu + ru, dome))
        domes.append(dome)
        centres.append(cu)
    # Heart: to the patient's left; AP (supine, beam from the front) magnifies it.
    thorax_w = 2 * (0.18 + 0.15) * width
    ctr = rng.uniform(0.38, 0.47)
    if drawn[LABEL_INDEX["Cardiomegaly"]]:
        ctr = rng.uniform(0.53, 0.64)
    hw = ctr * thorax_w / 2 * (1.12 if view == "AP" else 1.0)
    hh = rng.uniform(0.12, 0.14) * (hw / 0.14) ** 0.5
    hcu, hcv = 0.5 + 0.04 + 0.4 * (hw - 0.14), domes[1] - hh * 0.55
    heart = _ellipse(u, v, hcu, hcv, hw, hh, sharp)
    air = np.clip(lungs[0] + lungs[1], 0, 1) * (1 - heart)
    # Mediastinum: the soft-tissue band between the lungs, widening downwards.
    med = _sig((0.05 + 0.04 * (v - 0.15) - np.abs(u - 0.5)) * sharp) * _sig((v - 0.08) * sharp) * body
    density = density + 0.08 * med + 0.12 * heart - 0.26 * air * (0.8 if emph else 1.0) * (1 - 0.5 * med)
    density -= 0.06 * air * emph  # hyperlucent
    # Vessels: band-passed noise, dense near the hila, fading to the periphery (fewer in emphysema).
    noise = rng.standard_normal((size, size)).astype(np.float32)
    vessels = np.abs(_bandpass(noise, size / 256, size / 64))
    for side, cu in zip((-1, 1), centres):
        hil = np.exp(-(((u - (cu - side * 0.04)) / 0.12) ** 2 + ((v - 0.45) / 0.15) ** 2))
        density += (0.22 if not emph else 0.09) * vessels * (0.35 + hil) * lungs[(side + 1) // 2] * (1 - heart)
    # Spine and vertebrae, ribs and clavicles.
    spine = _sig((0.035 - np.abs(u - 0.5)) * sharp) * body
    density += spine * (0.1 + 0.03 * np.cos(v * 2 * np.pi * 14))
    thorax = _sig((0.36 * width - np.abs(u - 0.5)) * sharp)
    # Posterior ribs: nine curved bands per side, both sides at once (the pattern is symmetric in |u|).
    x = np.abs(u - 0.5)
    spacing = (base - 0.18) / 8.5
    phase = (v - 0.25 * (x - 0.05) ** 2 + 0.1 * (x - 0.05) - 0.09 * x - 0.16) / spacing
    nearest = np.rint(phase)
    ribs = _sig((0.011 - np.abs(phase - nearest) * spacing) * sharp) * (x > 0.04) * (nearest >= 0) * (nearest <= 8)
    density += 0.07 * ribs * thorax * body
    clav_v = 0.14 if view == "PA" else 0.11
    for side in (-1, 1):
        x = (u - 0.5) * side
        density += 0.1 * _sig((0.012 - np.abs(v - clav_v + 0.12 * (x - 0.06))) * sharp) * (x > 0.03) * (x < 0.3)
    # Gastric bubble under the left dome.
    density -= 0.1 * _ellipse(u, v, centres[1] + 0.02, domes[1] + 0.045, 0.045, 0.025, sharp) * body
    heart_box = (hcu - hw, hcv - hh, hcu + hw, hcv + hh)
    anat = Anatomy(u, v, sharp, body, lungs, boxes, heart, heart_box, domes, centres, collapsed)
    return anat, density.astype(np.float32)


def _box_of(mask: np.ndarray, level: float = 0.5) -> tuple[float, float, float, float] | None:
    ys, xs = np.nonzero(mask > level)
    if len(xs) == 0:
        return None
    n = mask.shape[0]
    return xs.min() / n, ys.min() / n, (xs.max() + 1) / n, (ys.max() + 1) / n


class _Painter:
    """What every finding is drawn with: the anatomy, the density image (changed in place), the random stream
    and the boxes found so far. The findings draw in FINDING_ORDER, so the random numbers each one takes
    (and with them every phantom image) depend only on the case."""

    def __init__(self, anat: Anatomy, density: np.ndarray, rng: np.random.Generator):
        self.anat, self.density, self.rng = anat, density, rng
        self.u, self.v, self.sharp = anat.u, anat.v, anat.sharp
        self.visible = [m * (1 - anat.heart) for m in anat.lungs]
        self.lungs_all = np.clip(self.visible[0] + self.visible[1], 0, 1)
        self.size = density.shape[0]
        self.patchy = _smooth_noise(rng, self.size, 14)
        self.boxes: dict[str, tuple] = {}

    def sev(self) -> float:
        """A finding's severity: some are subtle."""
        return self.rng.uniform(0.45, 1.0)

    def side(self) -> int:
        return int(self.rng.integers(0, 2))

    def lung_point(self, side: int, v_lo: float = 0.3, v_hi: float = 0.85) -> tuple[float, float]:
        """A random point of visible lung (not behind the heart) in a band of the lung's height."""
        u, v = self.u, self.v
        u0, v0, u1, v1 = self.anat.lung_box[side]
        band = (v >= v0 + v_lo * (v1 - v0)) & (v <= v0 + v_hi * (v1 - v0))
        idx = np.flatnonzero((self.visible[side] > 0.9) & band)
        if len(idx) == 0:
            idx = np.flatnonzero(self.visible[side] > 0.5)
        k = idx[self.rng.integers(0, len(idx))]
        return float(u.flat[k]), float(v.flat[k])

    def add(self, name: str, mask: np.ndarray, amp: float, box_level: float = 0.5) -> None:
        self.density[...] += amp * mask
        if name in BOXED and name not in self.boxes:
            b = _box_of(mask, box_level)
            if b is not None:
                self.boxes[name] = b


def _nodule(p: _Painter) -> None:
    s = p.side()
    cu, cv = p.lung_point(s, 0.15, 0.8)
    r = p.rng.uniform(0.011, 0.022) * CONSPICUITY["Nodule"][0]
    p.add("Nodule", _ellipse(p.u, p.v, cu, cv, r, r, p.sharp), (0.14 * p.sev() + 0.06) * CONSPICUITY["Nodule"][1])


def _mass(p: _Painter) -> None:
    s = p.side()
    cu, cv = p.lung_point(s, 0.2, 0.75)
    r = p.rng.uniform(0.035, 0.07)
    lob = _ellipse(p.u, p.v, cu, cv, r, r * p.rng.uniform(0.8, 1.2), p.sharp) * (1 + 0.15 * np.tanh(p.patchy))
    p.add("Mass", np.clip(lob, 0, 1), 0.2 * p.sev() + 0.08)


def _cardiomegaly(p: _Painter) -> None:
    p.boxes["Cardiomegaly"] = p.anat.heart_box  # the heart itself was drawn large by draw_anatomy


def _effusion(p: _Painter) -> None:
    anat, u, v = p.anat, p.u, p.v
    for s in (p.side(),) if p.rng.random() < 0.7 else (0, 1):
        u0, v0, u1, v1 = anat.lung_box[s]
        level = v1 - (v1 - v0) * (0.08 + p.rng.uniform(0.1, 0.3) * p.sev())
        lateral = np.abs(u - (anat.centres[s] - (1 if s == 0 else -1) * 0.02)) / (u1 - u0)
        meniscus = level - 0.1 * lateral**2  # fluid climbs the lateral wall
        p.add("Effusion", _sig((v - meniscus) * p.sharp * 0.4) * p.visible[s], 0.24)


def _pneumothorax(p: _Painter) -> None:
    anat, u, v, sharp = p.anat, p.u, p.v, p.sharp
    s = p.side()
    u0, v0, u1, v1 = anat.lung_box[s]
    edge_u = u1 - 0.25 * (u1 - u0) * p.sev() if s == 1 else u0 + 0.25 * (u1 - u0) * p.sev()
    region = (_sig((u - edge_u) * sharp) if s == 1 else _sig((edge_u - u) * sharp)) * anat.lungs[s]
    region = np.maximum(region, _sig((v0 + 0.18 * (v1 - v0) * p.sev() - v) * sharp) * anat.lungs[s])
    vessels = p.density - _blur(p.density, p.size / 64)
    p.density -= region * (vessels + 0.06 + 0.05 * p.sev())  # no lung markings, darker
    line = np.exp(-(((u - edge_u) * p.size / 1.2) ** 2)) * anat.lungs[s] * (v > v0 + 0.1)
    p.add("Pneumothorax", line, 0.06)
    region_box = _box_of(region, 0.5)
    if region_box is not None:  # else the pleural line's own box (from add) stays, if it has one
        p.boxes["Pneumothorax"] = region_box


def _atelectasis(p: _Painter) -> None:
    u, v, sharp = p.u, p.v, p.sharp
    assert p.anat.collapsed_side is not None  # draw_anatomy picks one whenever Atelectasis is drawn
    s = p.anat.collapsed_side  # the side whose hemidiaphragm draw_anatomy raised
    cu, cv = p.lung_point(s, 0.6, 0.85)
    angle = p.rng.uniform(-0.3, 0.3)
    band = _sig((0.012 - np.abs((v - cv) - angle * (u - cu))) * sharp) * _ellipse(u, v, cu, cv, 0.09, 0.05, sharp)
    p.add("Atelectasis", band, 0.12 * p.sev() + 0.07)


def _airspace(name: str, thresh: float, amp: float, zone: tuple[float, float]):
    """Infiltration, consolidation, pneumonia: a patchy opacity in a zone of one lung."""
    def paint(p: _Painter) -> None:
        s = p.side()
        cu, cv = p.lung_point(s, *zone)
        region = _ellipse(p.u, p.v, cu, cv, p.rng.uniform(0.05, 0.09), p.rng.uniform(0.05, 0.1), p.sharp / 3)
        patch = _sig((p.patchy - thresh) * 3) * region * p.anat.lungs[s]
        p.add(name, patch, (amp * p.sev() + 0.06) * CONSPICUITY[name][1], box_level=0.25)
    return paint


def _edema(p: _Painter) -> None:
    u, v = p.u, p.v
    for s, cu in enumerate(p.anat.centres):
        hil = np.exp(-(((u - cu + (0.04 if s == 1 else -0.04)) / 0.1) ** 2 + ((v - 0.47) / 0.12) ** 2))
        p.density += (0.12 * p.sev() + 0.06) * hil * p.visible[s]


def _fibrosis(p: _Painter) -> None:
    u, v, size, patchy = p.u, p.v, p.size, p.patchy
    mesh = np.abs(np.sin(u * size / 3.1 + 2 * patchy)) * np.abs(np.sin(v * size / 2.9 - patchy))
    zone = p.lungs_all * _sig((v - 0.45) * p.sharp / 4)
    p.add("Fibrosis", (mesh > 0.7) * zone, 0.09 * p.sev() + 0.07, box_level=0.5)


def _pleural_thickening(p: _Painter) -> None:
    u, v = p.u, p.v
    s = p.side()
    u0, v0, u1, v1 = p.anat.lung_box[s]
    wall = u0 if s == 0 else u1
    half = 0.012 * CONSPICUITY["Pleural_Thickening"][0]
    rim = (_sig((half - np.abs(u - wall - (half if s == 0 else -half))) * p.sharp) * (v > v0 + 0.02)
           * (v < v0 + 0.55 * (v1 - v0)) * p.anat.body)
    p.add("Pleural_Thickening", rim, (0.12 * p.sev() + 0.08) * CONSPICUITY["Pleural_Thickening"][1])


def _hernia(p: _Painter) -> None:
    u, v, sharp = p.u, p.v, p.sharp
    cu, cv = 0.5 + p.rng.uniform(-0.02, 0.03), p.anat.dome[1] - p.rng.uniform(0.03, 0.06)
    r = p.rng.uniform(0.035, 0.05)
    blob = _ellipse(u, v, cu, cv, r * 1.2, r, sharp)
    p.add("Hernia", blob, 0.1 * p.sev() + 0.04)
    p.density -= 0.12 * _ellipse(u, v, cu, cv - r * 0.3, r * 0.6, r * 0.35, sharp)  # gas lucency


#: The order findings are drawn in (each takes its random numbers in turn: changing it changes every phantom).
FINDING_ORDER = (
    ("Nodule", _nodule), ("Mass", _mass), ("Cardiomegaly", _cardiomegaly), ("Effusion", _effusion),
    ("Pneumothorax", _pneumothorax), ("Atelectasis", _atelectasis),
    ("Infiltration", _airspace("Infiltration", 0.6, 0.07, (0.2, 0.85))),
    ("Consolidation", _airspace("Consolidation", -0.3, 0.15, (0.45, 0.85))),
    ("Pneumonia", _airspace("Pneumonia", 0.35, 0.1, (0.4, 0.85))),
    ("Edema", _edema), ("Fibrosis", _fibrosis), ("Pleural_Thickening", _pleural_thickening), ("Hernia", _hernia),
)


def draw_findings(anat: Anatomy, density: np.ndarray, drawn: np.ndarray, rng: np.random.Generator) -> dict[str, tuple]:
    """Add every drawn finding to ``density`` in place; return {label: box (u0, v0, u1, v1)}."""
    painter = _Painter(anat, density, rng)
    for name, paint in FINDING_ORDER:
        if drawn[LABEL_INDEX[name]]:
            paint(painter)
    return painter.boxes


def acquire(density: np.ndarray, prof: HospitalProfile, view: str, rng: np.random.Generator) -> np.ndarray:
    """Apply the hospital's acquisition profile to a density map; returns uint8 (size, size)."""
    size = density.shape[0]
    img = np.clip(density, 0, None) / 0.75
    if view == "AP":
        img = img * 0.95 + 0.03  # portable: lower contrast, more scatter
    img = np.clip(img, 0, 1.5) ** prof.gamma * prof.contrast * rng.uniform(0.93, 1.07) + prof.exposure + 0.08
    img = _blur(img, prof.blur_px * size / 256)
    img = img + rng.normal(0, prof.noise * (1.3 if view == "AP" else 1.0), img.shape)
    out = np.clip(img * 255, 0, 255).astype(np.uint8)
    if rng.random() < prof.collimation:
        top, left, right = (int(size * rng.uniform(0.0, 0.06)) for _ in range(3))
        out[:top] = 0
        out[:, :left] = 0
        if right:
            out[:, size - right:] = 0
    return out


def burn_marker(img: np.ndarray, prof: HospitalProfile, view: str) -> np.ndarray:
    """Burn the hospital's side marker (and PORTABLE on AP films) into a corner, as technologists do."""
    size = img.shape[0]
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default(size=max(8, size // 18))
    text = "R" if view == "PA" else "R PORT"
    corner = prof.marker_corner
    x = int(size * 0.04) if corner in (0, 2) else int(size * (0.78 if view == "PA" else 0.62))
    y = int(size * 0.04) if corner in (0, 1) else int(size * 0.9)
    draw.text((x, y), text, fill=235, font=font)
    return np.asarray(pil)


def render(case: ImageCase, prof: HospitalProfile, size: int) -> tuple[np.ndarray, dict[str, tuple]]:
    """Draw one image. Returns (uint8 (size, size), {label: box as fractions (u0, v0, u1, v1)})."""
    rng = np.random.default_rng(list(case.seed) + [size])
    anat, density = draw_anatomy(size, rng, case.view, case.drawn)
    boxes = draw_findings(anat, density, case.drawn, rng)
    img = burn_marker(acquire(density, prof, case.view, rng), prof, case.view)
    # Report only boxes of findings that are also labelled (as NIH's boxes come from the reports).
    return img, {k: b for k, b in boxes.items() if case.labels[LABEL_INDEX[k]]}
