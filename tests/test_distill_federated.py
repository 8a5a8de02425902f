"""Federated distillation through the real NVFlare simulator: teacher sent by NVFlare, frozen, students averaged."""

import json
from pathlib import Path

import pytest
import torch

from fedxr.cli import main
from fedxr.config import load_recipe
from fedxr.data.prepare import ensure_dataset, ensure_sites
from fedxr.models.checkpoint import load_checkpoint, save_checkpoint
from fedxr.models.registry import build_model
from fedxr.preprocessing import Preprocessing

from helpers import QUICKSTART, tiny_recipe_overrides

pytestmark = pytest.mark.slow


def _overrides(tmp, extra=()):
    return tiny_recipe_overrides(tmp, patients=50, extra=(
        "data.phantom.hospitals=2", "data.sites=2", "federated.min_clients=2", "data.batch_size=8",
        "distill.students=[tiny_cnn]", "distill.rounds=1", *extra))


def _teacher(path: Path, image_size: int = 48) -> Path:
    # A teacher at a larger input size than the students (32 px), so the resize path runs too.
    torch.manual_seed(7)
    net = build_model("tiny_cnn")
    return save_checkpoint(path, model_name="tiny_cnn", state_dict=net.state_dict(), preprocessing=Preprocessing(image_size),
                           thresholds=[0.5] * 14, source="federate")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    ov = _overrides(tmp)
    recipe = load_recipe(QUICKSTART, ov)
    ensure_dataset(recipe, progress=False)
    ensure_sites(recipe)
    teacher = _teacher(tmp / "teacher.ckpt")
    assert main(["distill", str(QUICKSTART), *ov, "--teacher", str(teacher)]) == 0
    return recipe, ov, teacher


def test_student_checkpoint_trained_and_evaluable(distilled, tmp_path, capsys):
    recipe, _, _ = distilled
    out = recipe.layout.distill / "tiny_cnn"
    ckpt = load_checkpoint(out / "global_last.ckpt")
    assert ckpt["model_name"] == "tiny_cnn"
    assert ckpt["source"] == "distill"
    assert ckpt["preprocessing"].size == 32
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])  # the student alone
    init = torch.load(out / "initial_model.pt", weights_only=True)
    changed = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.equal(v, init[f"model.{k}"])]
    assert "head.weight" in changed
    assert len(changed) > 5
    rounds = json.loads((out / "rounds.json").read_text())
    assert set(rounds[0]["sites"]) == {"site-1", "site-2"}
    assert all(s["steps"] > 0 for s in rounds[0]["sites"].values())
    capsys.readouterr()
    assert main(["evaluate", str(out / "global_last.ckpt"), "--data", str(recipe.layout.sites), "--json",
                 "--out", str(tmp_path / "ev"), "--cache-dir", recipe.data.cache_dir]) == 0
    assert json.loads(capsys.readouterr().out)["images"] > 0


def test_teacher_reached_sites_through_nvflare_and_is_unchanged(distilled):
    recipe, _, teacher_path = distilled
    teacher = load_checkpoint(teacher_path)["state_dict"]
    out = recipe.layout.distill / "tiny_cnn"
    # The teacher travelled inside the job (bundled into the server app), not via a shared path.
    bundled = list((out / "nvflare").rglob("app_server/custom/initial_model.pt"))
    assert bundled, "initial model with the teacher bundled into the NVFlare job"
    final = torch.load(next((out / "nvflare").rglob("FL_global_model.pt")), weights_only=False)["model"]
    teacher_keys = [k for k in final if k.startswith("teacher.")]
    assert len(teacher_keys) == len(teacher)
    for k, v in teacher.items():
        assert torch.equal(torch.as_tensor(final[f"teacher.{k}"]), v), k  # bit-identical after distillation
    # and the student part of the global model did move
    assert not torch.equal(torch.as_tensor(final["model.head.weight"]),
                           torch.load(out / "initial_model.pt", weights_only=True)["model.head.weight"])


def test_report_compares_teacher_students_and_ablation(distilled):
    recipe, _, _ = distilled
    folder = recipe.layout.distill
    report = json.loads((folder / "distill_report.json").read_text())
    row = report["students"]["tiny_cnn"]
    assert report["teacher"]["macs"] > row["macs"] > 0  # teacher at 48 px, student at 32 px
    assert row["mac_ratio"] == pytest.approx(report["teacher"]["macs"] / row["macs"])
    assert set(row["auroc"]) == set(report["teacher"]["auroc"])
    assert len(row["auroc"]) == 14
    assert "no_kd" in row
    assert "/tiny_cnn_no_kd/global_" in row["no_kd"]["checkpoint"]
    assert row["kd_gain"] == pytest.approx(row["macro_auroc"] - row["no_kd"]["macro_auroc"])
    assert row["goal_kd_beats_no_kd"] == (row["kd_gain"] > 0)
    assert (folder / "distill_report.png").stat().st_size > 10_000
    ablation = load_checkpoint(row["no_kd"]["checkpoint"])
    assert ablation["model_name"] == "tiny_cnn"


def test_central_mode_one_site(distilled):
    recipe, ov, teacher_path = distilled
    from fedxr.distill.run import distill

    central = load_recipe(QUICKSTART, ov + ["output.name=central", "distill.ablation_no_teacher=false"])
    ensure_sites(central)
    result = distill(central, teacher_path, mode="central", site="site-2", progress=False)
    kd = result.students["tiny_cnn"].kd
    assert result.students["tiny_cnn"].no_kd is None  # ablation off
    assert load_checkpoint(kd)["source"] == "distill"
    summary = json.loads((central.layout.distill / "summary.json").read_text())
    assert summary["students"]["tiny_cnn"]["kd"]["site"] == "site-2"


def test_bad_teacher_fails_before_any_job(tmp_path, capsys):
    ov = _overrides(tmp_path)
    # missing file
    assert main(["distill", str(QUICKSTART), *ov, "--teacher", str(tmp_path / "nope.ckpt")]) != 0
    assert "nope.ckpt: checkpoint not found" in capsys.readouterr().err
    # wrong label set
    bad = _teacher(tmp_path / "bad.ckpt")
    blob = torch.load(bad, weights_only=True)
    blob["labels"] = ["Pneumonia", "Effusion"]
    torch.save(blob, bad)
    assert main(["distill", str(QUICKSTART), *ov, "--teacher", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "bad.ckpt" in err
    assert "labels" in err
    # no teacher at all (no federate run yet)
    assert main(["distill", str(QUICKSTART), *ov]) != 0
    assert "run `fedxr federate RECIPE` first or pass --teacher" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "t" / "distill").exists()
