"""A hospital's own label file: one CSV row per image, one column per finding, blank = unknown.

This is the generic input format (``data.source: csv``), and the one the readers of public label files
(:mod:`fedxr.data.formats`: CheXpert, PadChest, VinDr-CXR, MIMIC-CXR) translate into.

Columns:

* ``path`` (required): the image, relative to the data root (or absolute).
* ``patient_id`` (required): splits are by patient, and a patient belongs to one site.
* optional metadata: ``site``, ``source``, ``view``, ``sex``, ``age``, ``split`` (``train``/``test``: a
  source's own test list, kept like NIH's ``test_list.txt``), and columns the recipe names in
  ``data.extra_columns`` (kept, never read as labels). :data:`METADATA_COLUMNS` lists what is known.
* one column per finding, named as fedxr's labels or a known spelling (``Pleural Effusion``,
  ``Pleural Thickening``, ``Infiltrate`` …), plus optionally ``No Finding``. Values: ``1`` present,
  ``0`` absent, blank = unknown (``1.0`` / ``0.0`` are accepted too). A finding the file has no column for
  is unknown for every row.

Unknown stays unknown all the way through training (NaN in the label matrix; see fedxr.models.loss).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from fedxr.errors import DataError
from fedxr.labels import LABELS, NO_FINDING

#: Columns a labels CSV may have besides the findings (read as metadata, never as labels).
METADATA_COLUMNS = ("path", "patient_id", "site", "source", "view", "sex", "age", "split", "license",
                    "original_size", "image", "study_id", "follow_up")
REQUIRED_COLUMNS = ("path", "patient_id")

#: Other spellings of fedxr's findings in hospitals' and public data sets' label files (compared after
#: lower-casing and turning spaces, hyphens and underscores into one space).
_SPELLINGS = {
    "pleural effusion": "Effusion", "effusion": "Effusion", "infiltrate": "Infiltration",
    "infiltrates": "Infiltration", "pleural thickening": "Pleural_Thickening", "pulmonary fibrosis": "Fibrosis",
    "pulmonary edema": "Edema", "hiatal hernia": "Hernia", "no finding": NO_FINDING, "normal": NO_FINDING,
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_CANONICAL = {_key(n): n for n in (*LABELS, NO_FINDING)} | {_key(k): v for k, v in _SPELLINGS.items()}


def finding_name(column: str) -> str | None:
    """fedxr's name for a label column (``Pleural Effusion`` → ``Effusion``), or None if it is not a finding."""
    return _CANONICAL.get(_key(column))


