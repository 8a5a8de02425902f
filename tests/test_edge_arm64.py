"""Opt-in (`pytest -m arm64`, root, minutes): the edge runtime on an emulated arm64 Debian computes the
same probabilities as this machine, for every export target's files, on the real NIH PNGs and a DICOM."""

import json
import subprocess
import sys

import pytest

from fedxr.cli import main as fedxr_main

from helpers import QUICKSTART, ROOT, needs_shared, tiny_recipe_overrides

pytestmark = [pytest.mark.arm64, pytest.mark.timeout(3600)]


@needs_shared
def test_arm64_predictions_match_x86(tmp_path):
    ov = tiny_recipe_overrides(tmp_path, patients=80)
    assert fedxr_main(["data", "prepare", str(QUICKSTART), *ov]) == 0
    assert fedxr_main(["train", str(QUICKSTART), *ov]) == 0
    ckpt = tmp_path / "runs" / "t" / "train_central" / "best.ckpt"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "edge_arm64.py"), "--checkpoint", str(ckpt),
                           "--data", str(tmp_path / "runs" / "t" / "sites"), "--smoke"],
                          capture_output=True, text=True, timeout=3500)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((ROOT / "benchmarks" / "results" / "edge_arm64.smoke.json").read_text())
    assert result["ok"] and result["checkpoint"] == str(ckpt)
    assert result["arm64"]["machine"] == "aarch64"
    for package in ("onnxruntime", "numpy", "Pillow", "pydicom"):
        assert result["arm64"][package] == result["host"][package]  # the same library versions on both
    assert any(name.endswith(".dcm") for name in result["inputs"]) and any(n.endswith(".png") for n in result["inputs"])
    files = {row["file"] for row in result["rows"]}
    assert {f.split("/")[0] for f in files} == {"laptop", "board", "mobile"}
    assert any(f.endswith(".ort") for f in files)
    assert {row["cpu"] for row in result["rows"]} == {"cortex-a76", "cortex-a53"}
    for row in result["rows"]:
        assert row["passed"] and not row["problems"] and row["max_abs_probability_difference"] <= 1e-4, row
    # The comparison is able to see a difference: FP32 and INT8 answers on the same core differ.
    assert all(d > 1e-4 for d in result["control_fp32_vs_int8_max_abs_difference"].values())
    assert "not measured" in result["latency"]
