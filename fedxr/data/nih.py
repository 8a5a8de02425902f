"""Reader for NIH ChestX-ray14 metadata and image folders, in every layout NIH and Kaggle publish.

* ``Data_Entry_2017.csv``: the original, with a trailing comma on every line.
* ``Data_Entry_2017_v2020.csv(.gz)``: header ``OriginalImage[Width,Height]`` and
  ``OriginalImagePixelSpacing[x,y]``, each of which a CSV parser splits into two columns.
* Kaggle's ``sample_labels.csv``: size columns renamed (``OriginalImageWidth`` …), ages like ``058Y``.
* ``BBox_List_2017.csv(.gz)``: 9 header fields, 6 data fields, ``Infiltrate`` meaning Infiltration,
  boxes as x, y, w, h in 1024 px.
* ``train_val_list.txt`` / ``test_list.txt``: the official patient-wise split.

Everything is read into one table with canonical columns (see :data:`TABLE_COLUMNS`) plus the 14 label
columns named as in :data:`fedxr.labels.LABELS`.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fedxr.errors import DataError
from fedxr.imaging import IMAGE_SUFFIXES
from fedxr.labels import LABELS, UnknownLabelError, canonical_label, encode_findings

#: Canonical columns of the image table (the 14 label columns follow).
TABLE_COLUMNS = ("image", "patient_id", "follow_up", "age", "sex", "view", "findings")

#: Data_Entry header name → canonical column. Kaggle and both NIH revisions map to the same names.
_COLUMN_MAP = {
    "Image Index": "image",
    "Finding Labels": "findings",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
    "OriginalImage_Width": "orig_width",
    "OriginalImageWidth": "orig_width",
    "OriginalImage_Height": "orig_height",
    "OriginalImageHeight": "orig_height",
    "OriginalImagePixelSpacing_x": "spacing_x",
    "OriginalImagePixelSpacing_y": "spacing_y",
}
_REQUIRED = ("Image Index", "Finding Labels", "Patient ID")

#: Label files searched for in a data root, in order of preference.
LABEL_FILES = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
    "sample_labels.csv",
)
BBOX_FILES = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz")
#: Per-patient side tables merged into the image table when present (e.g. the phantom's hospitals).
PATIENT_TABLES = ("hospitals.csv",)

_AGE_RE = re.compile(r"^\s*(\d+)\s*([YMWD]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _normalise_header(fields: list[str]) -> list[str]:
    """Rejoin bracketed names split at their commas and expand them: ``A[x,y]`` → ``A_x``, ``A_y``."""
    out: list[str] = []
    i = 0
    while i < len(fields):
        name = fields[i].strip()
        if "[" in name and "]" not in name:
            parts = [name]
            while i + 1 < len(fields) and "]" not in parts[-1]:
                i += 1
                parts.append(fields[i].strip())
            name = ",".join(parts)
        m = re.match(r"^(.*?)\s*\[(.*)\]$", name)
        if m:
            out.extend(f"{m.group(1)}_{sub.strip()}" for sub in m.group(2).split(","))
        else:
            out.append(name)
        i += 1
    while out and out[-1] == "":
        out.pop()  # the original 2017 file ends every line with a comma
    return out


def parse_age(value: str) -> float:
    """``57`` → 57.0; Kaggle's ``058Y`` → 58.0, ``006M`` → 0.5. Empty → NaN."""
    if value is None or str(value).strip() == "":
        return float("nan")
    m = _AGE_RE.match(str(value))
    if not m:
        raise ValueError(f"age {value!r} is not a number or Kaggle-style age like 058Y")
    return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()]


def _read_rows(path: Path) -> tuple[list[str], pd.DataFrame]:
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    with _open_text(path) as fh:
        header_line = fh.readline()
        if not header_line.strip():
            raise DataError(f"{path}: file is empty; expected the NIH header 'Image Index,Finding Labels,...'")
        header = _normalise_header(next(csv.reader([header_line])))
        try:
            frame = pd.read_csv(fh, header=None, dtype=str, keep_default_na=False, skip_blank_lines=True)
        except pd.errors.EmptyDataError:
            frame = pd.DataFrame()
    if frame.shape[0] == 0:
        raise DataError(f"{path}: has a header but no rows")
    # Rows may carry one empty trailing field more than the header (original 2017 file).
    if frame.shape[1] > len(header):
        extra = frame.iloc[:, len(header):]
        if (extra != "").any().any():
            raise DataError(f"{path}: rows have {frame.shape[1]} fields but the header names {len(header)}")
        frame = frame.iloc[:, : len(header)]
    elif frame.shape[1] < len(header):
        raise DataError(f"{path}: rows have {frame.shape[1]} fields but the header names {len(header)}")
    frame.columns = header
    return header, frame


