"""`fedxr run`: every stage on a tiny recipe, a report that links only real files, skipping and --from."""

import json
import re
from pathlib import Path

import pytest

from fedxr.cli import main
from fedxr.config import load_recipe
from fedxr.layout import chosen_checkpoint
from fedxr.pipeline import STAGE_NAMES, run_pipeline
from fedxr.results import DistillResult, TeacherResult

from helpers import QUICKSTART, tiny_recipe_overrides

pytestmark = pytest.mark.slow


def _overrides(tmp):
    return tiny_recipe_overrides(tmp, patients=60, extra=(
        "data.phantom.hospitals=2", "data.sites=2", "federated.min_clients=2", "federated.rounds=1",
        "data.batch_size=8", "distill.students=[mobilenetv3_small_100]", "distill.rounds=1",
        "distill.ablation_no_teacher=false", "explain.images=3", "explain.max_boxes=20", "export.calibration_images=16", f"export.out={tmp / 'export'}"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    ov = _overrides(tmp)
    assert main(["run", str(QUICKSTART), *ov]) == 0
    return tmp, ov


def test_every_stage_ran_and_left_its_artifacts(first_run):
    tmp, ov = first_run
    recipe = load_recipe(QUICKSTART, ov)
    run = recipe.layout.root
    state = json.loads((run / "pipeline.json").read_text())
    assert list(state) == STAGE_NAMES
    for path in ["federate/global_last.ckpt", "distill/mobilenetv3_small_100/global_last.ckpt",
                 "distill/distill_report.json",
                 "distill/distill_report.png", "evaluate/metrics.json", "evaluate/roc_curves.png",
                 "explain/gradcam_grid.png", "explain/pointing_game.json", "report.md", "report_prevalence.png"]:
        assert (run / path).is_file(), path
    for name in ("t_tiny_cnn", "t_student_mobilenetv3_small_100"):
        manifest = json.loads((tmp / "export" / name / "manifest.json").read_text())
        assert manifest["ok"]
        assert (tmp / "export" / name / manifest["recommended"]).is_file()
    for stage in STAGE_NAMES:  # the edge stage is off unless the recipe turns it on: no log
        assert (run / "logs" / f"{stage}.log").is_file() == (stage != "edge"), stage
    # The evaluate stage scores the teacher once and the distillation report reuses that result.
    report = json.loads((run / "distill" / "distill_report.json").read_text())
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert report["teacher"]["macro_auroc"] == metrics["macro_auroc"]
    assert not (run / "distill" / "eval_teacher").exists()
    pg = json.loads((run / "explain" / "pointing_game.json").read_text())
    assert len(pg["models"]) == 2
    assert pg["boxes_scored"] > 0
    for m in pg["models"].values():
        assert 0 <= m["overall"] <= 1
        assert 0 < m["random_overall"] < 1


def test_report_references_only_files_that_exist(first_run):
    tmp, ov = first_run
    run = load_recipe(QUICKSTART, ov).layout.root
    text = (run / "report.md").read_text()
    for heading in ("## Data per site", "## Federated teacher", "## Teacher on the pooled test set",
                    "## Teacher vs students", "## Exported models", "## Where the models look", "## Resolved recipe",
                    "## Calibration, operating points and the out-of-distribution check"):
        assert heading in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    files = re.findall(r"`([^`\s]+\.(?:ckpt|onnx|md))`", text)
    assert len(images) >= 5
    assert files and any(f.endswith("MODEL_CARD.md") for f in files)
    for ref in images + files:
        assert (run / ref).exists(), f"report.md links {ref}, which does not exist"


def test_rerun_skips_every_stage_and_from_reruns_the_tail(first_run, capsys):
    tmp, ov = first_run
    recipe = load_recipe(QUICKSTART, ov)
    capsys.readouterr()
    again = run_pipeline(recipe, QUICKSTART, progress=False)
    assert again["stages"].pop("edge") == "disabled"  # off unless the recipe turns it on
    assert set(again["stages"].values()) == {"skipped"}
    out = capsys.readouterr().out
    assert "up to date, skipped" in out
    # Skipped stages hand on their typed results, read back from pipeline.json.
    results = again["results"]
    assert isinstance(results.teacher, TeacherResult)
    assert Path(results.teacher.checkpoint) == chosen_checkpoint(recipe.layout.federate)
    assert isinstance(results.distill, DistillResult)
    assert set(results.students) == {"mobilenetv3_small_100"}
    assert results.seconds["teacher"] > 0
    # The model to try is the smallest export, shown on an image of the run's own test data.
    sizes = {}
    for path in results.export.manifests.values():
        manifest = json.loads(Path(path).read_text())
        sizes[str(Path(path).parent)] = (Path(path).parent / manifest["recommended"]).stat().st_size
    assert len(sizes) == 2
    assert results.export.edge_model == min(sizes, key=sizes.get)
    example = out.split("try it:")[1].split()[5]  # python -m fedxr.edge predict MODEL IMAGE
    assert Path(example).is_file()
    assert "shared" not in example
    teacher_mtime = (recipe.layout.federate / "global_last.ckpt").stat().st_mtime
    tail = run_pipeline(recipe, QUICKSTART, start="evaluate", progress=False)  # (the export's rerun: test_interrupted)
    before = STAGE_NAMES[:STAGE_NAMES.index("evaluate")]
    assert all(tail["stages"][s] == "skipped" for s in before)
    assert all(tail["stages"][s] == ("disabled" if s == "edge" else "ran") for s in STAGE_NAMES[len(before):])
    assert (recipe.layout.federate / "global_last.ckpt").stat().st_mtime == teacher_mtime


def test_a_changed_setting_reruns_only_what_depends_on_it(first_run):
    tmp, ov = first_run
    recipe = load_recipe(QUICKSTART, ov + ["explain.images=2"])
    result = run_pipeline(recipe, QUICKSTART, progress=False)
    assert result["stages"]["teacher"] == "skipped"
    assert result["stages"]["export"] == "skipped"
    assert result["stages"]["explain"] == "ran"
    assert result["stages"]["report"] == "ran"


def test_a_failing_stage_is_named_with_its_log(tmp_path, capsys):
    ov = _overrides(tmp_path) + ["data.source=nih", f"data.root={tmp_path / 'no_such_data'}"]
    assert main(["run", str(QUICKSTART), *ov]) != 0
    err = capsys.readouterr().err
    assert "stage 'data' failed" in err
    assert "logs/data.log" in err
    assert "no NIH label file" in err
    with pytest.raises(SystemExit):
        main(["run", str(QUICKSTART), "--from", "nonsense"])


def test_energy_of_every_training_job_and_the_total(first_run):
    tmp, ov = first_run
    layout = load_recipe(QUICKSTART, ov).layout
    summary = json.loads(layout.energy.read_text())
    assert set(summary["jobs"]) == {"teacher (federated)", "student mobilenetv3_small_100"}
    for job in summary["jobs"].values():
        assert job["energy_wh"] > 0
        assert job["emissions_g"] > 0
        assert job["methods"]["cpu"].startswith(("measured", "estimated"))
    for key in ("energy_wh", "emissions_g"):
        assert summary["total"][key] == pytest.approx(sum(j[key] for j in summary["jobs"].values()))
    assert sum(s["share"] for s in summary["teacher_per_site"].values()) == pytest.approx(1.0)
    edge = summary["edge"]["per_1000_predictions"]
    assert set(edge) == {"teacher tiny_cnn", "student mobilenetv3_small_100"}
    assert all(v["wh_per_1000"] > 0 for v in edge.values())
    report = layout.report.read_text()
    assert "## Energy and emissions" in report
    assert summary["country"] == "USA"


def test_the_edge_stage_fine_tunes_the_runs_student_across_devices(first_run):
    """`edge_federation.enabled`: `fedxr run` adds the edge stage; every earlier stage is left as it was, the devices
    start from the run's distilled student and the report shows the versions. (The edge federation itself:
    tests/test_edge_federation.py.)"""
    tmp, ov = first_run
    edge = ["edge_federation.enabled=true", "edge_federation.site=site-2", "edge_federation.devices=8",
            "edge_federation.selection=2", "edge_federation.updates_per_version=2", "edge_federation.versions=2",
            "edge_federation.dropout=0", "edge_federation.stragglers=0", "edge_federation.timeout_s=120"]
    recipe = load_recipe(QUICKSTART, ov + edge)
    result = run_pipeline(recipe, QUICKSTART, progress=False)
    # (explain may rerun: the test before this one scored it with other settings)
    assert all(result["stages"][s] == "skipped" for s in ("teacher", "distill", "export", "evaluate")), result["stages"]
    assert result["stages"]["edge"] == "ran" and result["stages"]["report"] == "ran"
    summary = json.loads((recipe.layout.edge_federation / "summary.json").read_text())
    student = result["results"].distill.students["mobilenetv3_small_100"].kd
    assert summary["started_from"] == student
    assert [v["version"] for v in summary["versions"]] == [1, 2]
    assert Path(result["results"].edge.final).is_file()
    assert "## Devices that learn together" in recipe.layout.report.read_text()
    again = run_pipeline(recipe, QUICKSTART, progress=False)
    assert again["stages"]["edge"] == "skipped"
    # Without the setting the stage is disabled and the run's other stages are not rerun for it.
    plain = run_pipeline(load_recipe(QUICKSTART, ov), QUICKSTART, progress=False)
    assert plain["stages"]["edge"] == "disabled" and plain["stages"]["teacher"] == "skipped"
