"""Each benchmark runs once in --smoke mode: proof that it still works, not a timing test. The four slowest
(`bench` marker: privacy_finetune, privacy_real, real_cxr, real_cxr_seeds) run with `pytest -m bench`, outside the default suite,
which must stay near 35 minutes on 2 cores; run them after changing a benchmark or the paths it measures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_smoke(script: str, *args: str, result_name: str | None = None) -> dict:
    """Run ``benchmarks/SCRIPT --smoke`` and return the JSON result it wrote."""
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    name = result_name or script.replace(".py", "")
    result = json.loads((BENCH / "results" / f"{name}.smoke.json").read_text())
    assert result["machine"]["cpu_count"] >= 1
    return result


def test_data_loading():
    result = run_smoke("data_loading.py")
    assert result["png_images_per_s"] > 0
    assert result["cache_images_per_s"] > 0


def test_data_loading_at_nih_scale():
    result = run_smoke("data_loading.py", "--images", "112120", result_name="data_loading_nih")
    assert result["images"] == 300  # smoke mode caps the size
    assert result["cache_disk_gb"] > 0
    assert result["loader_images_per_s"] > 0
    assert result["build_images_per_s"] > 0
    assert result["memory_after"]["processes"] >= 1
    assert result["memory_after"]["anonymous_mb"] > 0


def test_phantom_difficulty():
    result = run_smoke("phantom_difficulty.py")
    assert [c["patients"] for c in result["learning_curve"]] == [16, 32]
    assert all(c["train_images"] > 0 for c in result["learning_curve"])
    assert all(len(c["auroc"]) == 14 for c in result["learning_curve"])
    assert 0 < result["hospital"]["patients_one_hospital"] < result["hospital"]["patients_pooled"]


def test_train_throughput():
    result = run_smoke("train_throughput.py")
    assert all(r["images_per_s"] > 0 for r in result["results"])
    assert all(r["timed_steps"] > 0 for r in result["results"])
    assert result["loader_images_per_s"] > 0
    assert result["from_png"][0]["data"] == "png"
    assert result["from_png"][0]["images_per_s"] > 0
    fl = result["in_nvflare"][0]
    assert fl["images_per_s"] > 0
    assert fl["rounds"]
    assert fl["overhead_pct"] < 100


def test_federated_overhead(console_run):
    # Measured on the console tests' tiny run (tiny_cnn, 32 px, 2 sites, 2 rounds): one federation fewer.
    r = run_smoke("federated_overhead.py", "--from-federate", str(console_run["runs"] / "t" / "federate"))["results"][0]
    assert r["model_bytes"] > 0
    assert r["bytes_per_round"] == 4 * r["model_bytes"]  # 2 sites, model down and up
    assert r["rounds"]
    assert all(x["wall_s"] > 0 for x in r["rounds"])
    assert all(x["site_work_s"] > 0 for x in r["rounds"])


def test_federated_accuracy():
    row = run_smoke("federated_accuracy.py")["table"]["iid"]
    assert set(row) == {"central", "fedavg", "local"}
    assert len(row["local"]["runs"][0]["per_model"]) == 2
    assert len(row["central"]["runs"][0]["per_model"]) == 1
    assert all(0 <= v <= 1 for r in row.values() for v in r["per_seed"] if v is not None)
    assert row["central"]["per_seed"] == [row["central"]["macro_auroc"]]


def test_distill_gain(console_run):
    from fedxr.layout import chosen_checkpoint

    # The teacher: the console tests' tiny run's (tiny_cnn at 32 px, as the smoke's toy data), not one more federation.
    teacher = chosen_checkpoint(console_run["runs"] / "t" / "federate")
    result = run_smoke("distill_gain.py", "--teacher", str(teacher))
    assert result["teacher"] == str(teacher)
    assert [r["seed"] for r in result["rows"]] == [0, 1]
    assert all(r["kd_gain"] == pytest.approx(r["kd"] - r["no_kd"]) for r in result["rows"])
    assert result["summary"]["kd_gain"]["sd"] is not None
    assert all(lo <= hi for lo, hi in (r["kd_gain_ci95"] for r in result["rows"]))


def test_edge_latency():
    result = run_smoke("edge_latency.py")
    assert {row["format"] for row in result["rows"]} == {"pytorch-eager", "onnx-fp32", "onnx-int8"}
    assert all(row["p50_ms"] > 0 for row in result["rows"])
    assert all(row["p50_ms"] <= row["p95_ms"] for row in result["rows"])
    assert result["goals"]["student_onnx_vs_eager_b1"] > 0
    assert result["matmul_peak_gflops"]["1"] > 0
    assert all(r["gflops"] > 0 for r in result["rows"])
    assert all(r["share_of_peak"] > 0 for r in result["rows"])


def test_edge_footprint():
    result = run_smoke("edge_footprint.py")
    rows = result["rows"]
    assert {(r["role"], r["format"]) for r in rows} == {(role, fmt) for role in ("teacher", "student")
                                                        for fmt in ("onnx-fp32", "onnx-int8-qdq")}
    for r in rows:
        assert 0 < r["cold_start_s"] < 60
        # The command's own memory, not this test's (a child's ru_maxrss would otherwise start at its parent's).
        assert 10 < r["peak_rss_one_mb"] < 500
        assert r["png_folder_img_per_s"] > 0 and r["dicom_folder_img_per_s"] > 0


def test_console_load(console_run):
    # Against the console tests' tiny run and its export (one `fedxr run` fewer than the smoke's own).
    result = run_smoke("console_load.py", "--runs", str(console_run["runs"]), "--exports", str(console_run["exports"]),
                       "--model", "t_tiny_cnn")
    assert result["concurrent"]["errors"] == 0
    assert result["concurrent"]["requests"] == 4 * 3
    for part in ("predict_and_heatmap", "predict_only"):
        assert 0 < result["server_side"][part]["p50_ms"] <= result["server_side"][part]["p95_ms"]
    assert result["pages"]["home"]["p50_ms"] > 0
    assert result["pages"]["run"]["n"] == 5


def test_privacy_utility():
    result = run_smoke("privacy_utility.py")
    no_dp, dp = result["rows"]
    assert no_dp["epsilon"] is None and no_dp["norm"] == "batch" and no_dp["epsilon_spent"] is None
    assert dp["epsilon"] == 3 and dp["norm"] == "group" and dp["within_target"]
    assert 0 < max(dp["epsilon_spent"].values()) <= 3
    assert all(0 <= r["macro_auroc"] <= 1 for r in result["rows"])
    assert (BENCH.parent / result["plot"]).is_file()


@pytest.mark.bench
def test_privacy_finetune():
    """Public pretraining then private fine-tuning: every row from the public start except the from-scratch one,
    DP rows within their budget (training and validation scores), the per-patient row uses the setting validation
    chose at ε = 8 (here logical batches of 16 with 2 augmented copies)."""
    result = run_smoke("privacy_finetune.py")
    rows = {r["label"]: r for r in result["rows"]}
    assert [r["init"] for r in result["rows"]] == ["public"] * 4  # smoke: no from-scratch row
    assert result["rows"][0]["trainable"] == "none"  # the public model as it is, before any fine-tuning
    assert rows["no DP, all weights"]["epsilon"] is None and rows["no DP, all weights"]["trainable"] == "all"
    dp = [r for r in result["rows"] if r["epsilon"]]
    assert [(r["epsilon"], r["unit"]) for r in dp] == [(8.0, "image"), (8.0, "patient")]  # smoke: ε = 8
    assert all(r["within_target"] for r in dp)
    assert all(r["optimizer"] == "sgd" and 0 < max(r["epsilon_spent"].values()) <= r["epsilon"] for r in dp)
    # The toy validation splits have too few cases per label for a release (tests/test_privacy.py checks those).
    assert all(0 <= max(r["val_epsilon_spent"].values()) <= r["epsilon"] for r in dp)
    chosen = result["chosen_on_validation"]
    assert chosen == {"trainable": "head", "lr": 0.5, "logical": 16, "copies": 2}
    assert all((r["trainable"], r["lr"], r["logical_batch_size"], r["copies"]) == ("head", 0.5, 16, 2) for r in dp)
    assert set(result["gap_to_non_private"]) == {"epsilon_8", "epsilon_8_per_patient"}
    assert (BENCH.parent / result["plot"]).is_file()


@pytest.mark.slow
@pytest.mark.bench
def test_privacy_real():
    """DP on real films: the public model sees the NIH source only, the private federation the three others; the
    DP rows stay within budget and are compared with non-private fine-tuning at the pediatric site, paired."""
    import pandas as pd

    result = run_smoke("privacy_real.py")
    work = BENCH.parent / "runs" / "bench_privacy_real_smoke"
    public = pd.read_csv(work / "public" / "labels.csv", dtype=str)
    private = pd.read_csv(work / "private" / "labels.csv", dtype=str)
    assert set(public["source"]) == {"nih"} and set(private["source"]) == {"hannover", "ieee8023", "kermany"}
    assert not set(public["patient_id"]) & set(private["patient_id"])
    assert all(str(p).startswith("/") and "shared/data/real-cxr" in p for p in private["path"])  # films stay in shared
    holds = sorted(h for site in result["within_site"].values() for h in site["holds"])
    assert holds == ["hannover", "ieee8023", "kermany"]
    dp = [r for r in result["rows"] if r["epsilon"]]
    assert [(r["epsilon"], r["unit"]) for r in dp] == [(8.0, "image")]  # smoke: per patient is privacy_finetune's
    assert all(r["within_target"] and 0 < max(r["epsilon_spent"].values()) <= 8 for r in dp)
    kermany = next(s for s in result["within_site"].values() if s["holds"] == ["kermany"])
    assert kermany["positives"] and kermany["negatives"]
    reference = kermany["models"]["no DP, all weights"]
    assert 0 <= reference["auroc"] <= 1 and reference["ci95"][0] <= reference["auroc"] <= reference["ci95"][1]
    assert set(result["primary_site_gap_to_non_private"]) == {r["label"] for r in dp}
    vs = kermany["models"][dp[0]["label"]]["vs_reference"]
    assert abs(vs["difference"] - (kermany["models"][dp[0]["label"]]["auroc"] - reference["auroc"])) < 1e-9
    assert (BENCH.parent / result["plot"]).is_file()


@pytest.mark.slow
@pytest.mark.bench
def test_real_cxr():
    """The real-images comparison on a small real subset: every model scored per site, paired differences."""
    result = run_smoke("real_cxr.py")
    nih = result["sites"]["site-2"]
    assert nih["holds"] == ["nih"]
    for name in ("federated teacher", "local site-2", "central (pooled)", "student (KD)", "student (no teacher)"):
        assert name in nih["models"]
    assert "local site-1" not in nih["models"]  # a site's local-only model is scored at its own site only
    fed_local = nih["federated_vs_local"]
    assert fed_local["ci95"][0] <= fed_local["ci95"][1] and -1 <= fed_local["difference"] <= 1
    assert result["edge"]["student_ms"] > 0 and result["edge"]["teacher_best"].endswith(".onnx")


@pytest.mark.slow
@pytest.mark.bench
def test_real_cxr_seeds():
    """The seed study on a small real subset: an adult site and a COVID one, two seeds; the COVID site is read by
    its sensitivities and by its deployed models on the adult site's pneumonia films."""
    result = run_smoke("real_cxr_seeds.py")
    assert [s["seed"] for s in result["seeds"]] == [0, 1]
    assert result["seeds"][1]["run"].endswith("_seed1") and result["seeds"][1]["seconds"]["teacher"] > 1  # trained
    for seed in result["seeds"]:
        covid, adult = seed["sites"]["site-1"], seed["sites"]["site-2"]
        assert covid["holds"] == ["hannover"] and adult["holds"] == ["nih"]
        assert covid["teacher"] is None and covid["one_class"]["positives"] > 0  # one-class: no AUROC there
        at = covid["adult_pneumonia_at"]
        assert at["site"] == "site-2" and 0 <= at["teacher"] <= 1 and 0 <= at["local"] <= 1
        assert abs(at["teacher_vs_local"]["difference"] - (at["teacher"] - at["local"])) < 1e-6
        d = adult["teacher_vs_local"]
        assert d["ci95"][0] <= d["ci95"][1] and abs(d["difference"] - (adult["teacher"] - adult["local"])) < 1e-6
    over = result["over_seeds"]
    assert over["site-1"]["reading"].startswith("adult pneumonia") and over["site-1"]["seeds"] == 2
    assert over["site-2"]["reading"] == "within-site AUROC"


def test_ood():
    """The OOD benchmark on a one-epoch tiny phantom model: every set scored, flagged rates and AUROCs in range."""
    result = run_smoke("ood.py")
    phantom = result["results"]["phantom"]
    fp32 = next(f for f in phantom["files"].values() if f["format"] == "onnx-fp32")
    sets = fp32["sets"]
    assert {"own test images", "natural photographs", "CT and MR slices", "inverted radiographs", "rotated 90°",
            "blank frames"} <= set(sets)
    assert sets["blank frames"]["flagged"] == 1.0  # blank frames are flagged by name whatever the score
    for name, row in sets.items():
        assert 0 <= row["flagged"] <= 1 and row["images"] > 0, name
        if name != "own test images":
            assert 0 <= row["mahalanobis_auroc"] <= 1 and 0 <= row["joint_energy_auroc"] <= 1, name
    assert (BENCH.parent / result["plot"]).is_file()


def test_cpu_precision():
    result = run_smoke("cpu_precision.py")
    row = result["rows"][0]
    assert row["fp32_images_per_s"] > 0 and row["bf16_images_per_s"] > 0
    assert result["auto_resolves_to"] in ("bf16-mixed", "32-true")
    assert [t["threads_per_site"] for t in result["site_threads"]][0] == 1