def read_data_entry(path: str | Path) -> pd.DataFrame:
    """Read a Data_Entry / sample_labels CSV into the canonical image table (one row per image)."""
    path = Path(path)
    header, raw = _read_rows(path)
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(repr(c) for c in missing)}; "
            f"found {', '.join(header)}. An NIH label file needs 'Image Index', 'Finding Labels' and 'Patient ID'."
        )
    table = raw.rename(columns={k: v for k, v in _COLUMN_MAP.items() if k in raw.columns})
    table["image"] = table["image"].str.strip()
    labels = np.zeros((len(table), len(LABELS)), dtype=np.uint8)
    for i, text in enumerate(table["findings"].tolist()):
        try:
            labels[i] = encode_findings(text)
        except UnknownLabelError as exc:
            raise DataError(f"{path}, line {i + 2} ({table['image'].iat[i]}): {exc}") from None
    try:
        table["patient_id"] = table["patient_id"].astype(int)
    except ValueError:
        bad = table.loc[~table["patient_id"].str.strip().str.isdigit(), "patient_id"].iloc[0]
        raise DataError(f"{path}: 'Patient ID' must be an integer; found {bad!r}") from None
    if "follow_up" in table:
        table["follow_up"] = pd.to_numeric(table["follow_up"], errors="coerce").fillna(0).astype(int)
    else:
        # NIH file names are PPPPPPPP_FFF.png: the follow-up number is the part after the underscore.
        table["follow_up"] = table["image"].str.extract(r"_(\d+)\.", expand=False).fillna(0).astype(int)
    try:
        table["age"] = [parse_age(v) for v in table.get("age", pd.Series([""] * len(table)))]
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    table["sex"] = table.get("sex", "").astype(str).str.strip() if "sex" in table else ""
    table["view"] = table["view"].astype(str).str.strip() if "view" in table else ""
    for col in ("orig_width", "orig_height", "spacing_x", "spacing_y"):
        if col in table:
            table[col] = pd.to_numeric(table[col], errors="coerce")
    table[list(LABELS)] = labels
    table["findings"] = table["findings"].str.strip()
    dup = table["image"].duplicated()
    if dup.any():
        raise DataError(f"{path}: image {table['image'][dup].iloc[0]!r} is listed twice")
    ordered = [c for c in TABLE_COLUMNS] + [c for c in table.columns if c not in TABLE_COLUMNS and c not in LABELS]
    return table[ordered + list(LABELS)].reset_index(drop=True)


def read_bbox_list(path: str | Path) -> pd.DataFrame:
    """Read BBox_List_2017.csv(.gz): columns image, label (canonical), x, y, w, h (1024-px space)."""
    path = Path(path)
    header, raw = _read_rows(path)
    if len(header) < 3 or header[0] != "Image Index" or "Finding Label" not in header[1]:
        raise DataError(f"{path}: not a bounding-box list (header starts {header[:3]}); expected 'Image Index,Finding Label,Bbox [x,y,w,h]'")
    if raw.shape[1] < 6:
        raise DataError(f"{path}: box rows need 6 fields (image, label, x, y, w, h)")
    boxes = raw.iloc[:, :6].copy()
    boxes.columns = ["image", "label", "x", "y", "w", "h"]
    try:
        boxes["label"] = [canonical_label(v) for v in boxes["label"]]
    except UnknownLabelError as exc:
        raise DataError(f"{path}: {exc}") from None
    for col in "xywh":
        boxes[col] = pd.to_numeric(boxes[col], errors="raise")
    return boxes.reset_index(drop=True)


def read_list(path: Path) -> list[str]:
    """One image name per line (train_val_list.txt / test_list.txt)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def find_images(root: str | Path) -> dict[str, Path]:
    """Map file name → path for every image anywhere under ``root`` (``images_001/images/…``)."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_SUFFIXES) and name not in found:
                found[name] = Path(dirpath) / name
    return found


