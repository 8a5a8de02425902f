"""The NIH reader against the real metadata files and the other published layouts."""

import json

import numpy as np
import pytest

from fedxr.cli import main
from fedxr.data.nih import load_dataset, parse_age, read_bbox_list, read_data_entry
from fedxr.errors import DataError
from fedxr.labels import LABELS

from helpers import BBOX, V2020, needs_shared, real_rows


@needs_shared
def test_inspect_real_v2020_counts(capsys):
    assert main(["data", "inspect", str(V2020), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == 112_120
    assert stats["patients"] == 30_805
    assert stats["no_finding"] == 60_361
    assert stats["label_counts"]["Infiltration"] == 19_894
    assert stats["label_counts"]["Effusion"] == 13_317
    assert stats["label_counts"]["Hernia"] == 227
    assert stats["views"] == {"PA": 67_310, "AP": 44_810}
    assert stats["boxes"] == 984
    assert stats["boxed_images"] == 880
    # The two real images beside the metadata are found on disk; the rest are reported missing.
    assert stats["images_on_disk"] == 2
    assert stats["images_missing"] == 112_118


@needs_shared
def test_inspect_real_bbox_file(capsys):
    assert main(["data", "inspect", str(BBOX)]) == 0
    out = capsys.readouterr().out
    assert "984 on 880 images" in out
    boxes = read_bbox_list(BBOX)
    assert len(boxes) == 984
    assert boxes["image"].nunique() == 880
    counts = boxes["label"].value_counts().to_dict()
    assert counts["Infiltration"] == 123
    assert "Infiltrate" not in counts
    assert len(counts) == 8
    assert counts["Atelectasis"] == 180
    assert counts["Nodule"] == 79
    assert (boxes[["x", "y"]] >= 0).all().all()
    assert (boxes["x"] + boxes["w"] <= 1024 + 1).all()


def _variants(tmp_path, n=400):
    """The same real rows written as the original 2017 file and as Kaggle's sample_labels.csv."""
    header, rows = real_rows(n)
    v2020 = tmp_path / "Data_Entry_2017_v2020.csv"
    v2020.write_text("\n".join([header, *rows]) + "\n")
    orig = tmp_path / "Data_Entry_2017.csv"
    orig.write_text("\n".join([header + ",", *[r + "," for r in rows]]) + "\n")
    kaggle = tmp_path / "sample_labels.csv"
    k_header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImageWidth,OriginalImageHeight,OriginalImagePixelSpacing_x,OriginalImagePixelSpacing_y")
    k_rows = []
    for r in rows:
        f = r.split(",")
        f[4] = f"{int(f[4]):03d}Y"
        k_rows.append(",".join(f))
    kaggle.write_text("\n".join([k_header, *k_rows]) + "\n")
    return v2020, orig, kaggle


@needs_shared
def test_three_layouts_give_the_same_table(tmp_path):
    tables = [read_data_entry(p) for p in _variants(tmp_path)]
    ref = tables[0]
    assert ref.shape[0] == 400
    assert ref["orig_width"].notna().all()
    for t in tables[1:]:
        np.testing.assert_array_equal(t[list(LABELS)].to_numpy(), ref[list(LABELS)].to_numpy())
        assert t["image"].tolist() == ref["image"].tolist()
        assert t["patient_id"].tolist() == ref["patient_id"].tolist()
        assert t["age"].tolist() == ref["age"].tolist()
        assert t["orig_width"].tolist() == ref["orig_width"].tolist()
        assert t["view"].tolist() == ref["view"].tolist()


def test_parse_age():
    assert parse_age("57") == 57
    assert parse_age("058Y") == 58
    assert parse_age("006M") == 0.5
    assert np.isnan(parse_age(""))
    with pytest.raises(ValueError):
        parse_age("old")


HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"


def test_missing_required_column(tmp_path):
    p = tmp_path / "Data_Entry_2017.csv"
    p.write_text("Image Index,Finding Labels,Follow-up #\n00000001_000.png,Mass,0\n")
    with pytest.raises(DataError, match=r"missing required column\(s\) 'Patient ID'"):
        read_data_entry(p)


def test_unknown_label_names_label_and_row(tmp_path):
    p = tmp_path / "Data_Entry_2017.csv"
    p.write_text(f"{HEADER}\n00000001_000.png,Mass,0,1,50,M,PA\n00000002_000.png,Effusion|Pneumonitis,0,2,40,F,AP\n")
    with pytest.raises(DataError, match=r"line 3 \(00000002_000.png\): unknown label 'Pneumonitis'"):
        read_data_entry(p)


def test_empty_and_header_only_csv(tmp_path):
    p = tmp_path / "Data_Entry_2017.csv"
    p.write_text("")
    with pytest.raises(DataError, match="file is empty"):
        read_data_entry(p)
    p.write_text(HEADER + "\n")
    with pytest.raises(DataError, match="no rows"):
        read_data_entry(p)


def test_listed_image_absent_error_or_drop(mini_nih, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(mini_nih, root)
    victim = next((root / "images_001" / "images").glob("*.png"))
    victim.unlink()
    with pytest.raises(DataError, match=rf"1 of 120 listed images are not on disk \(first: {victim.name}\).*--missing drop"):
        load_dataset(root)
    ds = load_dataset(root, missing="drop")
    assert ds.dropped == 1
    assert len(ds.table) == 119
    assert victim.name not in set(ds.table["image"])


def test_images_found_anywhere_under_root(mini_nih):
    ds = load_dataset(mini_nih)
    assert len(ds.table) == 120
    assert (ds.table["path"].str.contains("images_001/images/")).all()


def test_overlapping_patients_in_official_lists(mini_nih, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(mini_nih, root)
    table = read_data_entry(root / "Data_Entry_2017_v2020.csv")
    p1 = table[table["patient_id"] == 1]["image"].tolist()
    assert len(p1) >= 2
    (root / "train_val_list.txt").write_text(p1[0] + "\n")
    (root / "test_list.txt").write_text(p1[1] + "\n")
    with pytest.raises(DataError, match="patient 1.*patient-wise"):
        load_dataset(root)
    # Patient-wise lists are accepted and recorded.
    rest = table[table["patient_id"] != 1]["image"].tolist()
    (root / "train_val_list.txt").write_text("\n".join(rest) + "\n")
    (root / "test_list.txt").write_text("\n".join(p1) + "\n")
    ds = load_dataset(root)
    assert (ds.table.loc[ds.table["patient_id"] == 1, "official_split"] == "test").all()


def test_no_label_file_says_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match="fedxr data phantom"):
        load_dataset(tmp_path)
