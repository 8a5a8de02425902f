"""Readers that turn the label files of public chest X-ray data sets into fedxr's one generic table.

Every reader returns a DataFrame with :data:`TABLE_COLUMNS`: ``path`` (as the source file gives it, relative
to the data root), ``patient_id`` (prefixed with the source name so sources never collide), ``view``
(``PA``/``AP``/``LATERAL``/''), ``sex`` (``M``/``F``/''), ``age`` (float, NaN unknown), then the 14
:data:`fedxr.labels.LABELS` and ``No Finding`` as float64: 1.0 present, 0.0 absent, NaN unknown. A label the
source cannot express is NaN in every row. :func:`_finish` enforces the one invariant: a ``No Finding`` row has
every label the source expresses at 0, and any finding at 1 makes ``No Finding`` 0.

Only the rows a reader returns are validated (a bad value in a lateral row that is dropped is not an error).
Every bad input raises :class:`~fedxr.errors.DataError` naming the file, the CSV line (header = line 1, counted
in physical lines, so PadChest reports spanning several lines are numbered right) and the column.
"""

from __future__ import annotations

import ast
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd

from fedxr.errors import DataError
from fedxr.labels import LABELS, NO_FINDING

TABLE_COLUMNS: tuple[str, ...] = ("path", "patient_id", "view", "sex", "age", *LABELS, NO_FINDING)
BOX_COLUMNS: tuple[str, ...] = ("image", "label", "x", "y", "w", "h")
Uncertain = Literal["ignore", "zeros", "ones"]
Blank = Literal["negative", "unknown"]

# ---- CheXpert / MIMIC-CXR (same 14 label columns, same 1 / 0 / -1 / blank convention) ----------------------
CHEXPERT_COLUMNS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices")
CHEXPERT_MAP: dict[str, str] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Effusion",
    "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema",
    "No Finding": NO_FINDING}
#: CheXpert labels without a fedxr counterpart: read (and validated) but dropped.
CHEXPERT_DROPPED: tuple[str, ...] = tuple(c for c in CHEXPERT_COLUMNS if c not in CHEXPERT_MAP)
CHEXPERT_MISSING: tuple[str, ...] = tuple(l for l in LABELS if l not in CHEXPERT_MAP.values())
MIMIC_MAP, MIMIC_MISSING = CHEXPERT_MAP, CHEXPERT_MISSING

