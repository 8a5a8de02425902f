"""The typed artifacts (fedxr/artifacts.py): the export manifest, a federated run's summary and an evaluation's
metrics. Every reader goes through them, a renamed key fails there naming the file, the JSON on disk round-trips
unchanged (a file from before `schema_version` reads as version 1), and a newer layout is a clear error."""

from __future__ import annotations

import json
import re

import pytest

from fedxr.artifacts import (MANIFEST_FILE, MANIFEST_VERSION, ArtifactError, EvalResult, ExportManifest,
                             FederateSummary, ManifestError)

from helpers import ROOT

MANIFEST = {
    "checkpoint": "runs/q/federate/global_best.ckpt", "checkpoint_sha256": "ab" * 32, "model_name": "tiny_cnn",
    "trained_on": {"synthetic": True}, "target": "laptop", "input_shape": ["batch", 1, 32, 32], "input_size": 32,
    "validation_images": 40, "int8_decision": "INT8 dropped", "ok": True, "recommended": "m_fp32.onnx",
    "files": [{"file": "m_fp32.onnx", "format": "onnx-fp32", "val_auroc": 0.7, "latency_ms_b1_p50": 0.5, "kept": True,
               "parity_max_abs_logit": 1e-6, "size_bytes": 1000, "sha256": "cd" * 32, "opset": 17},
              {"file": "m_int8.onnx", "format": "onnx-int8-qdq", "val_auroc": 0.69, "latency_ms_b1_p50": 0.6,
               "kept": False, "speedup_vs_fp32": 0.8}],
    "runtime": {"onnx": "1"}, "trust": {"ood": {"threshold": 1.0}}, "model_card": "MODEL_CARD.md",
}


def test_a_manifest_reads_typed_and_round_trips(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(MANIFEST))
    m = ExportManifest.read(tmp_path)
    assert m.folder == tmp_path and m.ok and m.synthetic and m.input_size == 32
    assert m.recommended_file.file == "m_fp32.onnx" and m.recommended_file.size_bytes == 1000
    assert m.file("m_int8.onnx").kept is False and m.file("m_int8.onnx").extra == {"speedup_vs_fp32": 0.8}
    assert m.extra["runtime"] == {"onnx": "1"}
    assert m.schema_version == 1  # written before the field existed: the same layout, version 1
    assert m.to_json() == {**MANIFEST, "schema_version": 1}  # nothing lost or renamed on the way through
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(m.to_json()))
    assert ExportManifest.read(tmp_path) == m


def test_a_manifest_from_a_newer_fedxr_says_so(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({**MANIFEST, "schema_version": MANIFEST_VERSION + 1}))
    with pytest.raises(ManifestError, match=f"layout version {MANIFEST_VERSION + 1}.*reads up to version "
                                            f"{MANIFEST_VERSION}.*upgrade fedxr"):
        ExportManifest.read(tmp_path)


SUMMARY = {"workspace": "/w", "server_run": "/w/server/simulate_job", "tensorboard": "/w/tb", "env": "sim",
           "checkpoints": {"global_best": "f/global_best.ckpt", "global_last": "f/global_last.ckpt"},
           "checkpoint": "f/global_best.ckpt", "rounds": "f/rounds.json", "wall_s": 12.5,
           "selection": {"chosen": "global (best)"}, "privacy": "f/privacy.json"}
METRICS = {"checkpoint": "c.ckpt", "model_name": "tiny_cnn", "image_size": 32, "split": "test", "data": "sites",
           "images": 40, "macro_auroc": 0.71, "macro_auroc_ci95": [0.6, 0.8], "auroc": {"Effusion": 0.71, "Mass": None},
           "ap": {"Effusion": 0.5, "Mass": None}, "counted": ["Effusion"], "min_positives": 10, "note": None,
           "macro_auroc_all": 0.7, "macro_ap": 0.5, "positives": {"Effusion": 12, "Mass": 0},
           "known": {"Effusion": 40, "Mass": 40}, "unknown": [],
           "prevalence": {"Effusion": 0.3, "Mass": 0.0}, "excluded": ["Mass"],
           "bootstrap": {"resamples": 1000, "seed": 0, "unit": "image"},
           "at_thresholds": {"Effusion": {"threshold": 0.5, "sensitivity": 0.6, "specificity": 0.7, "positives": 12}}}


