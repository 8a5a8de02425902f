"""`fedxr data split` end to end, then the image cache and the datamodule on its manifests."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from fedxr.cli import main
from fedxr.data.cache import build_cache, cache_path
from fedxr.data.datamodule import SiteDataModule
from fedxr.data.manifest import read_manifest, site_manifest_paths
from fedxr.errors import DataError
from fedxr.imaging import ImageReadError
from fedxr.labels import LABELS
from fedxr.preprocessing import Preprocessing


@pytest.fixture(scope="module")
def manifests(mini_nih, tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "sites"
    assert main(["data", "split", str(mini_nih), "--sites", "2", "--scheme", "iid", "--seed", "3",
                 "--val-fraction", "0.2", "--test-fraction", "0.2", "--out", str(out)]) == 0
    return out


def test_split_writes_patient_disjoint_manifests(manifests, mini_nih, capsys):
    paths = site_manifest_paths(manifests)
    assert list(paths) == ["site-1", "site-2"]
    frames = {k: read_manifest(p) for k, p in paths.items()}
    allrows = pd.concat(frames.values())
    assert len(allrows) == 120
    assert allrows["image"].is_unique
    site_of = {pid: s for s, f in frames.items() for pid in f["patient_id"]}
    assert sum(len(set(f["patient_id"])) for f in frames.values()) == len(site_of)  # no patient at two sites
    assert (allrows.groupby("patient_id")["split"].nunique() == 1).all()  # no patient in two splits
    for f in frames.values():
        assert set(f["split"]) == {"train", "val", "test"}
        assert all(os.path.isabs(p) and os.path.exists(p) for p in f["path"])
    summary = json.loads((manifests / "sites.json").read_text())
    assert summary["settings"]["scheme"] == "iid"
    assert summary["settings"]["column"] is None  # recorded as `fedxr data prepare` records it: no column decides
    assert len(summary["sites"]) == 2


def test_split_is_deterministic(mini_nih, manifests, tmp_path):
    assert main(["data", "split", str(mini_nih), "--sites", "2", "--scheme", "iid", "--seed", "3",
                 "--val-fraction", "0.2", "--test-fraction", "0.2", "--out", str(tmp_path / "again")]) == 0
    for name in ("site-1.csv", "site-2.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (manifests / name).read_bytes()


def test_split_empty_site_fails_cleanly(mini_nih, tmp_path, capsys):
    out = tmp_path / "sites"
    # The view column has two values (AP, PA): three natural sites are impossible.
    assert main(["data", "split", str(mini_nih), "--sites", "3", "--scheme", "column", "--column", "view",
                 "--out", str(out)]) == 1
    assert "only 2 distinct value(s)" in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.glob(".sites*"))  # nothing half-written
    assert main(["data", "split", str(mini_nih), "--scheme", "iid", "--sites", "500", "--out", str(out)]) == 1
    assert "cannot make 500 sites" in capsys.readouterr().err


def test_split_refuses_to_overwrite_foreign_folder(mini_nih, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["data", "split", str(mini_nih), "--scheme", "iid", "--sites", "2", "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_cache_built_once_and_rebuilt_on_change(manifests, tmp_path):
    paths = read_manifest(manifests / "site-1.csv")["path"].tolist()[:10]
    arr = build_cache(paths, 32, tmp_path, progress=False)
    assert arr.shape == (10, 32, 32)
    assert arr.dtype == np.uint8
    assert arr.std() > 10
    target = cache_path(paths, 32, tmp_path)
    stamp = target.stat().st_mtime_ns
    again = build_cache(paths, 32, tmp_path, progress=False)
    assert target.stat().st_mtime_ns == stamp  # reused, not rebuilt
    np.testing.assert_array_equal(arr, again)
    assert cache_path(paths, 48, tmp_path) != target
    assert cache_path(paths[:9], 32, tmp_path) != target


def test_cache_corrupt_image_names_file_and_leaves_nothing(tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 40), 100, np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    with pytest.raises(ImageReadError, match="bad.png"):
        build_cache([good, bad], 32, tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_datamodule_batches(manifests, tmp_path):
    dm = SiteDataModule([manifests / "site-1.csv"], Preprocessing(32), batch_size=4, num_workers=0,
                        augment=True, cache_dir=tmp_path, progress=False)
    dm.setup("fit")
    raw_x, y = next(iter(dm.train_dataloader()))
    # Training batches leave the loader as the cached uint8 images; the data module's batch hook (run by
    # Lightning on the training device) augments and normalises them.
    assert raw_x.dtype == torch.uint8
    assert raw_x.shape == (4, 1, 32, 32)
    x, y = dm.on_after_batch_transfer((raw_x, y), 0)
    assert x.shape == (4, 1, 32, 32)
    assert x.dtype == torch.float32
    assert y.shape == (4, 14)
    vx, _ = next(iter(dm.val_dataloader()))
    raw = dm.datasets["val"].images[0].astype(np.float32) / 255
    np.testing.assert_allclose(vx[0, 0].numpy(), (raw - 0.5) / 0.25, atol=1e-5)  # no augmentation at val
    assert dm.split_labels("train").shape[1] == len(LABELS)
    pooled = SiteDataModule(list(site_manifest_paths(manifests).values()), Preprocessing(32), num_workers=0, cache_dir=tmp_path, progress=False)
    pooled.setup()
    assert sum(len(d) for d in pooled.datasets.values()) == 120


def test_datamodule_missing_manifest(tmp_path):
    dm = SiteDataModule([tmp_path / "site-9.csv"], Preprocessing(32), cache_dir=tmp_path)
    with pytest.raises(DataError, match="site-9.csv: site manifest not found"):
        dm.setup()


def test_manifest_paths_are_absolute_for_a_relative_root(mini_nih, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(mini_nih, tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "split", "ds", "--scheme", "iid", "--sites", "1", "--out", "sites"]) == 0
    paths = read_manifest(tmp_path / "sites" / "site-1.csv")["path"]
    assert all(os.path.isabs(p) and os.path.exists(p) for p in paths)  # site processes run from other folders


def test_batch_augmentation_is_seeded_mild_and_normalised():
    from fedxr.data.augment import augment_batch
    from fedxr.imaging import standardize, to_unit

    images = torch.from_numpy(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (8, 1, 64, 1)))
    torch.manual_seed(3)
    first = augment_batch(images, 0.5, 0.25)
    torch.manual_seed(3)
    assert torch.equal(first, augment_batch(images, 0.5, 0.25))  # a seed gives the same batch
    plain = torch.from_numpy(standardize(to_unit(images.numpy()), 0.5, 0.25))  # the unaugmented model input
    assert first.shape == plain.shape
    assert first.dtype == torch.float32
    assert not torch.equal(first, plain)  # something was changed ...
    # ... but mildly: each image stays close to its original (rotation ≤ 5°, shift ≤ 4 %, intensity jitter).
    diff = (first - plain).abs().mean(dim=(1, 2, 3))
    assert float(diff.max()) < 0.6 * float(plain.std())
    assert float(diff.min()) > 0
    # The normalised range: [0, 1] mapped by (x - 0.5) / 0.25.
    assert float(first.min()) >= -2.0 - 1e-6
    assert float(first.max()) <= 2.0 + 1e-6


def test_atomic_text_write_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) keeps the previous file whole and leaves no temporary file."""
    import fedxr.data.atomic as atomic

    target = tmp_path / "rounds.json"
    atomic.write_json_atomic(target, {"round": 1})
    assert json.loads(target.read_text()) == {"round": 1}
    (tmp_path / "plain.json").write_text("{}")
    assert target.stat().st_mode == (tmp_path / "plain.json").stat().st_mode  # not owner-only, as mkstemp makes it
    (tmp_path / "plain.json").unlink()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_json_atomic(target, {"round": 2, "sites": list(range(1000))})
    assert json.loads(target.read_text()) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.json"]