def find_label_file(root: Path) -> Path:
    for name in LABEL_FILES:
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"{root}: no NIH label file found; expected one of {', '.join(LABEL_FILES)}. "
        "For the built-in phantom data run `fedxr data phantom --out DIR` first."
    )


@dataclass
class NIHDataset:
    """A data set in the NIH layout: the image table (with ``path`` where found), boxes and lists."""

    root: Path
    label_file: Path
    table: pd.DataFrame
    boxes: pd.DataFrame | None = None
    missing: list[str] = field(default_factory=list)
    dropped: int = 0

    @property
    def labels(self) -> np.ndarray:
        """(N, 14) uint8 label matrix in canonical order."""
        return self.table[list(LABELS)].to_numpy(dtype=np.uint8)


def _merge_patient_tables(root: Path, table: pd.DataFrame) -> pd.DataFrame:
    for name in PATIENT_TABLES:
        side_path = root / name
        if not side_path.is_file():
            continue
        side = pd.read_csv(side_path, dtype=str, keep_default_na=False)
        if "Patient ID" not in side.columns:
            raise DataError(f"{side_path}: missing column 'Patient ID'")
        side = side.rename(columns={"Patient ID": "patient_id"})
        side["patient_id"] = side["patient_id"].astype(int)
        table = table.merge(side, on="patient_id", how="left", validate="many_to_one")
    return table


def _apply_official_lists(root: Path, table: pd.DataFrame) -> pd.DataFrame:
    tv_path, test_path = root / "train_val_list.txt", root / "test_list.txt"
    if not (tv_path.is_file() and test_path.is_file()):
        return table
    trainval, test = set(read_list(tv_path)), set(read_list(test_path))
    both = trainval & test
    if both:
        raise DataError(f"{root}: image {sorted(both)[0]} is in both train_val_list.txt and test_list.txt")
    official = np.where(table["image"].isin(test), "test", np.where(table["image"].isin(trainval), "train_val", ""))
    table = table.assign(official_split=official)
    listed = table[table["official_split"] != ""]
    per_patient = listed.groupby("patient_id")["official_split"].nunique()
    overlap = per_patient[per_patient > 1]
    if len(overlap):
        raise DataError(
            f"{root}: {len(overlap)} patient(s) appear in both train_val_list.txt and test_list.txt "
            f"(first: patient {overlap.index[0]}); splits must be patient-wise — fix the lists or remove them "
            "to let fedxr split by patient"
        )
    return table


def load_dataset(
    root: str | Path,
    missing: Literal["error", "drop", "ignore"] = "error",
    label_file: str | Path | None = None,
) -> NIHDataset:
    """Load a data set folder in the NIH layout (or a label file, whose folder is then the root).

    ``missing`` decides what happens to listed images not found under the root: ``error`` fails and
    names the first few, ``drop`` removes them (and records how many), ``ignore`` keeps them with an
    empty ``path`` (for metadata-only inspection).
    """
    # Absolute, so that manifests written from this table work from any working folder (site processes).
    root = Path(root).resolve()
    if root.is_file():
        label_file, root = root, root.parent
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found. For phantom data run `fedxr data phantom --out {root}`.")
    label_path = Path(label_file) if label_file else find_label_file(root)
    table = read_data_entry(label_path)
    table = _merge_patient_tables(root, table)
    table = _apply_official_lists(root, table)
    on_disk = find_images(root)
    table["path"] = [str(on_disk[n]) if n in on_disk else "" for n in table["image"]]
    absent = table.loc[table["path"] == "", "image"].tolist()
    dropped = 0
    if absent and missing == "error":
        raise DataError(
            f"{root}: {len(absent)} of {len(table)} listed images are not on disk (first: {', '.join(absent[:5])}). "
            "Images are found by file name anywhere under the root; copy them there, or pass "
            "--missing drop (recipe: data.missing_images: drop) to train on the ones present."
        )
    if absent and missing == "drop":
        table = table[table["path"] != ""].reset_index(drop=True)
        dropped = len(absent)
    boxes = None
    for name in BBOX_FILES:
        if (root / name).is_file():
            boxes = read_bbox_list(root / name)
            break
    return NIHDataset(root=root, label_file=label_path, table=table, boxes=boxes, missing=absent, dropped=dropped)
