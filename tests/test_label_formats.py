"""Readers of public label files (CheXpert, PadChest, VinDr-CXR, MIMIC-CXR) → fedxr's generic table.

Real heads of the published files come from ../shared/data/label-formats (beside the project); MIMIC-CXR and
every bad-input case are small files written here. Expected values were read off the files by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedxr.data.formats import (BOX_COLUMNS, CHEXPERT_COLUMNS, CHEXPERT_MISSING, FORMATS, PADCHEST_MAP,
                                TABLE_COLUMNS, VINDR_MISSING, mapping_table_markdown, read_chexpert, read_format,
                                read_mimic, read_padchest, read_vindr)
from fedxr.errors import DataError
from fedxr.labels import LABELS, NO_FINDING

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "label-formats"
CHEXPERT = SHARED / "chexpert_train_head.csv"
PADCHEST = SHARED / "padchest_head.csv"
VINDR = SHARED / "vindr_cxr_train_head.csv"
needs_heads = pytest.mark.skipif(not CHEXPERT.is_file(), reason=f"label-file heads not found at {SHARED}")

CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_COLUMNS)
VINDR_HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"
MIMIC_LABELS_HEADER = "subject_id,study_id," + ",".join(CHEXPERT_COLUMNS)
MIMIC_META_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
                     "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                     "PatientOrientationCodeSequence_CodeMeaning")


def nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def row(table, path_part: str):
    match = table[table["path"].str.contains(path_part, regex=False)]
    assert len(match) == 1, f"{path_part}: {len(match)} rows"
    return match.iloc[0]


def check_generic(table) -> None:
    """The contract every reader keeps: columns, dtypes, the No Finding invariant."""
    assert tuple(table.columns) == TABLE_COLUMNS
    for col in (*LABELS, NO_FINDING, "age"):
        assert table[col].dtype == np.float64, col
    assert set(table["view"]) <= {"PA", "AP", "LATERAL", ""}
    assert set(table["sex"]) <= {"M", "F", ""}
    labels = table[list(LABELS)]
    normal = table[NO_FINDING] == 1
    assert not (labels[normal] == 1).any().any()
    assert (table.loc[(labels == 1).any(axis=1), NO_FINDING] == 0).all()


def chexpert_line(path="CheXpert-v1.0-small/train/patient00042/study1/view1_frontal.jpg", sex="Male", age="50",
                  frontal="Frontal", view="PA", **labels: str) -> str:
    return ",".join([path, sex, age, frontal, view, *(labels.get(c.replace(" ", "_"), "") for c in CHEXPERT_COLUMNS)])


def write(tmp_path: Path, name: str, *lines: str) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- CheXpert -------------------------------------------------------------------------------------------------
@needs_heads
@pytest.mark.parametrize("uncertain, expected", [("ignore", None), ("zeros", 0.0), ("ones", 1.0)])
def test_chexpert_real_head_uncertainty_policies(uncertain, expected):
    table = read_chexpert(CHEXPERT, uncertain=uncertain)
    check_generic(table)
    assert len(table) == 316  # 226 AP + 90 PA frontal of 400; the 84 lateral rows are dropped
    # Line 3: patient00002/study2, Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion all -1.0.
    r = row(table, "patient00002/study2/")
    for label in ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Effusion"):
        assert nan(r[label]) if expected is None else r[label] == expected, label
    assert r["Pneumonia"] == 0.0 and r["Pneumothorax"] == 0.0  # blank → negative (default)
    assert r[NO_FINDING] == 0.0  # blank No Finding → 0, and under "ones" findings are present anyway
    assert (r["patient_id"], r["sex"], r["age"], r["view"]) == ("chexpert-patient00002", "F", 87.0, "AP")


@needs_heads
def test_chexpert_real_head_mapping_and_missing_labels():
    table = read_chexpert(CHEXPERT, blank="unknown")
    check_generic(table)
    for label in CHEXPERT_MISSING:
        assert table[label].isna().all(), label
    assert set(CHEXPERT_MISSING) == {"Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis",
                                     "Pleural_Thickening", "Hernia"}
    # Line 16: patient00008/study1, Pleural Effusion 1.0 → Effusion 1; Lung Opacity 1.0 is dropped.
    r = row(table, "patient00008/study1/")
    assert r["Effusion"] == 1.0 and r[NO_FINDING] == 0.0 and nan(r["Cardiomegaly"])  # blank kept unknown
    # Line 2: No Finding 1.0, Pneumothorax 0.0, the rest blank → every mapped finding 0 even with blank=unknown.
    r = row(table, "patient00001/study1/")
    assert r[NO_FINDING] == 1.0
    assert all(r[l] == 0.0 for l in ("Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax",
                                     "Consolidation", "Edema"))
    # Line 7: a PA view, Male/Female mapping.
    r = row(table, "patient00004/study1/")
    assert (r["view"], r["sex"], r["age"]) == ("PA", "F", 20.0)


@needs_heads
def test_chexpert_lateral_rows_kept_on_request():
    table = read_chexpert(CHEXPERT, frontal_only=False)
    assert len(table) == 400 and (table["view"] == "LATERAL").sum() == 84
    assert row(table, "patient00002/study1/view2_lateral")["view"] == "LATERAL"


@pytest.mark.parametrize("value", ["2", "maybe", "1.5"])
def test_chexpert_bad_value_names_file_line_column(tmp_path, value):
    path = write(tmp_path, "train.csv", CHEXPERT_HEADER, chexpert_line(Edema="1.0"), chexpert_line(Pneumonia=value))
    with pytest.raises(DataError) as err:
        read_chexpert(path)
    message = str(err.value)
    assert str(path) in message and "line 3" in message and "'Pneumonia'" in message and repr(value) in message


def test_chexpert_no_finding_with_a_finding_is_a_contradiction(tmp_path):
    path = write(tmp_path, "train.csv", CHEXPERT_HEADER, chexpert_line(), chexpert_line(No_Finding="1.0",
                                                                                       Pleural_Effusion="1.0"))
    with pytest.raises(DataError, match=r"line 3.*'No Finding'.*'Pleural Effusion'"):
        read_chexpert(path)
    # A finding that is not mapped (Support Devices) does not contradict No Finding.
    ok = write(tmp_path, "ok.csv", CHEXPERT_HEADER, chexpert_line(No_Finding="1.0", Support_Devices="1.0"))
    assert read_chexpert(ok)[NO_FINDING].tolist() == [1.0]


def test_chexpert_missing_column_and_bad_path(tmp_path):
    header = CHEXPERT_HEADER.replace(",Edema", "")
    with pytest.raises(DataError, match="missing column.*'Edema'"):
        read_chexpert(write(tmp_path, "a.csv", header, ",".join(chexpert_line().split(",")[:-1])))
    path = write(tmp_path, "b.csv", CHEXPERT_HEADER, chexpert_line(path="images/x.jpg"))
    with pytest.raises(DataError, match=r"line 2, column 'Path'"):
        read_chexpert(path)
    with pytest.raises(DataError, match="not found"):
        read_chexpert(tmp_path / "absent.csv")


# ---- PadChest -------------------------------------------------------------------------------------------------
@needs_heads
def test_padchest_real_head():
    table = read_padchest(PADCHEST)
    check_generic(table)
    assert len(table) == 256  # 230 PA + 3 AP + 23 AP_horizontal; the 132 lateral (L) rows are dropped
    assert not table.isna()[list(LABELS)].any().any()  # PadChest expresses all 14: absent term → 0
    assert table[NO_FINDING].sum() == 81
    # Line 42 (its lateral twin on line 41 is dropped): ['hiatal hernia', 'infiltrates'], born 1954, study 2015.
    r = row(table, "202517159601409650920341045633993544544_2_")
    assert (r["path"], r["view"], r["sex"], r["age"]) == (
        "0/202517159601409650920341045633993544544_2_92rrpu.png", "PA", "M", 61.0)
    assert r["patient_id"] == "padchest-205508857754400116559265680271099068581"
    assert (r["Hernia"], r["Infiltration"], r["Effusion"], r[NO_FINDING]) == (1.0, 1.0, 0.0, 0.0)
    # Line 11: AP_horizontal → AP; 'alveolar pattern' and 'interstitial pattern' are not Infiltration.
    r = row(table, "-2_40kxq3.png")
    assert (r["view"], r["Effusion"], r["Infiltration"]) == ("AP", 1.0, 0.0)
    # Line 2: ['normal'] → No Finding.
    r = row(table, "k6ga29.png")
    assert r[NO_FINDING] == 1.0 and (r[list(LABELS)] == 0).all()
    # Lines 339-341 hold one record whose quoted fields span three lines: cardiomegaly and pneumonia.
    r = row(table, "ix39oi.png")
    assert (r["Cardiomegaly"], r["Pneumonia"], r["Edema"]) == (1.0, 1.0, 0.0)


PADCHEST_HEADER = ",ImageID,ImageDir,StudyDate_DICOM,PatientID,PatientBirth,PatientSex_DICOM,Projection,Report,Labels"


def padchest_line(i: int, labels: str, projection: str = "PA", report: str = "informe") -> str:
    return f'{i},img{i}.png,3,20150101,pat{i},1950.0,F,{projection},"{report}","{labels}"'


def test_padchest_small_file_and_line_numbers(tmp_path):
    path = write(tmp_path, "padchest.csv", PADCHEST_HEADER,
                 padchest_line(0, "['pulmonary mass', 'mediastinal mass']", report="two\nlines"),
                 padchest_line(1, "['nodule']", projection="L"),
                 padchest_line(2, "[' pleural effusion', 'pneumothorax']", projection="AP"))
    table = read_padchest(path)
    check_generic(table)
    assert table["path"].tolist() == ["3/img0.png", "3/img2.png"]
    assert table["Mass"].tolist() == [1.0, 0.0] and table["Nodule"].tolist() == [0.0, 0.0]
    assert table["Pneumothorax"].tolist() == [0.0, 1.0] and table["Effusion"].tolist() == [0.0, 1.0]
    assert table["age"].tolist() == [65.0, 65.0]
    for bad in ("", "[]", "not a list"):
        path = write(tmp_path, "bad.csv", PADCHEST_HEADER, padchest_line(0, "['normal']", report="a\nb"),
                     padchest_line(1, bad))
        with pytest.raises(DataError, match=r"bad.csv, line 4, column 'Labels'"):
            read_padchest(path)


def test_padchest_contradiction_and_missing_column(tmp_path):
    path = write(tmp_path, "p.csv", PADCHEST_HEADER, padchest_line(0, "['normal', 'cardiomegaly']"))
    with pytest.raises(DataError, match="line 2.*No Finding and Cardiomegaly"):
        read_padchest(path)
    path = write(tmp_path, "q.csv", PADCHEST_HEADER.replace(",Labels", ""), "0,a.png,0,20150101,p,1950,F,PA,x")
    with pytest.raises(DataError, match="missing column.*'Labels'"):
        read_padchest(path)


def test_padchest_map_targets_are_fedxr_labels():
    assert set(PADCHEST_MAP.values()) == {*LABELS, NO_FINDING}
    for term in ("interstitial pattern", "alveolar pattern", "mediastinal mass", "breast mass", "pseudonodule"):
        assert term not in PADCHEST_MAP


# ---- VinDr-CXR ------------------------------------------------------------------------------------------------
@needs_heads
def test_vindr_real_head_any_vs_majority():
    anyrule, boxes_any = read_vindr(VINDR, rule="any")
    majority, boxes_majority = read_vindr(VINDR, rule="majority")
    for table in (anyrule, majority):
        check_generic(table)
        assert len(table) == 394
        for label in VINDR_MISSING:
            assert table[label].isna().all(), label
    assert set(VINDR_MISSING) == {"Pneumonia", "Edema", "Emphysema", "Hernia"}
    # a4fc9faa…: read by R9 (Pleural effusion, line 140) and R10 (Pulmonary fibrosis, line 367).
    a, m = row(anyrule, "a4fc9faa"), row(majority, "a4fc9faa")
    assert (a["Effusion"], a["Fibrosis"], a[NO_FINDING]) == (1.0, 1.0, 0.0)
    assert (m["Effusion"], m["Fibrosis"], m[NO_FINDING]) == (0.0, 0.0, 0.0)
    assert a["patient_id"] == "vindr-a4fc9faa46af26c5fc462772d88d0af3"
    assert a["path"] == "a4fc9faa46af26c5fc462772d88d0af3.png"
    assert len(boxes_any[boxes_any["image"].str.startswith("a4fc9faa")]) == 2
    assert len(boxes_majority[boxes_majority["image"].str.startswith("a4fc9faa")]) == 0
    # Line 2: "No finding" by one radiologist.
    assert row(anyrule, "50a418190bc3fb1ef1633bf9678929b3")[NO_FINDING] == 1.0
    # Line 9: Nodule/Mass present → Mass and Nodule unknown, and no box for it.
    r = row(anyrule, "47ed17dcb2cbeec15182ed335a8b5a9e")
    assert nan(r["Mass"]) and nan(r["Nodule"]) and r[NO_FINDING] == 0.0
    assert (anyrule.loc[anyrule[NO_FINDING] == 1, ["Mass", "Nodule"]] == 0).all().all()
    # Line 4: Cardiomegaly box 691,1375 → 1653,1831.
    assert tuple(boxes_any.columns) == BOX_COLUMNS and set(boxes_any["label"]) <= set(LABELS)
    box = boxes_any[boxes_any["image"] == "9a5094b2563a1ef3ff50dc5c7ff71345.png"].iloc[0]
    assert (box["label"], box["x"], box["y"], box["w"], box["h"]) == ("Cardiomegaly", 691.0, 1375.0, 962.0, 456.0)


def test_vindr_majority_small_file(tmp_path):
    path = write(tmp_path, "train.csv", VINDR_HEADER,
                 "img1,Cardiomegaly,3,R1,10,20,110,70", "img1,Cardiomegaly,3,R2,12,22,112,72", "img1,No finding,14,R3,,,,",
                 "img2,Atelectasis,1,R1,1,1,5,5", "img2,No finding,14,R2,,,,", "img2,No finding,14,R3,,,,")
    anyrule, _ = read_vindr(path, rule="any", suffix=".dicom")
    majority, boxes = read_vindr(path, rule="majority", suffix=".dicom")
    assert anyrule["path"].tolist() == ["img1.dicom", "img2.dicom"]
    assert anyrule["Cardiomegaly"].tolist() == [1.0, 0.0] and anyrule["Atelectasis"].tolist() == [0.0, 1.0]
    assert anyrule[NO_FINDING].tolist() == [0.0, 0.0]
    assert majority["Cardiomegaly"].tolist() == [1.0, 0.0] and majority["Atelectasis"].tolist() == [0.0, 0.0]
    assert majority[NO_FINDING].tolist() == [0.0, 1.0]
    assert boxes["image"].tolist() == ["img1.dicom", "img1.dicom"] and boxes["w"].tolist() == [100.0, 100.0]


def test_vindr_bad_input(tmp_path):
    with pytest.raises(DataError, match=r"line 3, column 'class_name'.*'Tumour'"):
        read_vindr(write(tmp_path, "a.csv", VINDR_HEADER, "i,No finding,14,R1,,,,", "i,Tumour,3,R2,1,1,2,2"))
    with pytest.raises(DataError, match=r"b.csv, line 2, column 'x_min'"):
        read_vindr(write(tmp_path, "b.csv", VINDR_HEADER, "i,Cardiomegaly,3,R1,,1,2,2"))
    with pytest.raises(DataError, match="missing column.*'rad_id'"):
        read_vindr(write(tmp_path, "c.csv", VINDR_HEADER.replace("rad_id", "radiologist"), "i,No finding,14,R1,,,,"))


# ---- MIMIC-CXR-JPG --------------------------------------------------------------------------------------------
def mimic_labels_line(subject: str, study: str, **labels: str) -> str:
    return ",".join([subject, study, *(labels.get(c.replace(" ", "_"), "") for c in CHEXPERT_COLUMNS)])


def mimic_meta_line(dicom: str, subject: str, study: str, view: str) -> str:
    return f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},3056,2544,21800506,213014.531,CHEST (PA AND LAT),,"


def mimic_files(tmp_path: Path, *label_lines: str) -> tuple[Path, Path]:
    labels = write(tmp_path, "mimic-cxr-2.0.0-chexpert.csv", MIMIC_LABELS_HEADER, *label_lines)
    meta = write(tmp_path, "mimic-cxr-2.0.0-metadata.csv", MIMIC_META_HEADER,
                 mimic_meta_line("d1", "10000032", "50414267", "PA"),
                 mimic_meta_line("d2", "10000032", "50414267", "LATERAL"),
                 mimic_meta_line("d3", "10000032", "53189527", "AP"),
                 mimic_meta_line("d4", "10000898", "50771383", "PA"))  # study without a label row
    return labels, meta


def test_mimic_join_paths_and_policies(tmp_path):
    labels, meta = mimic_files(tmp_path, mimic_labels_line("10000032", "50414267", No_Finding="1.0"),
                               mimic_labels_line("10000032", "53189527", Edema="-1.0", Pleural_Effusion="1.0",
                                                 Lung_Opacity="1.0"))
    table = read_mimic(labels, meta)
    check_generic(table)
    assert table["path"].tolist() == ["files/p10/p10000032/s50414267/d1.jpg", "files/p10/p10000032/s53189527/d3.jpg"]
    assert table["patient_id"].tolist() == ["mimic-10000032"] * 2 and table["view"].tolist() == ["PA", "AP"]
    assert table["sex"].tolist() == ["", ""] and table["age"].isna().all()
    assert table[NO_FINDING].tolist() == [1.0, 0.0] and table["Effusion"].tolist() == [0.0, 1.0]
    assert nan(table["Edema"].iat[1]) and table["Atelectasis"].iat[1] == 0.0
    assert read_mimic(labels, meta, uncertain="ones")["Edema"].iat[1] == 1.0
    assert nan(read_mimic(labels, meta, blank="unknown")["Atelectasis"].iat[1])
    for label in CHEXPERT_MISSING:
        assert table[label].isna().all()


def test_mimic_bad_input(tmp_path):
    labels, meta = mimic_files(tmp_path, mimic_labels_line("10000032", "50414267", Edema="1.0"),
                               mimic_labels_line("10000032", "53189527", Atelectasis="maybe"))
    with pytest.raises(DataError, match=r"chexpert.csv, line 3, column 'Atelectasis'.*'maybe'"):
        read_mimic(labels, meta)
    labels, meta = mimic_files(tmp_path, mimic_labels_line("10000032", "53189527", No_Finding="1.0", Edema="1.0"))
    with pytest.raises(DataError, match=r"chexpert.csv, line 2, columns 'No Finding' and 'Edema'"):
        read_mimic(labels, meta)
    meta.write_text(meta.read_text().replace("ViewPosition", "View"))
    with pytest.raises(DataError, match="metadata.csv: line 1: missing column.*'ViewPosition'"):
        read_mimic(labels, meta)


# ---- FORMATS and the README table -----------------------------------------------------------------------------
def test_formats_and_markdown_table():
    assert set(FORMATS) == {"chexpert", "padchest", "vindr", "mimic"}
    for fmt in FORMATS.values():
        assert callable(fmt.reader) and fmt.description
        assert set(fmt.mapping.values()) <= {*LABELS, NO_FINDING}
        assert not set(fmt.unprovidable) & set(fmt.mapping.values())
    table = mapping_table_markdown()
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(LABELS) + 1
    for label in (*LABELS, NO_FINDING):
        assert any(line.startswith(f"| {label} |") for line in lines), label
    assert "| Effusion | Pleural Effusion | pleural effusion" in table
    assert "| Hernia | — | hiatal hernia | — | — |" in table


def test_read_format_dispatches(tmp_path):
    labels, meta = mimic_files(tmp_path, mimic_labels_line("10000032", "50414267", Edema="-1.0"))
    assert read_format("mimic", labels, metadata_file=meta, uncertain="zeros")["Edema"].tolist() == [0.0]
    with pytest.raises(DataError, match="metadata"):
        read_format("mimic", labels)
    with pytest.raises(DataError, match="unknown label format 'nih2'"):
        read_format("nih2", labels)
    vindr = write(tmp_path, "train.csv", VINDR_HEADER, "i,Cardiomegaly,3,R1,1,1,2,2", "i,No finding,14,R2,,,,")
    assert read_format("vindr", vindr, vindr_rule="majority")["Cardiomegaly"].tolist() == [0.0]
    assert read_format("vindr", vindr, vindr_rule="any")["Cardiomegaly"].tolist() == [1.0]
    chexpert = write(tmp_path, "c.csv", CHEXPERT_HEADER, chexpert_line(Edema="1.0"))
    assert read_format("chexpert", chexpert)["Edema"].tolist() == [1.0]
