"""Energy tracking: a tracked block writes its figures (or why there are none) and never fails the work."""

import json
import time

import pytest

pytest.importorskip("codecarbon")

from fedxr import energy  # noqa: E402


def busy(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        sum(i * i for i in range(5000))


def test_tracked_block_writes_positive_figures_that_add_up(tmp_path):
    with energy.tracked(tmp_path, "job", "DEU"):
        busy(1.5)
    record = json.loads((tmp_path / "energy.json").read_text())
    assert record["energy_wh"] > 0
    assert record["emissions_g"] > 0
    assert record["energy_wh"] == pytest.approx(record["cpu_wh"] + record["gpu_wh"] + record["ram_wh"], rel=1e-6)
    assert record["seconds"] >= 1.5
    assert record["country"] == "DEU"
    assert set(record["methods"]) == {"cpu", "gpu", "ram"}
    assert "warning" not in record


def test_unknown_grid_and_a_failing_tracker_never_fail_the_work(tmp_path, monkeypatch):
    ran = []
    with energy.tracked(tmp_path / "a", "job", "ZZZ"):
        ran.append(1)
    assert "world average" in json.loads((tmp_path / "a" / "energy.json").read_text())["warning"]
    import codecarbon

    def broken(*args, **kwargs):
        raise PermissionError("no access to the power counters")

    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", broken)
    with energy.tracked(tmp_path / "b", "job", "USA"):
        ran.append(2)
    record = json.loads((tmp_path / "b" / "energy.json").read_text())
    assert ran == [1, 2]
    assert "no access to the power counters" in record["error"]
    assert "energy_wh" not in record


def test_off_means_no_file(tmp_path):
    with energy.tracked(tmp_path, "job", None):
        pass
    assert not (tmp_path / "energy.json").exists()


def test_edge_estimate_and_break_even(tmp_path):
    assert energy.edge_energy_per_image_j(20.0, 1, 5.0) == pytest.approx(0.1)
    manifests = {}
    for label, ms in (("teacher t", 10.0), ("student s", 1.0)):
        path = tmp_path / f"{label.split()[1]}.json"
        path.write_text(json.dumps({"recommended": "m.onnx", "files": [{"file": "m.onnx", "format": "onnx-fp32",
                                                                            "latency_ms_b1_p50": ms}]}))
        manifests[label] = str(path)
    edge = energy.edge_comparison(manifests, 3.6, training_wh=9.0)
    per = edge["per_1000_predictions"]
    assert per["teacher t"]["wh_per_1000"] == pytest.approx(10e-3 * 3.6 * 1000 / 3600)
    # (0.01 - 0.001) Wh saved per 1,000 predictions → 9 Wh of training repaid after 1,000,000 predictions
    assert per["student s"]["break_even_predictions"] == 1_000_000
