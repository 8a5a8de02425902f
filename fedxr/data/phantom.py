"""`fedxr data phantom`: a synthetic chest X-ray data set written in the NIH ChestX-ray14 layout.

Output folder (written under a temporary name, then renamed):

* ``images/00000001_000.png`` … 8-bit gray, size×size; 1-5 images (follow-ups) per patient;
* ``Data_Entry_2017.csv`` in the original NIH format (trailing comma, bracketed size columns);
* ``BBox_List_2017.csv`` with a box for each localised finding drawn and reported. As in NIH, boxes
  are x, y, w, h in a 1024×1024 frame: multiply by size/1024 to get pixels of the stored images.
  Infiltration is spelt ``Infiltrate`` there, as NIH spells it;
* ``train_val_list.txt`` / ``test_list.txt`` (patient-wise, about 20 % of patients in test);
* ``hospitals.csv`` (Patient ID → hospital) for ``fedxr data split --scheme column --column hospital``;
* ``contact_sheet.png``: example images with their labels and boxes; ``phantom.json``: the settings
  and each hospital's acquisition profile.

The same arguments give byte-identical files: every image has its own seed (seed, patient, follow-up).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fedxr.data.atomic import atomic_dir
from fedxr.data.phantom_cases import (HospitalProfile, ImageCase, hospital_profiles, label_sets_from_table,
                                      sample_cases)
from fedxr.data.phantom_render import render
from fedxr.errors import FedxrError
from fedxr.labels import LABELS, decode_findings

DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                     "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
#: Detector pixel spacing (mm) and typical matrix per hospital, cycled: filled in like NIH's columns.
_DETECTORS = ((0.143, 2500, 3056), (0.139, 2021, 2021), (0.168, 2048, 2500), (0.171, 2992, 2991))
TEST_PATIENT_FRACTION = 0.2
MARKER_FILE = "phantom.json"
#: Bumped whenever the same settings would draw different images (v2: more conspicuous findings; v3: the
#: Atelectasis dome rises on the boxed side).
GENERATOR = "fedxr phantom v3"


def _render_patient(job: tuple[list[ImageCase], list[HospitalProfile], int, str]) -> list[tuple]:
    cases, profiles, size, folder = job
    rows = []
    for case in cases:
        img, boxes = render(case, profiles[case.hospital], size)
        Image.fromarray(img).save(Path(folder) / case.image, optimize=False)
        rows.append((case, boxes))
    return rows


def _validate(out: Path, patients: int, hospitals: int, size: int, force: bool) -> None:
    problems = []
    if hospitals < 1:
        problems.append("--hospitals must be at least 1")
    if patients < max(2, hospitals):
        problems.append(f"--patients ({patients}) must be at least the number of hospitals ({hospitals}) and 2")
    if size < 32:
        problems.append(f"--size {size} is too small; use 32 or more (default 256)")
    if out.is_dir() and any(out.iterdir()) and not force:
        problems.append(f"{out}: folder exists and is not empty; pass --force to replace it or choose another --out")
    if problems:
        raise FedxrError("; ".join(problems))


def _data_entry_line(case: ImageCase, prof_index: int) -> str:
    spacing, width, height = _DETECTORS[prof_index % len(_DETECTORS)]
    return (f"{case.image},{decode_findings(case.labels)},{case.follow_up},{case.patient_id},{case.age},"
            f"{case.sex},{case.view},{width},{height},{spacing},{spacing},")


def _bbox_lines(case: ImageCase, boxes: dict, size: int) -> list[str]:
    lines = []
    for label in LABELS:  # canonical order keeps the file deterministic
        if label in boxes:
            u0, v0, u1, v1 = boxes[label]
            x, y, w, h = (1024 * t for t in (u0, v0, u1 - u0, v1 - v0))
            name = "Infiltrate" if label == "Infiltration" else label
            lines.append(f"{case.image},{name},{x:.6f},{y:.6f},{w:.6f},{h:.6f}")
    return lines


def contact_sheet(examples: list[tuple[np.ndarray, ImageCase, dict]], path: Path, tile: int = 256, cols: int = 4) -> None:
    """A grid of images with their report labels (top) and boxes (red)."""
    rows = (len(examples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, rows * tile), "black")
    font = ImageFont.load_default(size=max(10, tile // 20))
    for i, (img, case, boxes) in enumerate(examples):
        pil = Image.fromarray(img).resize((tile, tile)).convert("RGB")
        draw = ImageDraw.Draw(pil)
        scale = tile
        for label, (u0, v0, u1, v1) in boxes.items():
            draw.rectangle([u0 * scale, v0 * scale, u1 * scale, v1 * scale], outline=(255, 60, 60), width=2)
            draw.text((u0 * scale + 2, max(0, v0 * scale - tile // 18)), label[:12], fill=(255, 90, 90), font=font)
        text = f"{case.view} {decode_findings(case.labels).replace('|', ', ')}"
        draw.rectangle([0, 0, tile, tile // 14 + 4], fill=(0, 0, 0))
        draw.text((3, 1), text[:40], fill=(255, 230, 80), font=font)
        sheet.paste(pil, ((i % cols) * tile, (i // cols) * tile))
    sheet.save(path)


def _pick_examples(results: list[tuple], n: int = 16) -> list[tuple]:
    """Prefer images showing findings not yet on the sheet, then normal ones."""
    seen: set[str] = set()
    chosen = []
    for case, boxes in results:
        new = {LABELS[i] for i in np.flatnonzero(case.labels)} - seen
        if new and boxes:
            chosen.append((case, boxes))
            seen |= new
        if len(chosen) >= n - 2:
            break
    normals = [(c, b) for c, b in results if not c.labels.any()][:2]
    return (chosen + normals)[:n]


def generate_phantom(
    out: str | Path, patients: int = 300, hospitals: int = 3, size: int = 256, seed: int = 0,
    labels_from: str | Path | None = None, workers: int | None = None, force: bool = False,
    progress: bool = True, label_noise: float = 0.08,
) -> dict:
    """Write a phantom data set to ``out``; returns the summary stored in ``phantom.json``."""
    out = Path(out)
    _validate(out, patients, hospitals, size, force)
    profiles = hospital_profiles(hospitals, seed)
    source = None
    if labels_from:
        from fedxr.data.nih import read_data_entry

        real = label_sets_from_table(read_data_entry(labels_from))
        order = np.random.default_rng([seed, 31]).permutation(len(real))
        source = [real[i] for i in order[:patients]]
    cases = sample_cases(patients, profiles, seed, label_noise=label_noise, label_source=source)
    n_images = sum(len(c) for c in cases)
    workers = max(1, workers or os.cpu_count() or 1)
    from tqdm.auto import tqdm

    with atomic_dir(out, replace=force) as tmp:
        (tmp / "images").mkdir()
        jobs = [(c, profiles, size, str(tmp / "images")) for c in cases]
        results: list[tuple] = []
        with tqdm(total=n_images, desc=f"phantom images ({size}px)", unit="img", disable=not progress) as bar:
            it: Iterator[list[tuple]]
            if workers == 1:
                it = map(_render_patient, jobs)
                pool = None
            else:
                pool = get_context("fork").Pool(workers)
                it = pool.imap(_render_patient, jobs, chunksize=8)
            try:
                for rows in it:
                    results.extend(rows)
                    bar.update(len(rows))
            finally:
                if pool is not None:
                    pool.close()
                    pool.join()
        entries = [DATA_ENTRY_HEADER] + [_data_entry_line(c, c.hospital) for c, _ in results]
        (tmp / "Data_Entry_2017.csv").write_text("\n".join(entries) + "\n")
        boxes = [BBOX_HEADER] + [line for c, b in results for line in _bbox_lines(c, b, size)]
        (tmp / "BBox_List_2017.csv").write_text("\n".join(boxes) + "\n")
        rng = np.random.default_rng([seed, 271])
        test_patients = set((rng.permutation(patients)[: max(1, round(patients * TEST_PATIENT_FRACTION))] + 1).tolist())
        (tmp / "test_list.txt").write_text("".join(f"{c.image}\n" for c, _ in results if c.patient_id in test_patients))
        (tmp / "train_val_list.txt").write_text("".join(f"{c.image}\n" for c, _ in results if c.patient_id not in test_patients))
        (tmp / "hospitals.csv").write_text("Patient ID,hospital\n" + "".join(
            f"{p[0].patient_id},{profiles[p[0].hospital].name}\n" for p in cases))
        picked = _pick_examples(results)
        examples = [(render(c, profiles[c.hospital], size)[0], c, b) for c, b in picked]
        contact_sheet(examples, tmp / "contact_sheet.png")
        summary = {
            "generator": GENERATOR,
            "settings": {"patients": patients, "hospitals": hospitals, "size": size, "seed": seed,
                         "labels_from": str(labels_from) if labels_from else None, "label_noise": label_noise},
            "images": n_images,
            "boxes": len(boxes) - 1,
            "box_frame": "x, y, w, h in a 1024x1024 frame; multiply by size/1024 for stored pixels",
            "hospitals": [{**{k: v for k, v in asdict(p).items() if k != "case_mix"},
                           "case_mix": dict(zip(LABELS, np.round(p.case_mix, 3).tolist()))} for p in profiles],
        }
        (tmp / MARKER_FILE).write_text(json.dumps(summary, indent=2))
    return summary
