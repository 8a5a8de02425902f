"""Each benchmark runs once in --smoke mode: proof that it still works, not a timing test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["data_loading.py", "phantom_difficulty.py", "train_throughput.py", "federated_overhead.py", "edge_latency.py"])
def test_benchmark_smoke(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((BENCH / "results" / script.replace(".py", ".smoke.json")).read_text())
    assert result["machine"]["cpu_count"] >= 1
    if script == "data_loading.py":
        assert result["png_images_per_s"] > 0 and result["cache_images_per_s"] > 0