def _parse_labels(raw: pd.Series, path: Path, column: str) -> np.ndarray:
    """'1'/'0'/'' (also '1.0', '0.0') → 1.0 / 0.0 / NaN; anything else is an error naming the line."""
    text = raw.fillna("").astype(str).str.strip()
    values = text.map({"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": np.nan})
    bad = values.isna() & (text != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        hint = " (−1 means 'uncertain' in CheXpert files: use data.source: chexpert, which has a policy for it)" \
            if text.iat[i] in ("-1", "-1.0") else ""
        raise DataError(f"{path}, line {i + 2}, column {column!r}: label value {text.iat[i]!r} is not 1, 0 or blank "
                        f"(blank = unknown){hint}; {int(bad.sum())} such value(s) in this column")
    return values.to_numpy(dtype=np.float64)


def read_labels_csv(path: str | Path, extra_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a labels CSV into the generic table: ``path``, ``patient_id`` (str), metadata, the 14 findings and
    ``No Finding`` as float (1 / 0 / NaN = unknown). Every problem names the file, the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels file not found; set data.labels_file (relative to data.root)")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(map(repr, missing))}; a labels CSV needs "
                        f"'path' and 'patient_id' and one column per finding (found: {', '.join(raw.columns)})")
    if raw.empty:
        raise DataError(f"{path}: has a header but no rows")
    keep = set(METADATA_COLUMNS) | set(extra_columns)
    label_columns: dict[str, str] = {}
    for column in raw.columns:
        if column in keep:
            continue
        name = finding_name(column)
        if name is None:
            raise DataError(
                f"{path}: column {column!r} is neither a known finding nor metadata. fedxr's findings are "
                f"{', '.join(LABELS)} (and {NO_FINDING!r}; spellings such as 'Pleural Effusion' are understood); "
                f"metadata columns are {', '.join(METADATA_COLUMNS)}. Rename the column, or list it under "
                f"data.extra_columns to keep it as metadata.")
        if name in label_columns.values():
            other = next(k for k, v in label_columns.items() if v == name)
            raise DataError(f"{path}: columns {other!r} and {column!r} both mean {name!r}; keep one")
        label_columns[column] = name
    if not any(v in LABELS for v in label_columns.values()):
        raise DataError(f"{path}: no finding column; add at least one of {', '.join(LABELS)}")
    table = raw[[c for c in raw.columns if c in keep]].copy()
    for column in ("path", "patient_id"):
        table[column] = table[column].str.strip()
        empty = table[column] == ""
        if empty.any():
            raise DataError(f"{path}, line {int(np.flatnonzero(empty.to_numpy())[0]) + 2}, column {column!r}: empty")
    for column, name in label_columns.items():
        table[name] = _parse_labels(raw[column], path, column)
    for name in (*LABELS, NO_FINDING):
        if name not in table:
            table[name] = np.nan
    _check_no_finding(table, path)
    dup = table["path"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"{path}, line {i + 2}, column 'path': image {table['path'].iat[i]!r} is listed twice")
    if "age" in table:
        table["age"] = pd.to_numeric(table["age"].replace("", np.nan), errors="coerce")
    return table


def _check_no_finding(table: pd.DataFrame, path: Path) -> None:
    """``No Finding`` = 1 with a finding = 1 is a contradiction; otherwise fill ``No Finding`` where the row
    says it (a known positive finding means 0)."""
    findings = table[list(LABELS)].to_numpy()
    normal = table[NO_FINDING].to_numpy()
    clash = (normal == 1) & (findings == 1).any(1)
    if clash.any():
        i = int(np.flatnonzero(clash)[0])
        found = [n for n, v in zip(LABELS, findings[i]) if v == 1]
        raise DataError(f"{path}, line {i + 2}, column {NO_FINDING!r}: 1 although {', '.join(found)} is 1; "
                        "fix the row (No Finding means no finding)")
    table[NO_FINDING] = np.where((findings == 1).any(1), 0.0, normal)


def findings_text(labels: np.ndarray, normal: np.ndarray) -> list[str]:
    """NIH-style ``A|B`` / ``No Finding`` per row; '' when the row's known labels do not say."""
    out = []
    for row, nf in zip(labels, normal):
        names = [n for n, v in zip(LABELS, row) if v == 1]
        out.append("|".join(names) if names else (NO_FINDING if nf == 1 else ""))
    return out


def check_sites(table: pd.DataFrame, path: Path, column: str | None) -> None:
    """A patient in two sites, or a site whose images have no known label, is an error naming them."""
    if not column or column not in table:
        return
    per_patient = table.groupby("patient_id")[column].nunique()
    twice = per_patient[per_patient > 1]
    if len(twice):
        pid = twice.index[0]
        sites = sorted(table.loc[table["patient_id"] == pid, column].unique())
        raise DataError(f"{path}, column {column!r}: patient {pid!r} appears in {len(sites)} sites ({', '.join(sites)}); "
                        "a patient's images must all belong to one site")
    for site, rows in table.groupby(column):
        if rows[list(LABELS)].isna().all().all():
            raise DataError(f"{path}, column {column!r}: site {site!r} has no known label for any of its "
                            f"{len(rows)} image(s); label at least one finding there, or leave it out")


def dataset_from_table(table: pd.DataFrame, root: str | Path, label_file: str | Path, missing: str = "error",
                       site_column: str | None = None, boxes_file: str | Path | None = None):
    """A generic table (from :func:`read_labels_csv` or a public format's reader) → :class:`NIHDataset`, the
    table every later step reads: ``image`` (file name, or the relative path where names repeat), absolute
    ``path``, ``official_split`` from a ``split`` column, ``findings`` text, the label columns as float."""
    from fedxr.data.nih import NIHDataset, read_bbox_list

    root, label_file = Path(root).resolve(), Path(label_file)
    table = table.copy().reset_index(drop=True)
    check_sites(table, label_file, site_column)
    rel = table["path"].astype(str)
    names = rel.map(lambda p: Path(p).name)
    table["image"] = names if not names.duplicated().any() else rel
    table["path"] = [str(p if Path(p).is_absolute() else root / p) for p in rel]
    for column in ("view", "sex"):
        table[column] = table[column].astype(str).str.strip() if column in table else ""
    if "age" not in table:
        table["age"] = np.nan
    if "split" in table:
        split = table["split"].fillna("").astype(str).str.strip().str.lower()
        bad = ~split.isin(["", "train", "test", "val"])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{label_file}, line {i + 2}, column 'split': {split.iat[i]!r} is not train, val, test or blank")
        # A source's own test list decides the test split (like NIH's test_list.txt); its train rows are train_val.
        table["official_split"] = split.map({"test": "test", "train": "train_val", "val": "train_val", "": ""})
        # Splits are patient-wise. A source's own lists can break that (the pediatric set has patients in both
        # its train and test folders): such a patient goes to test whole, so the source's test images stay test
        # and none of the patient's images is trained on.
        in_test = set(table.loc[table["official_split"] == "test", "patient_id"])
        straddle = table["patient_id"].isin(in_test) & (table["official_split"] == "train_val")
        if straddle.any():
            print(f"{label_file}: {table.loc[straddle, 'patient_id'].nunique()} patient(s) have images in both the "
                  f"source's train and test lists; their {int(straddle.sum())} train image(s) move to test (patient-wise)")
            table.loc[straddle, "official_split"] = "test"
        table = table.drop(columns="split")
    table["findings"] = findings_text(table[list(LABELS)].to_numpy(), table[NO_FINDING].to_numpy())
    on_disk = np.array([Path(p).is_file() for p in table["path"]])
    absent = table.loc[~on_disk, "image"].tolist()
    dropped = 0
    if absent and missing == "error":
        i = int(np.flatnonzero(~on_disk)[0])
        raise DataError(f"{label_file}, line {i + 2}, column 'path': {rel.iat[i]!r} is not on disk under {root} "
                        f"({len(absent)} of {len(table)} listed images are missing). Fix the path, or set "
                        "data.missing_images: drop to train on the ones present.")
    if absent and missing == "drop":
        table, dropped = table[on_disk].reset_index(drop=True), len(absent)
    boxes = read_bbox_list(root / boxes_file) if boxes_file else None
    return NIHDataset(root=root, label_file=label_file, table=table, boxes=boxes, missing=absent, dropped=dropped)


def sample_patients(table: pd.DataFrame, per_source: dict[str, int], seed: int = 0,
                    column: str = "source") -> pd.DataFrame:
    """A smaller labels table with every image of ``per_source[value]`` randomly drawn patients of each value of
    ``column`` (whole patients: a sample never splits one). For quick runs and tests on a real data set."""
    parts = []
    for value, n in per_source.items():
        rows = table[table[column] == value]
        patients = rows["patient_id"].drop_duplicates()
        if len(patients) < n:
            raise DataError(f"{column} {value!r} has {len(patients)} patients; asked for {n}")
        parts.append(rows[rows["patient_id"].isin(patients.sample(n, random_state=seed))])
    return pd.concat(parts, ignore_index=True)


def is_labels_csv(path: Path) -> bool:
    """A labels CSV (header with ``path`` and ``patient_id``), or a folder holding ``labels.csv`` and no NIH
    label file."""
    import csv

    from fedxr.data.nih import LABEL_FILES

    if path.is_dir():
        return (path / "labels.csv").is_file() and not any((path / n).is_file() for n in LABEL_FILES)
    if path.suffix != ".csv" or not path.is_file():
        return False
    with open(path, encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader([fh.readline()]), [])
    return "path" in header and "patient_id" in header


def load_labels_dataset(path: Path, missing: str = "error", site_column: str | None = None,
                        extra_columns: tuple[str, ...] = ()):
    """A labels CSV (or a folder holding ``labels.csv``) as the image table; images relative to its folder."""
    label_file = path / "labels.csv" if path.is_dir() else path
    return dataset_from_table(read_labels_csv(label_file, extra_columns), label_file.parent, label_file,
                              missing=missing, site_column=site_column)
