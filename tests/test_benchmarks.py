"""Each benchmark runs once in --smoke mode: proof that it still works, not a timing test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["data_loading.py", "phantom_difficulty.py", "train_throughput.py", "federated_overhead.py", "edge_latency.py",
                                    "federated_accuracy.py", "distill_gain.py"])
def test_benchmark_smoke(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((BENCH / "results" / script.replace(".py", ".smoke.json")).read_text())
    assert result["machine"]["cpu_count"] >= 1
    if script == "data_loading.py":
        assert result["png_images_per_s"] > 0 and result["cache_images_per_s"] > 0
    elif script == "phantom_difficulty.py":
        assert [c["patients"] for c in result["learning_curve"]] == [16, 32]
        assert all(c["train_images"] > 0 and len(c["auroc"]) == 14 for c in result["learning_curve"])
        assert 0 < result["hospital"]["patients_one_hospital"] < result["hospital"]["patients_pooled"]
    elif script == "train_throughput.py":
        assert all(r["images_per_s"] > 0 and r["timed_steps"] > 0 for r in result["results"])
        assert result["loader_images_per_s"] > 0
        assert result["from_png"][0]["data"] == "png" and result["from_png"][0]["images_per_s"] > 0
        fl = result["in_nvflare"][0]
        assert fl["images_per_s"] > 0 and fl["rounds"] and fl["overhead_pct"] < 100
    elif script == "federated_overhead.py":
        r = result["results"][0]
        assert r["bytes_per_round"] == 4 * r["model_bytes"] > 0 and r["rounds"]
        assert all(x["wall_s"] > 0 and x["site_work_s"] > 0 for x in r["rounds"])
    elif script == "federated_accuracy.py":
        row = result["table"]["iid"]
        assert set(row) == {"central", "fedavg", "local"}
        assert len(row["local"]["runs"][0]["per_model"]) == 2
        assert len(row["central"]["runs"][0]["per_model"]) == 1
        assert all(0 <= v <= 1 for r in row.values() for v in r["per_seed"] if v is not None)
        assert row["central"]["per_seed"] == [row["central"]["macro_auroc"]]
    elif script == "distill_gain.py":
        assert [r["seed"] for r in result["rows"]] == [0, 1]
        assert all(r["kd_gain"] == pytest.approx(r["kd"] - r["no_kd"]) for r in result["rows"])
        assert result["summary"]["kd_gain"]["sd"] is not None
        assert all(lo <= hi for lo, hi in (r["kd_gain_ci95"] for r in result["rows"]))
    elif script == "edge_latency.py":
        formats = {row["format"] for row in result["rows"]}
        assert formats == {"pytorch-eager", "onnx-fp32", "onnx-int8"}
        assert all(row["p50_ms"] > 0 and row["p50_ms"] <= row["p95_ms"] for row in result["rows"])
        assert result["goals"]["student_onnx_vs_eager_b1"] > 0
        assert result["matmul_peak_gflops"]["1"] > 0 and all(r["gflops"] > 0 and r["share_of_peak"] > 0 for r in result["rows"])