# ---- PadChest: term in the `Labels` list -> fedxr label; conservative, only terms that name the finding itself.
# In the shipped 400-row head occur: atelectasis, laminar/lobar/segmental atelectasis, cardiomegaly, pleural effusion,
# infiltrates, nodule, pulmonary mass, (atypical) pneumonia, consolidation, emphysema, pulmonary fibrosis, (apical,
# calcified) pleural thickening, hiatal hernia, normal. Documented but absent from the head: total/round/basal
# atelectasis, loculated (fissural) effusion, mass, multiple nodules, pneumothorax, pulmonary edema. NOT mapped:
# interstitial/alveolar pattern (not Infiltration), mediastinal/breast/pleural/soft tissue mass (NIH Mass is a lung
# mass), pseudonodule, granuloma, hydropneumothorax, subcutaneous emphysema, COPD signs, bullas, fibrotic band,
# pleural plaques, heart insufficiency, costophrenic angle blunting.
PADCHEST_MAP: dict[str, str] = {
    **dict.fromkeys(("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                     "total atelectasis", "round atelectasis", "atelectasis basal"), "Atelectasis"),
    **dict.fromkeys(("pleural effusion", "loculated pleural effusion", "loculated fissural effusion"), "Effusion"),
    "cardiomegaly": "Cardiomegaly", "infiltrates": "Infiltration", "mass": "Mass", "pulmonary mass": "Mass",
    "nodule": "Nodule", "multiple nodules": "Nodule", "pneumonia": "Pneumonia", "atypical pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax", "consolidation": "Consolidation", "pulmonary edema": "Edema",
    "emphysema": "Emphysema", "pulmonary fibrosis": "Fibrosis", "hiatal hernia": "Hernia", "normal": NO_FINDING,
    **dict.fromkeys(("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
                    "Pleural_Thickening")}
PADCHEST_MISSING: tuple[str, ...] = tuple(l for l in LABELS if l not in PADCHEST_MAP.values())  # () : all 14
_PADCHEST_VIEWS = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP"}

# ---- VinDr-CXR (train.csv local labels). Edema, Pneumonia, Emphysema, Hernia are not VinDr local classes.
VINDR_MAP: dict[str, str] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
    "Infiltration": "Infiltration", "Pleural effusion": "Effusion", "Pleural thickening": "Pleural_Thickening",
    "Pneumothorax": "Pneumothorax", "Pulmonary fibrosis": "Fibrosis", "No finding": NO_FINDING}
#: One VinDr class covering two fedxr labels: its absence says both are absent (0); its presence cannot say
#: which, so both are NaN on that image, and its boxes are left out of the box table.
VINDR_AMBIGUOUS: dict[str, tuple[str, ...]] = {"Nodule/Mass": ("Mass", "Nodule")}
VINDR_UNMAPPED: tuple[str, ...] = ("Aortic enlargement", "Calcification", "ILD", "Lung Opacity", "Other lesion")
VINDR_MISSING: tuple[str, ...] = tuple(
    l for l in LABELS if l not in VINDR_MAP.values() and not any(l in t for t in VINDR_AMBIGUOUS.values()))


def _read_csv(path: str | Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read ``required`` columns as stripped strings plus ``_line``: the physical line each record starts on."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: file is empty; expected a header naming {', '.join(required)}")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: line 1: missing column(s) {', '.join(map(repr, missing))}; this reader "
                                f"needs {', '.join(required)} (is this the right file for this format?)")
            keep = [header.index(c) for c in required]
            rows, lines, start = [], [], reader.line_num + 1
            for record in reader:
                if record:
                    if len(record) != len(header):
                        raise DataError(f"{path}, line {start}: {len(record)} fields but the header has "
                                        f"{len(header)}; fix the quoting or the field count of that line")
                    rows.append([record[i].strip() for i in keep])
                    lines.append(start)
                start = reader.line_num + 1
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows:
        raise DataError(f"{path}: has a header but no rows")
    frame = pd.DataFrame(rows, columns=list(required), dtype=str)
    frame["_line"] = np.asarray(lines, dtype=np.int64)
    return frame


def _fail(path: str | Path, frame: pd.DataFrame, bad: pd.Series, column: str, problem: str) -> None:
    """Raise DataError for the first row flagged in ``bad``, naming file, line, column and the fix."""
    if bad.any():
        i = bad.to_numpy().argmax()
        value = frame[column].iat[i]
        raise DataError(f"{path}, line {frame['_line'].iat[i]}, column {column!r}: value {value!r} {problem}")


def _numbers(path: str | Path, frame: pd.DataFrame, column: str) -> pd.Series:
    """Parse a numeric column; blank or None means unknown (NaN), anything else non-numeric is an error."""
    blank = frame[column].isin(["", "None", "nan", "NaN"])
    values = pd.to_numeric(frame[column].where(~blank), errors="coerce").astype(float)
    _fail(path, frame, values.isna() & ~blank, column, "is not a number; fix it or leave it blank")
    return values


def _chexpert_labels(path: str | Path, frame: pd.DataFrame, uncertain: Uncertain, blank: Blank) -> dict[str, pd.Series]:
    """CheXpert-convention cells → fedxr label columns (shared by CheXpert and MIMIC-CXR).

    Uncertain (-1) follows the CheXpert paper's U-Ignore (NaN), U-Zeros (0) or U-Ones (1) policy; blank
    (unmentioned in the report) is 0 under ``blank="negative"`` (as the CheXpert paper trains) or NaN.
    """
    if uncertain not in ("ignore", "zeros", "ones") or blank not in ("negative", "unknown"):
        raise ValueError(f"uncertain must be ignore/zeros/ones and blank negative/unknown, not {uncertain!r}/{blank!r}")
    u = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[uncertain]
    codes = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": u, "-1": u, "": 0.0 if blank == "negative" else np.nan}
    for column in CHEXPERT_COLUMNS:
        _fail(path, frame, ~frame[column].isin(list(codes)), column,
              "is not 1.0, 0.0, -1.0 (uncertain) or blank; fix that cell")
    return {fedxr: frame[source].map(codes).astype(float) for source, fedxr in CHEXPERT_MAP.items()}


def _finish(path: str | Path, meta: dict[str, object], labels: dict[str, pd.Series], lines: np.ndarray,
            columns: dict[str, str]) -> pd.DataFrame:
    """Assemble the generic table and enforce the No Finding invariant over the labels the source expresses."""
    meta = {"view": "", "sex": "", "age": np.nan, **{k: np.asarray(v) for k, v in meta.items()}}
    table = pd.DataFrame(meta, index=range(len(lines))).astype({"age": float, **dict.fromkeys(TABLE_COLUMNS[:4], str)})
    for label in (*LABELS, NO_FINDING):
        table[label] = np.asarray(labels[label], dtype=float) if label in labels else np.nan
    expressed = [l for l in LABELS if l in labels]
    normal = (table[NO_FINDING] == 1).to_numpy()
    positive = (table[expressed] == 1).to_numpy()
    clash = normal & positive.any(axis=1)
    if clash.any():
        i = int(clash.argmax())
        label = expressed[int(positive[i].argmax())]
        raise DataError(f"{path}, line {lines[i]}, columns {columns[NO_FINDING]!r} and {columns[label]!r}: the row "
                        f"says {NO_FINDING} and {label} at once; fix one of the two")
    table.loc[normal, expressed] = table.loc[normal, expressed].fillna(0.0)
    table.loc[positive.any(axis=1), NO_FINDING] = 0.0
    return table[list(TABLE_COLUMNS)].reset_index(drop=True)


def read_chexpert(path: str | Path, uncertain: Uncertain = "ignore", blank: Blank = "negative",
                  frontal_only: bool = True) -> pd.DataFrame:
    """CheXpert ``train.csv``/``valid.csv`` → the generic table (see :func:`_chexpert_labels` for the policies)."""
    frame = _read_csv(path, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS))
    _fail(path, frame, ~frame["Frontal/Lateral"].isin(["Frontal", "Lateral"]), "Frontal/Lateral",
          "is neither Frontal nor Lateral")
    if frontal_only:
        frame = frame[frame["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    patient = frame["Path"].str.extract(r"(?:^|/)(patient\d+)/", expand=False)
    _fail(path, frame, patient.isna(), "Path", "has no 'patientNNNNN/' folder to take the patient id from")
    view = frame["AP/PA"].where(frame["AP/PA"].isin(["AP", "PA"]), "")
    meta = {"path": frame["Path"], "patient_id": "chexpert-" + patient,
            "view": view.where(frame["Frontal/Lateral"] == "Frontal", "LATERAL"),
            "sex": frame["Sex"].map({"Female": "F", "Male": "M"}).fillna(""), "age": _numbers(path, frame, "Age")}
    labels = _chexpert_labels(path, frame, uncertain, blank)
    return _finish(path, meta, labels, frame["_line"].to_numpy(), {v: k for k, v in CHEXPERT_MAP.items()})


def read_padchest(path: str | Path) -> pd.DataFrame:
    """PadChest ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` → the generic table, frontal images only.

    PadChest's reports were labelled for its whole term list, so every fedxr label it can express is 1 when one
    of its terms (:data:`PADCHEST_MAP`) is in the ``Labels`` list and 0 otherwise; ``normal`` → No Finding.
    """
    frame = _read_csv(path, ("ImageID", "ImageDir", "PatientID", "PatientBirth", "PatientSex_DICOM",
                             "Projection", "StudyDate_DICOM", "Labels"))
    frame = frame[frame["Projection"].isin(list(_PADCHEST_VIEWS))].reset_index(drop=True)

    def terms(cell: str) -> set[str] | None:
        try:
            value = ast.literal_eval(cell)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
        ok = isinstance(value, list) and value and all(isinstance(t, str) for t in value)
        return {t.strip() for t in value} if ok else None

    parsed = frame["Labels"].map(terms)
    _fail(path, frame, parsed.isna(), "Labels", "is not a non-empty Python list of terms like ['normal']; "
          "fix or remove that row")
    labels = {fedxr: parsed.map(lambda ts, f=fedxr: float(any(PADCHEST_MAP.get(t) == f for t in ts)))
              for fedxr in set(PADCHEST_MAP.values())}
    study_year = pd.to_numeric(frame["StudyDate_DICOM"].str.extract(r"^(\d{4})\d{4}$", expand=False))
    meta = {"path": frame["ImageDir"] + "/" + frame["ImageID"], "patient_id": "padchest-" + frame["PatientID"],
            "view": frame["Projection"].map(_PADCHEST_VIEWS), "sex": frame["PatientSex_DICOM"].where(
                frame["PatientSex_DICOM"].isin(["M", "F"]), ""),
            "age": study_year - _numbers(path, frame, "PatientBirth")}
    return _finish(path, meta, labels, frame["_line"].to_numpy(), dict.fromkeys((*LABELS, NO_FINDING), "Labels"))


def read_vindr(path: str | Path, rule: Literal["any", "majority"] = "any",
               suffix: str = ".png") -> tuple[pd.DataFrame, pd.DataFrame]:
    """VinDr-CXR ``train.csv`` (one row per radiologist per box) → ``(table, boxes)``.

    A class is present on an image when ``any`` radiologist marked it, or a strict ``majority`` of the distinct
    ``rad_id`` that read the image did; No Finding is 1 when "No finding" passes the rule and no class does.
    VinDr has no patient ids, so the image id stands in (``vindr-<image_id>``); ``path`` is ``<image_id><suffix>``
    (the DICOMs converted to PNG by default, or ``suffix=".dicom"`` for the originals). ``boxes`` holds, per
    present mapped finding, each radiologist's box as x, y, w, h in the image's own pixels, keyed by ``path``.
    """
    if rule not in ("any", "majority"):
        raise ValueError(f"rule must be 'any' or 'majority', not {rule!r}")
    frame = _read_csv(path, ("image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"))
    classes = [*VINDR_MAP, *VINDR_AMBIGUOUS, *VINDR_UNMAPPED]
    _fail(path, frame, ~frame["class_name"].isin(classes), "class_name", f"is not a VinDr-CXR class ({', '.join(classes)})")
    for column in ("image_id", "rad_id"):
        _fail(path, frame, frame[column] == "", column, "is blank; every row needs one")
    rads = frame.groupby("image_id", sort=False)["rad_id"].nunique()
    votes = frame.groupby(["image_id", "class_name"], sort=False)["rad_id"].nunique().unstack(fill_value=0)
    votes = votes.reindex(index=rads.index, columns=classes, fill_value=0)
    present = votes.ge(1 if rule == "any" else rads // 2 + 1, axis=0)
    abnormal = present.drop(columns="No finding").any(axis=1)
    labels = {fedxr: present[src].astype(float) for src, fedxr in VINDR_MAP.items() if fedxr != NO_FINDING}
    for src, targets in VINDR_AMBIGUOUS.items():
        labels.update(dict.fromkeys(targets, present[src].map({True: np.nan, False: 0.0})))
    labels[NO_FINDING] = (present["No finding"] & ~abnormal).astype(float)
    meta = {"path": rads.index + suffix, "patient_id": "vindr-" + rads.index}
    first_line = frame.groupby("image_id", sort=False)["_line"].min().to_numpy()
    table = _finish(path, meta, labels, first_line, {**{v: k for k, v in VINDR_MAP.items()}, "Mass": "Nodule/Mass",
                                                    "Nodule": "Nodule/Mass"})
    boxed = frame[frame["class_name"].isin([c for c, f in VINDR_MAP.items() if f != NO_FINDING])].reset_index(drop=True)
    keep = present.stack().reindex(pd.MultiIndex.from_frame(boxed[["image_id", "class_name"]])).to_numpy(dtype=bool)
    boxed = boxed[keep].reset_index(drop=True)
    xy = {c: _numbers(path, boxed, c) for c in ("x_min", "y_min", "x_max", "y_max")}
    for c in xy:
        _fail(path, boxed, xy[c].isna(), c, "is missing; a finding row needs its box")
    _fail(path, boxed, (xy["x_max"] < xy["x_min"]) | (xy["y_max"] < xy["y_min"]), "x_max",
          "(or y_max) is below x_min (or y_min); swap the coordinates")
    boxes = pd.DataFrame({"image": (boxed["image_id"] + suffix).astype(str),
                          "label": boxed["class_name"].map(VINDR_MAP).astype(str), "x": xy["x_min"],
                          "y": xy["y_min"], "w": xy["x_max"] - xy["x_min"], "h": xy["y_max"] - xy["y_min"]})
    return table, boxes[list(BOX_COLUMNS)]


def read_mimic(chexpert_csv: str | Path, metadata_csv: str | Path, uncertain: Uncertain = "ignore",
               blank: Blank = "negative") -> pd.DataFrame:
    """MIMIC-CXR-JPG ``mimic-cxr-2.0.0-chexpert.csv`` + ``-metadata.csv`` → the generic table, frontal images only.

    Labels are per study and images per ``dicom_id``, so they are joined on (subject_id, study_id); an image
    whose study has no label row is left out. MIMIC-CXR-JPG carries no sex or age (they are in MIMIC-IV).
    """
    ids = ("subject_id", "study_id")
    labels_frame = _read_csv(chexpert_csv, (*ids, *CHEXPERT_COLUMNS))
    meta_frame = _read_csv(metadata_csv, ("dicom_id", *ids, "ViewPosition"))
    for frame, file in ((labels_frame, chexpert_csv), (meta_frame, metadata_csv)):
        for column in ids:
            _fail(file, frame, ~frame[column].str.fullmatch(r"\d+"), column, "is not a numeric MIMIC id")
    _fail(chexpert_csv, labels_frame, labels_frame.duplicated(list(ids)), "study_id", "appears twice for the "
          "same subject_id; keep one label row per study")
    labels = pd.DataFrame(_chexpert_labels(chexpert_csv, labels_frame, uncertain, blank))
    labels = labels.assign(**{c: labels_frame[c] for c in (*ids, "_line")})
    frontal = meta_frame[meta_frame["ViewPosition"].isin(["PA", "AP"])]
    joined = frontal.drop(columns="_line").merge(labels, on=list(ids), how="inner")
    subject = joined["subject_id"]
    meta = {"path": "files/p" + subject.str[:2] + "/p" + subject + "/s" + joined["study_id"] + "/"
                    + joined["dicom_id"] + ".jpg", "patient_id": "mimic-" + subject, "view": joined["ViewPosition"]}
    return _finish(chexpert_csv, meta, {k: joined[k] for k in CHEXPERT_MAP.values()}, joined["_line"].to_numpy(),
                   {v: k for k, v in CHEXPERT_MAP.items()})


@dataclass(frozen=True)
class LabelFormat:
    """One source: its reader, its label map (source → fedxr), what it cannot provide, a one-line description.

    Readers differ in shape: ``read_vindr`` returns ``(table, boxes)`` and ``read_mimic`` takes two files.
    """

    title: str
    reader: Callable[..., object]
    mapping: dict[str, str]
    unprovidable: tuple[str, ...]
    description: str
    ambiguous: dict[str, tuple[str, ...]] = field(default_factory=dict)


FORMATS: dict[str, LabelFormat] = {
    "chexpert": LabelFormat("CheXpert", read_chexpert, CHEXPERT_MAP, CHEXPERT_MISSING,
                            "CheXpert train/valid.csv; -1 by U-Ignore/U-Zeros/U-Ones, blank negative by default; "
                            f"dropped: {', '.join(CHEXPERT_DROPPED)}"),
    "padchest": LabelFormat("PadChest", read_padchest, PADCHEST_MAP, PADCHEST_MISSING,
                            "PadChest labels CSV, frontal (PA, AP, AP_horizontal) only; every term is labelled "
                            "on every image, so an absent term is 0"),
    "vindr": LabelFormat("VinDr-CXR", read_vindr, VINDR_MAP, VINDR_MISSING,
                         "VinDr-CXR train.csv (per-radiologist boxes; rule any/majority); returns (table, boxes); "
                         "image id as patient id; Nodule/Mass sets Mass and Nodule NaN when present, 0 when absent",
                         VINDR_AMBIGUOUS),
    "mimic": LabelFormat("MIMIC-CXR", read_mimic, MIMIC_MAP, MIMIC_MISSING,
                         "MIMIC-CXR-JPG chexpert.csv + metadata.csv (two paths), frontal (PA, AP) only; "
                         f"CheXpert conventions; dropped: {', '.join(CHEXPERT_DROPPED)}"),
}


def read_format(name: str, label_file: str | Path, metadata_file: str | Path | None = None,
                uncertain: Uncertain = "ignore", blank: Blank = "negative", vindr_rule: Literal["any", "majority"] = "any",
                **options: object) -> pd.DataFrame:
    """Dispatch on a recipe's ``data.source`` name: the generic table of one public label file (VinDr's boxes,
    which need :func:`read_vindr` directly, are left out). ``options`` go to the reader (``frontal_only``, ``suffix``)."""
    if name not in FORMATS:
        raise DataError(f"unknown label format {name!r}; known: {', '.join(FORMATS)}")
    if name == "chexpert":
        return read_chexpert(label_file, uncertain=uncertain, blank=blank, **options)  # type: ignore[arg-type]
    if name == "padchest":
        return read_padchest(label_file)
    if name == "vindr":
        return read_vindr(label_file, rule=vindr_rule, **options)[0]  # type: ignore[arg-type]
    if metadata_file is None:
        raise DataError(f"{label_file}: MIMIC-CXR labels are per study; also give mimic-cxr-2.0.0-metadata.csv "
                        "(data.metadata_file) to find the images")
    return read_mimic(label_file, metadata_file, uncertain=uncertain, blank=blank)


def mapping_table_markdown() -> str:
    """A markdown table: one row per fedxr label (and No Finding), one column per source, "—" = cannot provide."""
    lines = ["| fedxr label | " + " | ".join(f.title for f in FORMATS.values()) + " |",
             "|---" * (len(FORMATS) + 1) + "|"]
    for label in (*LABELS, NO_FINDING):
        cells = []
        for fmt in FORMATS.values():
            names = [src for src, fedxr in fmt.mapping.items() if fedxr == label]
            names += [f"{src} (absence only)" for src, targets in fmt.ambiguous.items() if label in targets]
            cells.append(", ".join(names) or "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
