"""Real radiographs with partial labels: the generic labels CSV, unknown labels kept unknown, bad input named,
and a small real federation (2 institutions from ../shared/data/real-cxr) with within-site metrics and the
provenance of every artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedxr.data.labelcsv import dataset_from_table, read_labels_csv
from fedxr.data.manifest import build_site_manifests, read_manifest, write_manifests
from fedxr.errors import DataError
from fedxr.labels import LABELS, NO_FINDING

ROOT = Path(__file__).resolve().parents[1]
REAL = (ROOT / ".." / "shared" / "data" / "real-cxr").resolve()
REAL_RECIPE = ROOT / "recipes" / "real_cxr.yaml"
needs_real = pytest.mark.skipif(not (REAL / "labels.csv").is_file(),
                                reason=f"real chest X-rays not found at {REAL} (the shared/ folder beside the project)")


def _csv(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(path)


# --- the real labels file ---------------------------------------------------------------------------------

@needs_real
def test_real_labels_load_with_unknown_kept_unknown():
    table = read_labels_csv(REAL / "labels.csv")
    assert len(table) == 7311
    by = {s: g for s, g in table.groupby("source")}
    assert {s: len(g) for s, g in by.items()} == {"nih": 1000, "kermany": 5840, "hannover": 243, "ieee8023": 228}
    nih, kermany = by["nih"], by["kermany"]
    assert not nih[list(LABELS)].isna().any().any()  # NIH labels all 14
    assert (nih["Pneumonia"] == 1).sum() == 500 and (nih[NO_FINDING] == 1).sum() == 500
    # The pediatric set labels Pneumonia only: its pneumonia films say nothing about Emphysema (unknown, not 0);
    # its normal films have every finding 0.
    pneumonia = kermany[kermany["Pneumonia"] == 1]
    assert len(pneumonia) == 4265 and pneumonia["Emphysema"].isna().all()
    assert (kermany.loc[kermany[NO_FINDING] == 1, list(LABELS)] == 0).all().all()


@needs_real
def test_real_folder_splits_patient_wise_into_one_site_per_source(tmp_path):
    table = read_labels_csv(REAL / "labels.csv")
    ds = dataset_from_table(table, REAL, REAL / "labels.csv", site_column="source")
    manifests, details = build_site_manifests(ds, 4, "column", column="source", min_size=2)
    assert details["column_values"] == {"site-1": ["hannover"], "site-2": ["ieee8023"], "site-3": ["kermany"],
                                        "site-4": ["nih"]}
    every = pd.concat(manifests.values())
    assert every.groupby("patient_id")["split"].nunique().max() == 1  # a patient is in one split
    kermany = manifests["site-3"]
    # The pediatric set's own test folder decides its test split (patients in both folders go to test whole).
    original = table[(table["source"] == "kermany") & (table["split"] == "test")]
    assert set(Path(p).name for p in original["path"]) <= set(kermany.loc[kermany["split"] == "test", "image"])
    write_manifests(tmp_path / "sites", manifests, {"root": str(REAL)})
    back = read_manifest(tmp_path / "sites" / "site-3.csv")
    assert back["Emphysema"].isna().sum() == (back["Pneumonia"] == 1).sum() > 0  # unknown survives the round trip
    assert set(back["Emphysema"].dropna().unique()) == {0.0}


@needs_real
def test_inspect_reports_positives_negatives_unknown_per_source():
    from fedxr.data.inspect import format_stats, inspect_path

    stats = inspect_path(REAL)
    assert stats["kind"] == "labels_csv" and stats["images"] == 7311 and stats["patients"] == 4059
    kermany = stats["groups"]["kermany / Guangzhou Women and Children's Medical Center (CN)"] \
        if "kermany / Guangzhou Women and Children's Medical Center (CN)" in stats["groups"] else \
        next(g for k, g in stats["groups"].items() if k.startswith("kermany"))
    assert kermany["labels"]["Pneumonia"] == {"positive": 4265, "negative": 1575, "unknown": 0}
    assert kermany["labels"]["Emphysema"] == {"positive": 0, "negative": 1575, "unknown": 4265}
    text = format_stats(stats)
    assert "Pneumonia 4265/1575/0" in text and "Emphysema 0/1575/4265" in text


# --- bad input: each a clear error naming the file, the line and the column -------------------------------

HEADER = "path,patient_id,site,Pneumonia,Effusion,No Finding\n"


@pytest.mark.parametrize("body, expected", [
    ("a.png,p1,x,2,0,0\n", ["line 2", "'Pneumonia'", "'2'", "1, 0 or blank"]),
    ("a.png,p1,x,-1,0,0\n", ["line 2", "'Pneumonia'", "uncertain", "data.source: chexpert"]),
    ("a.png,p1,x,1,0,1\n", ["line 2", "'No Finding'", "Pneumonia"]),
    ("a.png,p1,x,1,0,0\na.png,p2,x,0,0,1\n", ["line 3", "'path'", "listed twice"]),
    ("a.png,,x,1,0,0\n", ["line 2", "'patient_id'", "empty"]),
])
def test_bad_rows_name_file_line_and_column(tmp_path, body, expected):
    path = _csv(tmp_path, HEADER + body)
    with pytest.raises(DataError) as err:
        read_labels_csv(path)
    assert str(path) in str(err.value)
    for part in expected:
        assert part in str(err.value)


def test_missing_and_unknown_columns_are_named_with_the_fix(tmp_path):
    with pytest.raises(DataError, match="missing required column.*'patient_id'"):
        read_labels_csv(_csv(tmp_path, "path,Pneumonia\na.png,1\n"))
    with pytest.raises(DataError) as err:
        read_labels_csv(_csv(tmp_path, "path,patient_id,Pneumonia,Lung Opacity\na.png,p1,1,0\n"))
    message = str(err.value)
    assert "'Lung Opacity'" in message and "Atelectasis" in message and "data.extra_columns" in message
    # Listed as metadata, the same column loads; spellings of known findings are mapped.
    table = read_labels_csv(_csv(tmp_path, "path,patient_id,Pleural Effusion,Lung Opacity\na.png,p1,1,0\n"),
                            extra_columns=("Lung Opacity",))
    assert table["Effusion"].iat[0] == 1 and np.isnan(table["Atelectasis"].iat[0])


def test_patient_in_two_sites_site_without_labels_and_missing_image(tmp_path):
    two_sites = read_labels_csv(_csv(tmp_path, HEADER + "a.png,p1,x,1,0,0\nb.png,p1,y,0,0,1\n"))
    with pytest.raises(DataError, match="patient 'p1' appears in 2 sites"):
        dataset_from_table(two_sites, tmp_path, tmp_path / "labels.csv", site_column="site")
    no_labels = read_labels_csv(_csv(tmp_path, HEADER + "a.png,p1,x,1,0,0\nb.png,p2,y,,,\n"))
    with pytest.raises(DataError, match="site 'y' has no known label"):
        dataset_from_table(no_labels, tmp_path, tmp_path / "labels.csv", site_column="site")
    _png(tmp_path / "a.png")
    missing = read_labels_csv(_csv(tmp_path, HEADER + "a.png,p1,x,1,0,0\nimg/b.png,p2,x,0,0,1\n"))
    with pytest.raises(DataError) as err:
        dataset_from_table(missing, tmp_path, tmp_path / "labels.csv", site_column="site")
    assert "line 3" in str(err.value) and "'img/b.png'" in str(err.value) and "missing_images: drop" in str(err.value)
    kept = dataset_from_table(missing, tmp_path, tmp_path / "labels.csv", missing="drop")
    assert len(kept.table) == 1 and kept.dropped == 1


def test_unreadable_and_too_small_images_are_named_when_cached(tmp_path):
    from fedxr.data.cache import build_cache

    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="bad.png"):
        build_cache([tmp_path / "bad.png"], 32, tmp_path / "cache", workers=1, progress=False)
    _png(tmp_path / "small.png")  # 40 x 40
    with pytest.raises(DataError, match=r"small.png.*40 x 40.*too small for data.image_size 128"):
        build_cache([tmp_path / "small.png"], 128, tmp_path / "cache", workers=1, progress=False)
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing written half-way


def test_a_manifest_label_that_is_not_1_0_or_blank_is_named(tmp_path):
    cols = ["image", "path", "patient_id", "split", "findings", *LABELS]
    row = ["a.png", "a.png", "p1", "train", "", *(["0"] * 13), "maybe"]
    (tmp_path / "site-1.csv").write_text(",".join(cols) + "\n" + ",".join(row) + "\n")
    with pytest.raises(DataError, match=r"site-1.csv, line 2, column 'Hernia': label 'maybe'"):
        read_manifest(tmp_path / "site-1.csv")


def test_the_real_recipe_loads_and_points_at_the_real_folder():
    from fedxr.config import load_recipe

    recipe = load_recipe(REAL_RECIPE)
    assert recipe.data.source == "csv" and recipe.data.column == "source" and recipe.data.sites == 4
    assert Path(recipe.data.root) == Path("../shared/data/real-cxr")


# --- a small real federation --------------------------------------------------------------------------------

def _small_real_csv(tmp: Path) -> Path:
    """~300 real films from two institutions (NIH with its 49 boxed films, and the pediatric hospital), with
    absolute paths: a labels CSV that points at ../shared without copying an image."""
    table = pd.read_csv(REAL / "labels.csv", dtype=str, keep_default_na=False)
    boxed = set(pd.read_csv(REAL / "nih_bbox.csv")["Image Index"])
    nih = table[table["source"] == "nih"]
    patients = set(nih.loc[nih["path"].map(lambda p: Path(p).name in boxed), "patient_id"])
    patients |= set(nih["patient_id"].drop_duplicates().iloc[:90])
    kermany = table[table["source"] == "kermany"]
    # Patients from the pediatric set's own train and test folders (its test folder is the site's test split).
    chosen = [kermany.loc[kermany["split"] == sp, "patient_id"].drop_duplicates().sample(n, random_state=0)
              for sp, n in (("train", 110), ("test", 30))]
    kermany = kermany[kermany["patient_id"].isin(pd.concat(chosen))]
    small = pd.concat([nih[nih["patient_id"].isin(patients)], kermany])
    small["path"] = [str(REAL / p) for p in small["path"]]
    out = tmp / "real" / "labels.csv"
    out.parent.mkdir(parents=True)
    small.to_csv(out, index=False)
    (tmp / "real" / "nih_bbox.csv").write_bytes((REAL / "nih_bbox.csv").read_bytes())
    return out


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    if not (REAL / "labels.csv").is_file():
        pytest.skip(f"real chest X-rays not found at {REAL}")
    from fedxr.cli import main
    from fedxr.config import load_recipe

    tmp = tmp_path_factory.mktemp("real")
    labels = _small_real_csv(tmp)
    overrides = [f"data.root={labels.parent}", "data.sites=2", "data.image_size=48", "data.batch_size=16",
                 "data.num_workers=0", f"data.cache_dir={tmp / 'cache'}", "model.name=tiny_cnn",
                 "federated.rounds=1", "federated.min_clients=2", "federated.max_local_steps=3", "distill.students=[resnet18_eighth]",
                 "distill.rounds=1", "distill.ablation_no_teacher=false", "explain.images=2", "explain.max_boxes=10",
                 "export.calibration_images=16", f"export.out={tmp / 'export'}", f"output.runs_dir={tmp / 'runs'}",
                 "output.name=real"]
    assert main(["run", str(REAL_RECIPE), *overrides]) == 0
    return tmp, load_recipe(REAL_RECIPE, overrides)


@pytest.mark.slow
def test_real_federation_scores_each_site_on_its_known_labels_only(real_run):
    tmp, recipe = real_run
    run = recipe.layout.root
    summary = json.loads((run / "sites" / "sites.json").read_text())
    assert summary["settings"]["column_values"] == {"site-1": ["kermany"], "site-2": ["nih"]}
    kermany = read_manifest(run / "sites" / "site-1.csv")
    test = kermany[kermany["split"] == "test"]
    per_site = json.loads((run / "evaluate" / "per_site.json").read_text())
    teacher_k = per_site["sites"]["site-1"]["teacher"]
    # Only the pediatric normals know Emphysema (as 0): the pneumonia films' unknown labels are not negatives.
    assert teacher_k["negatives"]["Emphysema"] == int((test["Emphysema"] == 0).sum()) < len(test)
    assert teacher_k["negatives"]["Emphysema"] == int((test[NO_FINDING] == 1).sum())
    assert set(teacher_k["counted"]) <= {"Pneumonia"}
    assert teacher_k["images"] == len(test)
    assert "abnormal_auroc" in teacher_k  # normal vs abnormal where No Finding is known
    assert set(per_site["pooled"]) == {"teacher", "student resnet18_eighth"}
    report = (run / "report.md").read_text()
    assert "## Within-site test figures (primary)" in report and "site-1 (kermany)" in report
    assert "trained on csv data" in report and "SYNTHETIC" not in report
    pg = json.loads((run / "explain" / "pointing_game.json").read_text())
    assert pg["boxes_scored"] > 0  # NIH's own boxes on real films (data.boxes_file)
    # federated.max_local_steps: a site with more batches than the cap trains the cap, a smaller one its epoch.
    steps = json.loads((run / "federate" / "rounds.json").read_text())[0]["sites"]
    epochs = {site: -(-int((read_manifest(run / "sites" / f"{site}.csv")["split"] == "train").sum()) // 16)
              for site in ("site-1", "site-2")}
    assert max(epochs.values()) > 3
    assert {site: s["steps"] for site, s in steps.items()} == {site: min(3, n) for site, n in epochs.items()}


@pytest.mark.slow
def test_every_artifact_records_what_it_was_trained_on(real_run):
    import torch

    from fedxr.edge import load_model

    tmp, recipe = real_run
    run = recipe.layout.root
    for ckpt_path in (run / "federate" / "global_last.ckpt", run / "distill" / "resnet18_eighth" / "global_last.ckpt"):
        record = torch.load(ckpt_path, map_location="cpu", weights_only=True)["trained_on"]
        assert record["data_source"] == "csv" and record["synthetic"] is False
        assert {k: v["holds"] for k, v in record["sites"].items()} == {"site-1": ["kermany"], "site-2": ["nih"]}
        assert record["trained_labels"] == list(LABELS)  # NIH labels all 14 (kermany alone would not)
    for name in ("real_tiny_cnn", "real_student_resnet18_eighth"):
        folder = tmp / "export" / name
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["trained_on"]["data_source"] == "csv"
        model = load_model(folder)
        assert model.trained_on == manifest["trained_on"] and not model.synthetic
    image = str(REAL / "images" / "nih" / "00008365_000.png")
    out = subprocess.run([sys.executable, "-m", "fedxr.edge", "predict", str(tmp / "export" / "real_tiny_cnn"), image],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("model: trained on csv data") and "synthetic" not in out.stdout


@pytest.mark.slow
def test_unknown_labels_reach_training_as_unknown(real_run):
    from fedxr.training import make_datamodule

    _, recipe = real_run
    dm = make_datamodule(recipe, [recipe.layout.sites / "site-1.csv"], progress=False)
    labels = dm.split_labels("train")
    emphysema = labels[:, LABELS.index("Emphysema")]
    pneumonia = labels[:, LABELS.index("Pneumonia")]
    # Unknown stays NaN in the training targets (the masked loss leaves it out; tests/test_unknown_labels.py).
    assert np.isnan(emphysema[pneumonia == 1]).all() and (emphysema[pneumonia == 0] == 0).all()


def test_a_chexpert_folder_loads_through_the_recipe(tmp_path):
    """data.source: chexpert reads the CheXpert file with the recipe's uncertainty policy into the same table."""
    from fedxr.config import load_recipe
    from fedxr.data.formats import CHEXPERT_COLUMNS
    from fedxr.data.prepare import load_recipe_dataset

    rows = []
    for i, (pneumonia, effusion) in enumerate([("1.0", ""), ("-1.0", "0.0"), ("0.0", "1.0"), ("", "")]):
        path = f"CheXpert-v1.0-small/train/patient0000{i}/study1/view1_frontal.jpg"
        _png(tmp_path / path)
        values = {c: "" for c in CHEXPERT_COLUMNS} | {"Pneumonia": pneumonia, "Pleural Effusion": effusion}
        rows.append(",".join([path, "Female", "60", "Frontal", "AP", *values.values()]))
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_COLUMNS)
    (tmp_path / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    base = [f"data.root={tmp_path}", "data.source=chexpert", "data.labels_file=train.csv", "data.scheme=iid",
            "data.boxes_file=null"]
    for policy, expected in (("ignore", np.nan), ("ones", 1.0), ("zeros", 0.0)):
        table = load_recipe_dataset(load_recipe(REAL_RECIPE, [*base, f"data.uncertain={policy}"])).table
        assert len(table) == 4 and table["image"].is_unique  # same file names: the relative path names each image
        got = table["Pneumonia"].iat[1]
        assert (np.isnan(got) if np.isnan(expected) else got == expected), policy
        assert table["Emphysema"].isna().all()  # CheXpert cannot provide it: unknown everywhere
    blank = load_recipe_dataset(load_recipe(REAL_RECIPE, [*base, "data.blank=unknown"])).table
    assert np.isnan(blank["Pneumonia"].iat[3]) and blank["Effusion"].iat[2] == 1
