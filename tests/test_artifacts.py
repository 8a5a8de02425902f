"""The typed export manifest (fedxr/artifacts.py): every reader goes through it, a renamed key fails there
naming the file, and the JSON on disk round-trips unchanged."""

from __future__ import annotations

import json
import re

import pytest

from fedxr.artifacts import MANIFEST_FILE, ExportManifest, ManifestError

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
    assert m.to_json() == MANIFEST  # nothing lost or renamed on the way through


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