@pytest.mark.parametrize("cls, data", [(FederateSummary, SUMMARY), (EvalResult, METRICS)])
def test_run_artifacts_read_typed_and_round_trip(tmp_path, cls, data):
    (tmp_path / cls.FILE).write_text(json.dumps({**data, "written_by": "a later fedxr"}))
    read = cls.read(tmp_path)
    assert read.checkpoint == data["checkpoint"] and read.extra == {"written_by": "a later fedxr"}
    assert read.to_json() == {**data, "written_by": "a later fedxr", "schema_version": 1}
    assert cls.read(tmp_path / cls.FILE) == read


@pytest.mark.parametrize("cls, data, drop", [(FederateSummary, SUMMARY, "checkpoint"), (EvalResult, METRICS, "auroc")])
def test_run_artifacts_without_what_readers_need_name_the_file(tmp_path, cls, data, drop):
    with pytest.raises(ArtifactError, match=f"{cls.FILE}: no "):
        cls.read(tmp_path)
    (tmp_path / cls.FILE).write_text(json.dumps({k: v for k, v in data.items() if k != drop}))
    with pytest.raises(ArtifactError, match=f"{re.escape(str(tmp_path / cls.FILE))}: not a .*lacks {drop}"):
        cls.read(tmp_path)
    (tmp_path / cls.FILE).write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ArtifactError, match="layout version 99"):
        cls.read(tmp_path)
    (tmp_path / cls.FILE).write_text("[1, 2")
    with pytest.raises(ArtifactError, match="cannot be read"):
        cls.read(tmp_path)


def test_run_artifacts_from_before_their_newer_fields_still_read(tmp_path):
    """summary.json before env / wall_s were written, metrics.json before counted / image_size: read, with None."""
    old_summary = {k: v for k, v in SUMMARY.items() if k not in ("env", "wall_s")}
    (tmp_path / FederateSummary.FILE).write_text(json.dumps(old_summary))
    read = FederateSummary.read(tmp_path)
    assert read.env is None and read.wall_s is None and read.checkpoint == SUMMARY["checkpoint"]
    old_metrics = {k: v for k, v in METRICS.items() if k not in ("counted", "image_size")}
    (tmp_path / EvalResult.FILE).write_text(json.dumps(old_metrics))
    m = EvalResult.read(tmp_path)
    assert m.counted is None and m.image_size is None and m.macro_auroc == METRICS["macro_auroc"]


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.pop("recommended"), "not an export manifest .*'recommended'"),
    (lambda d: d.update(files="m_fp32.onnx"), "not an export manifest"),
    (lambda d: d.update(recommended="gone.onnx"), "recommends 'gone.onnx', which its files do not list"),
    (lambda d: d["files"][0].pop("format"), "a file entry is not one fedxr wrote"),
    (lambda d: d["files"].append("x.onnx"), "a file entry is str, not an object"),
])
def test_a_manifest_without_what_readers_need_names_the_file(tmp_path, change, expected):
    data = json.loads(json.dumps(MANIFEST))
    change(data)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=expected) as err:
        _ = ExportManifest.read(tmp_path).recommended_file
    assert str(tmp_path / MANIFEST_FILE) in str(err.value)


def test_missing_and_unreadable_manifests_say_what_to_do(tmp_path):
    with pytest.raises(ManifestError, match="no export manifest here; export the model"):
        ExportManifest.read(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"files": [')
    with pytest.raises(ManifestError, match="cannot be read .*copy the export folder again"):
        ExportManifest.read(tmp_path)


def test_the_console_lists_good_exports_and_skips_a_malformed_one(tmp_path):
    from fedxr.console.data import list_models

    for name, files in (("good_model", MANIFEST["files"]), ("bad_model", ["m_fp32.onnx"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST_FILE).write_text(json.dumps({**MANIFEST, "files": files}))
    (tmp_path / "good_model" / "m_fp32.onnx").write_bytes(b"x")
    listed = list_models(tmp_path)
    assert [m["folder"] for m in listed] == ["good_model"]
    rows = {f["file"]: f for f in listed[0]["files"]}
    assert rows["m_fp32.onnx"]["available"] and not rows["m_int8.onnx"]["available"]
    assert rows["m_int8.onnx"]["size_bytes"] is None  # every field present for the template, None where absent


def test_only_the_schema_and_the_exporter_read_manifest_keys_by_string():
    """The readers (pipeline, report, energy, edge, console, model card) use ExportManifest's fields."""
    by_key = re.compile(r"""\[["'](recommended|files)["']\]|\.get\(["'](recommended|files)["']""")
    allowed = {"fedxr/artifacts.py", "fedxr/export/exporter.py"}
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "fedxr").rglob("*.py")
                 if str(p.relative_to(ROOT)) not in allowed and by_key.search(p.read_text())]
    assert offenders == []
