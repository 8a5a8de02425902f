"""python -m fedxr.export and the torch-free runtime fedxr.edge, on a real (tiny) trained checkpoint."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from PIL import Image

from fedxr.cli import main as fedxr_main
from fedxr.edge import ModelMetadataError, load_model
from fedxr.edge.cli import main as edge_main
from fedxr.errors import EXIT_CHECK_FAILED, FedxrError
from fedxr.export.__main__ import main as export_main

from helpers import GRADIENT, QUICKSTART, ROOT, SHARED_NIH, needs_shared, tiny_recipe_overrides, write_dicom


#: What every export writes beside its model files (fedxr.trust): the model card and its two plots.
TRUST_FILES = ("MODEL_CARD.md", "ood_scores.png", "reliability.png")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    ov = tiny_recipe_overrides(tmp, patients=80)
    assert fedxr_main(["data", "prepare", str(QUICKSTART), *ov]) == 0
    assert fedxr_main(["train", str(QUICKSTART), *ov]) == 0
    ckpt = tmp / "runs" / "t" / "train_central" / "best.ckpt"
    out = tmp / "export"
    assert export_main([str(ckpt), "--out", str(out), "--int8", "on", "--data", str(tmp / "runs" / "t" / "sites")]) == 0
    return tmp, ckpt, out


def test_export_files_metadata_and_manifest(exported):
    tmp, ckpt, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ok"]
    assert {f["format"] for f in manifest["files"]} == {"onnx-fp32", "onnx-int8-qdq"}
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "manifest.json", "ood_scores.png", "reliability.png",
                                                     "tiny_cnn_fp32.onnx", "tiny_cnn_int8.onnx"]  # no side files
    fp32 = next(f for f in manifest["files"] if f["format"] == "onnx-fp32")
    assert fp32["parity_max_abs_logit"] <= 1e-4
    assert fp32["parity_ok"]
    import hashlib

    for f in manifest["files"]:
        path = out / f["file"]
        assert f["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert f["size_bytes"] == path.stat().st_size
        assert f["opset"] == 18
        assert f["latency_ms_b1_p50"] > 0
        assert 0 <= f["val_auroc"] <= 1
    assert set(manifest["runtime"]) >= {"onnx", "onnxruntime", "torch"}
    model = onnx.load(str(out / "tiny_cnn_fp32.onnx"))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: json.loads(p.value) for p in model.metadata_props if p.key.startswith("fedxr.")}
    assert props["fedxr.labels"][0] == "Atelectasis"
    assert len(props["fedxr.thresholds"]) == 14
    assert props["fedxr.input_size"] == 32
    assert props["fedxr.model_name"] == "tiny_cnn"
    assert props["fedxr.checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert "resize" in props["fedxr.preprocessing"]
    assert props["fedxr.val_auroc"] == fp32["val_auroc"]
    # Trust: the thresholds are the operating points', the calibration and OOD check travel in the file.
    assert props["fedxr.thresholds"] == [p["threshold"] for p in props["fedxr.operating_points"]]
    assert len(props["fedxr.calibration"]["a"]) == 14 and props["fedxr.calibration"]["method"] == "platt"
    assert props["fedxr.ood"]["output"] == "ood_score" and props["fedxr.ood"]["threshold"] > 0
    assert [o.name for o in model.graph.output] == ["logits", "ood_score"]
    assert fp32["parity_ood_max_rel"] <= 1e-3
    int8 = next(f for f in manifest["files"] if f["format"] == "onnx-int8-qdq")
    assert 0 <= int8["ood_flag_agreement"] <= 1
    assert manifest["model_card"] == "MODEL_CARD.md" and manifest["trust"]["ood"]["threshold"] == props["fedxr.ood"]["threshold"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [1, 32, 32]


def test_int8_auto_records_its_decision(exported, tmp_path):
    tmp, ckpt, _ = exported
    assert export_main([str(ckpt), "--out", str(tmp_path / "auto"), "--data", str(tmp / "runs" / "t" / "sites")]) == 0
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    q = next(f for f in manifest["files"] if f["format"] == "onnx-int8-qdq")
    assert "faster than FP32" in manifest["int8_decision"]
    assert "AUROC" in manifest["int8_decision"]
    # The decision's speed-up is the two files' latencies as the manifest records them (timed side by side).
    fp32 = next(f for f in manifest["files"] if f["format"] == "onnx-fp32")
    assert q["speedup_vs_fp32"] == pytest.approx(fp32["latency_ms_b1_p50"] / q["latency_ms_b1_p50"], rel=0.02)
    assert (tmp_path / "auto" / q["file"]).exists() == q["kept"]


def test_export_rejects_a_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert export_main([str(bad), "--out", str(tmp_path / "x")]) == 1
    assert "bad.ckpt: not a readable fedxr checkpoint" in capsys.readouterr().err


def test_edge_preprocessing_is_the_training_cache_byte_for_byte(exported):
    from fedxr.data.cache import build_cache

    tmp, _, out = exported
    images = sorted((tmp / "phantom" / "images").glob("*.png"))[:5]
    cache = build_cache(images, 32, tmp / "cache2", progress=False)
    model = load_model(out / "tiny_cnn_fp32.onnx")
    for row, path in zip(cache, images):
        assert model.preprocess(path).tobytes() == np.asarray(row).tobytes()


@needs_shared
def test_predict_formats_and_bad_inputs(exported, tmp_path, capsys):
    _, _, out = exported
    real = SHARED_NIH / "00000001_000.png"
    Image.open(real).convert("RGB").save(tmp_path / "photo.jpg")           # a colour photo: converted, works
    Image.fromarray((GRADIENT.astype(np.uint16) * 257)).save(tmp_path / "sixteen.png")
    write_dicom(tmp_path / "study.dcm", GRADIENT.astype(np.uint16) * 16, photometric="MONOCHROME1", window=(2000, 1000))
    (tmp_path / "notes.png").write_text("this is text, not an image")
    (tmp_path / "cut.png").write_bytes(real.read_bytes()[:200])
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    nopix = FileDataset(str(tmp_path / "nopixels.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    nopix.Modality = "DX"
    nopix.save_as(str(tmp_path / "nopixels.dcm"), enforce_file_format=True)
    assert pydicom.dcmread(str(tmp_path / "nopixels.dcm")).Modality == "DX"

    rc = edge_main(["predict", str(out), str(real), str(tmp_path), "--json"])
    assert rc == EXIT_CHECK_FAILED  # some inputs failed, the rest were processed
    results = {r["input"].split("/")[-1]: r for r in json.loads(capsys.readouterr().out)}
    for good in ("00000001_000.png", "photo.jpg", "sixteen.png", "study.dcm"):
        assert results[good]["error"] is None, good
        assert len(results[good]["probabilities"]) == 14, good
        # A model trained on the phantom says so beside every prediction.
        assert results[good]["warning"] == "trained on synthetic data — not for diagnosis", good
    assert "notes.png" in results["notes.png"]["error"]
    assert "cut.png" in results["cut.png"]["error"]
    assert "nopixels.dcm: not a readable DICOM" in results["nopixels.dcm"]["error"]
    assert edge_main(["predict", str(out), str(real), "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("input,error,in_distribution,ood_score,Atelectasis")


def test_a_changed_or_truncated_model_file_is_refused_before_it_loads(exported, tmp_path, capsys):
    """The export manifest's size and SHA-256 are checked before a listed file is loaded; --no-verify skips it."""
    import shutil

    from fedxr.edge.model import ModelIntegrityError

    _, _, out = exported
    assert load_model(out).verified
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(load_model(out).path, alone)
    assert not load_model(alone).verified  # no manifest beside it: nothing to check against
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    name = load_model(folder).path.name
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])  # a copy cut short (a full disk, a transfer cut off)
    with pytest.raises(ModelIntegrityError, match=rf"{name}: {len(data) // 2:,} bytes, but manifest.json lists {len(data):,}"):
        load_model(folder)
    assert edge_main(["predict", str(folder), str(tmp_path / "x.png")]) == 1
    assert "--no-verify" in capsys.readouterr().err
    # Same size, one byte changed inside the weights: onnxruntime would load it and predict from other weights.
    changed = bytearray(data)
    changed[len(data) // 2] ^= 0xFF
    (folder / name).write_bytes(bytes(changed))
    with pytest.raises(ModelIntegrityError, match=f"{name}: its SHA-256 differs from the one manifest.json lists"):
        load_model(folder)
    assert not load_model(folder, verify=False).verified
    Image.fromarray(GRADIENT).save(tmp_path / "x.png")
    assert edge_main(["predict", str(folder), str(tmp_path / "x.png"), "--no-verify", "--json"]) == 0
    manifest = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(manifest[: len(manifest) // 2])
    with pytest.raises(ModelIntegrityError, match="manifest.json: the export manifest cannot be read"):
        load_model(folder)


def test_model_errors(exported, tmp_path, capsys):
    import torch

    from fedxr.models.registry import build_model

    _, _, out = exported
    assert edge_main(["predict", str(tmp_path / "nowhere"), "x.png"]) == 1
    assert "model not found" in capsys.readouterr().err
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(build_model("tiny_cnn").eval(), (torch.zeros(1, 1, 32, 32),), str(plain), dynamo=True, external_data=False)
    with pytest.raises(ModelMetadataError, match="not a fedxr model.*--labels"):
        load_model(plain)
    names = ",".join(f"L{i}" for i in range(14))
    Image.fromarray(GRADIENT).save(tmp_path / "g.png")
    capsys.readouterr()  # the exporter's own progress lines
    assert edge_main(["predict", str(plain), str(tmp_path / "g.png"), "--labels", names, "--json"]) == 0
    assert "L0" in json.loads(capsys.readouterr().out)[0]["probabilities"]
    model = load_model(out)
    with pytest.raises(FedxrError, match=r"model input must be \(N, 1, 32, 32\)"):
        model.logits(np.zeros((1, 1, 64, 64), np.float32))


def test_edge_cli_runs_where_importing_torch_fails(exported, tmp_path):
    _, _, out = exported
    Image.fromarray(GRADIENT).save(tmp_path / "g.png")
    code = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is not available on this edge device")
        sys.meta_path.insert(0, NoTorch())
        from fedxr.edge.cli import main
        rc = main(["predict", {str(out)!r}, {str(tmp_path / 'g.png')!r}, "--json"])
        assert "torch" not in sys.modules
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)[0]["probabilities"]) == 14


@pytest.mark.slow
def test_plain_pip_install_runs_predict(exported, tmp_path):
    """`pip install .` with no extras is enough for fedxr.edge and for `fedxr --help/--version`, never
    installs torch, and a training command says which extra it needs."""
    _, _, out = exported
    image = SHARED_NIH / "00000001_000.png"
    if not image.is_file():  # the real NIH image when the shared folder is there, else a ramp
        image = tmp_path / "ramp.png"
        Image.fromarray(GRADIENT).save(image)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                          capture_output=True, text=True)
    assert proc.stdout.strip() == "True"
    proc = subprocess.run([str(py), "-m", "fedxr.edge", "predict", str(out), str(image), "--json"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)[0]["probabilities"]) == 14
    fedxr = venv / "bin" / "fedxr"
    proc = subprocess.run([str(fedxr), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "export" in proc.stdout
    proc = subprocess.run([str(fedxr), "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("fedxr ")
    proc = subprocess.run([str(fedxr), "check", str(ROOT / "recipes" / "quickstart.yaml")], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert "pip install 'fedxr[train]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_reports_latency_memory_and_provider(exported, capsys):
    _, _, out = exported
    assert edge_main(["bench", str(out), "--threads", "1", "--batch", "2", "--runs", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["provider"] == "CPUExecutionProvider"
    assert r["batch"] == 2
    assert 0 < r["p50_ms"] <= r["p95_ms"]
    assert r["images_per_s"] > 0
    assert r["peak_rss_mb"] > 0
    # 1 thread x 10 W (assumed) x p50 / 2 images per batch, in mJ
    assert r["energy_mj_per_image_estimate"] == pytest.approx(10 * r["p50_ms"] / 2, rel=0.05)
    assert "estimate" in r["energy_basis"]


def test_fp16_export(exported, tmp_path):
    tmp, ckpt, _ = exported
    assert export_main([str(ckpt), "--out", str(tmp_path / "h"), "--int8", "off", "--fp16",
                        "--data", str(tmp / "runs" / "t" / "sites")]) == 0
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    h = next(f for f in manifest["files"] if f["format"] == "onnx-fp16")
    assert h["parity_ok"]
    assert h["parity_max_abs_logit"] <= h["parity_tolerance"]
    props = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "h" / h["file"])).metadata_props}
    assert props["fedxr.format"] == "onnx-fp16"  # its own metadata, not the FP32 file's it was converted from
    assert props["fedxr.val_auroc"] == h["val_auroc"]
    assert ((tmp_path / "h" / h["file"]).stat().st_size < \
        (tmp_path / "h" / "tiny_cnn_fp32.onnx").stat().st_size)
    assert len(load_model(tmp_path / "h" / h["file"]).predict([GRADIENT])[0].probabilities) == 14


def test_preprocessing_travels_from_recipe_to_the_edge(exported, tmp_path):
    """Resolved once from the recipe, the preprocessing is read back from the checkpoint and from the
    ONNX file, and each export uses the checkpoint's values, not the registry's."""
    from fedxr.config import load_recipe
    from fedxr.models.checkpoint import load_checkpoint
    from fedxr.preprocessing import Preprocessing

    tmp, ckpt, out = exported
    recipe = load_recipe(QUICKSTART, tiny_recipe_overrides(tmp, patients=80))
    assert recipe.preprocessing == Preprocessing(32, 0.5, 0.25)  # data.image_size with tiny_cnn's normalisation
    assert load_checkpoint(ckpt)["preprocessing"] == recipe.preprocessing
    assert load_model(out).preprocessing == recipe.preprocessing
    # A checkpoint saying something else is exported with what it says.
    import torch

    blob = torch.load(ckpt, weights_only=True)
    blob["preprocessing"] = {"size": 32, "mean": 0.4, "std": 0.3}
    odd = tmp_path / "odd.ckpt"
    torch.save(blob, odd)
    assert fedxr_main(["export", str(odd), "--out", str(tmp_path / "odd"), "--int8", "off",
                       "--data", str(tmp / "runs" / "t" / "sites")]) == 0
    assert load_model(tmp_path / "odd").preprocessing == Preprocessing(32, 0.4, 0.3)


def test_version_1_checkpoints_still_load(exported, tmp_path):
    import torch

    from fedxr.models.checkpoint import load_checkpoint
    from fedxr.preprocessing import Preprocessing

    _, ckpt, _ = exported
    blob = torch.load(ckpt, weights_only=True)
    prep = blob.pop("preprocessing")
    blob.update(format="fedxr-checkpoint-v1", image_size=prep["size"], mean=prep["mean"], std=prep["std"])
    torch.save(blob, tmp_path / "v1.ckpt")
    assert load_checkpoint(tmp_path / "v1.ckpt")["preprocessing"] == Preprocessing(**prep)


def test_export_subcommand_and_module_share_one_command(exported, tmp_path, capsys):
    """`fedxr export` and `python -m fedxr.export` are the same command, with the same errors and exit codes."""
    tmp, ckpt, _ = exported
    data = str(tmp / "runs" / "t" / "sites")
    for main, name in ((fedxr_main, "sub"), (export_main, "module")):
        prefix = ["export"] if main is fedxr_main else []
        assert main([*prefix, str(ckpt), "--out", str(tmp_path / name), "--int8", "off", "--data", data]) == 0
        assert (tmp_path / name / "tiny_cnn_fp32.onnx").is_file()
        capsys.readouterr()
        assert main([*prefix, str(tmp_path / "missing.ckpt")]) == 1
        assert "missing.ckpt: checkpoint not found" in capsys.readouterr().err
        # A parity tolerance no export can meet: the files are written, the command says the check failed.
        assert main([*prefix, str(ckpt), "--out", str(tmp_path / f"{name}_strict"), "--int8", "off", "--data", data,
                     "--parity-tolerance", "1e-30"]) == EXIT_CHECK_FAILED
        assert "CHECK FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["board", "mobile"])
def test_board_and_mobile_targets(exported, tmp_path, capsys, target):
    """Fixed 1x1xHxW input, ORT format files with the operators config, every file carrying the fedxr
    metadata, passing parity and loading in fedxr.edge with the same findings; mobile adds the usability
    checker's verdicts."""
    import onnxruntime as ort

    tmp, ckpt, _ = exported
    out = tmp_path / target
    assert export_main([str(ckpt), "--target", target, "--out", str(out), "--int8", "on",
                        "--data", str(tmp / "runs" / "t" / "sites")]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ok"] and manifest["target"] == target and manifest["input_shape"] == [1, 1, 32, 32]
    formats = {f["format"]: f for f in manifest["files"]}
    assert set(formats) == {"onnx-fp32", "onnx-int8-qdq", "ort-fp32", "ort-int8-qdq"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "required_operators.config", *TRUST_FILES, *(f["file"] for f in manifest["files"])])
    assert "not measured on ARM" in manifest["int8_decision"]  # this machine is x86: INT8 kept on accuracy only
    assert manifest["recommended"] == formats["ort-fp32"]["file"]
    ops = (out / "required_operators.config").read_text()
    assert "ai.onnx" in ops and "Conv" in ops
    assert manifest["operators_config"]["operators"] and "required_operators.config" in printed
    for f in manifest["files"]:
        if "parity_ok" in f:
            assert f["parity_ok"] and f["parity_max_abs_logit"] <= f["parity_tolerance"], f
    assert all(formats[k]["parity_ok"] for k in ("onnx-fp32", "ort-fp32", "ort-int8-qdq"))
    predictions = {}
    for f in manifest["files"]:
        path = out / f["file"]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].shape == [1, 1, 32, 32], f["file"]  # no dynamic axis left
        meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items() if k.startswith("fedxr.")}
        assert meta["fedxr.format"] == f["format"] and meta["fedxr.labels"][0] == "Atelectasis"
        assert meta["fedxr.checkpoint_sha256"] == manifest["checkpoint_sha256"]
        model = load_model(path)
        assert model.fixed_batch == 1
        # Five inputs in batches of 4 on a batch-1 model: sliced, order kept.
        rows = model.predict([GRADIENT, GRADIENT[:, ::-1].copy(), GRADIENT.T.copy(), GRADIENT, 255 - GRADIENT], batch_size=4)
        predictions[f["format"]] = np.array([[r.probabilities[l] for l in model.labels] for r in rows])
    assert np.abs(predictions["onnx-fp32"] - predictions["ort-fp32"]).max() <= 1e-4
    assert np.abs(predictions["onnx-fp32"][0] - predictions["onnx-fp32"][3]).max() == 0  # same image, same answer
    assert np.abs(predictions["onnx-fp32"][0] - predictions["onnx-fp32"][1]).max() > 0
    assert load_model(out).path.name == manifest["recommended"]
    if target == "mobile":
        usability = manifest["mobile_usability"]
        assert set(usability) == {formats["onnx-fp32"]["file"], formats["onnx-int8-qdq"]["file"]}
        nnapi = usability[formats["onnx-fp32"]["file"]]["eps"]["NNAPI"]
        assert usability[formats["onnx-fp32"]["file"]]["dynamic_inputs"] == []
        assert 0 < nnapi["supported_nodes"] <= nnapi["nodes"] and nnapi["verdict"] in ("YES", "MAYBE", "NO")
        assert nnapi["unsupported_for_dynamic_shape"] == 0
        assert "NNAPI" in printed and "CoreML MLProgram" in printed
    else:
        assert "mobile_usability" not in manifest


def test_laptop_export_has_a_dynamic_batch_and_no_ort_files(exported):
    _, _, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "laptop" and manifest["input_shape"] == ["batch", 1, 32, 32]
    assert not list(out.glob("*.ort")) and not (out / "required_operators.config").exists()
    assert load_model(out).fixed_batch is None


def test_predict_streams_in_order_with_bounded_read_ahead(exported, tmp_path):
    """Decoding runs in worker threads ahead of the model, but never more than batch + 2 x workers images
    ahead, whatever the folder's length; results come in input order, unreadable inputs in their place."""
    _, _, out = exported
    model = load_model(out)
    for i in range(12):
        Image.fromarray(np.roll(GRADIENT, 3 * i, axis=1)).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "05.png").write_text("broken")
    paths = [str(tmp_path / f"{i:02d}.png") for i in range(12)]
    pulled = []

    def source():
        for p in paths:
            pulled.append(p)
            yield p

    stream = model.predict_iter(source(), batch_size=2, workers=2)
    first = next(stream)
    assert first.input == paths[0] and first.error is None
    assert len(pulled) <= 2 + 2 * 2 + 1  # the read-ahead window, not the whole folder
    rest = list(stream)
    results = [first, *rest]
    assert [r.input for r in results] == paths
    assert results[5].error and "05.png" in results[5].error
    serial = model.predict(paths, batch_size=1, workers=1)
    for a, b in zip(results, serial):
        assert a.probabilities == b.probabilities and a.error == b.error


def test_reexport_into_the_same_folder_leaves_no_stale_files(exported, tmp_path):
    tmp, ckpt, _ = exported
    out, data = tmp_path / "same", str(tmp / "runs" / "t" / "sites")
    assert export_main([str(ckpt), "--target", "board", "--out", str(out), "--int8", "on", "--data", data]) == 0
    assert list(out.glob("*.ort")) and (out / "required_operators.config").exists()
    (out / "notes.txt").write_text("the user's own file")
    (out / "tiny_cnn_quarter_fp32.onnx").write_bytes(b"another model's file, whose name starts the same")
    assert export_main([str(ckpt), "--out", str(out), "--int8", "off", "--data", data]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "notes.txt", "tiny_cnn_fp32.onnx",
                                                            "tiny_cnn_quarter_fp32.onnx", *TRUST_FILES])


def test_ood_score_is_the_same_in_pytorch_and_onnx(exported):
    """The exported graph's OOD output equals the PyTorch ScoredNetwork refitted from the same data (the fit is
    deterministic), and the INT8 file keeps the OOD head in float."""
    import torch

    from fedxr.models.checkpoint import model_from_checkpoint
    from fedxr.trust.fit import fit_trust
    from fedxr.trust.ood import ScoredNetwork

    tmp, ckpt, out = exported
    net, ck = model_from_checkpoint(ckpt)
    trust = fit_trust(net, ck, tmp / "runs" / "t" / "sites", progress=False)
    scored = ScoredNetwork(net, trust["ood"]).eval()
    images = sorted((tmp / "phantom" / "images").glob("*.png"))[:12]
    fp32 = load_model(out / "tiny_cnn_fp32.onnx")
    x = fp32.preprocessing.batch([fp32.preprocess(p) for p in images])
    with torch.no_grad():
        ref_logits, ref_ood = (t.numpy() for t in scored(torch.from_numpy(x)))
    logits, ood = fp32.run(x)
    assert np.abs(logits - ref_logits).max() <= 1e-4
    assert np.abs(ood - ref_ood).max() <= 1e-3 * np.abs(ref_ood).max()
    assert fp32.ood["threshold"] == trust["ood"]["threshold"]
    q = onnx.load(str(out / "tiny_cnn_int8.onnx"))
    floats = {i.name for i in q.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    matmuls = [n for n in q.graph.node if n.op_type == "MatMul"]  # only the OOD head multiplies matrices
    assert matmuls, "the OOD head's matrix products are in the INT8 graph"
    # A quantised MatMul would take its whitening matrix through a DequantizeLinear; the head's stay float.
    assert all(n.input[1] in floats for n in matmuls), [n.input[1] for n in matmuls]
    # The head's image statistics read the float input, not a DequantizeLinear of its uint8 copy (the network's
    # first convolution reads that).
    readers = [n.op_type for n in q.graph.node if "image" in n.input]
    assert "QuantizeLinear" in readers and set(readers) - {"QuantizeLinear", "DequantizeLinear"}, readers


@needs_shared
def test_predict_withholds_findings_for_images_the_model_is_not_for(exported, tmp_path, capsys):
    """A phantom-trained model flags real radiographs more often than its own test images — compared with a
    one-sided Fisher exact test, with the exporter's own threshold (nothing tuned here) — and predict says why
    and shows no findings for a flagged image; a blank frame is flagged by name."""
    import pandas as pd
    from scipy.stats import fisher_exact

    from fedxr.data.manifest import read_manifest

    tmp, _, out = exported
    real_root = (ROOT / ".." / "shared" / "data" / "real-cxr").resolve()
    if not (real_root / "labels.csv").is_file():
        pytest.skip(f"real chest X-rays not found at {real_root}")
    real = [str(real_root / p) for p in pd.read_csv(real_root / "labels.csv")["path"].iloc[::180]][:40]
    own = [p for m in sorted((tmp / "runs" / "t" / "sites").glob("site-*.csv"))
           for p in read_manifest(m).query("split == 'test'")["path"]][:40]
    model = load_model(out)
    flagged = lambda paths: sum(r.in_distribution is False for r in model.predict(paths))  # noqa: E731
    real_flagged, own_flagged = flagged(real), flagged(own)
    _, p = fisher_exact([[real_flagged, len(real) - real_flagged], [own_flagged, len(own) - own_flagged]],
                        alternative="greater")
    assert p < 1e-3, (real_flagged, len(real), own_flagged, len(own))
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tmp_path / "blank.png")
    assert edge_main(["predict", str(out), str(tmp_path / "blank.png"), real[0], "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for r in results:
        assert r["in_distribution"] is False and r["findings"] == [] and "not like the images" in r["ood_reason"]
        assert r["warning"] == "trained on synthetic data — not for diagnosis"
    assert "blank" in results[0]["ood_reason"]
    assert edge_main(["predict", str(out), real[0]]) == 0
    text = capsys.readouterr().out
    assert text.startswith("*** TRAINED ON SYNTHETIC DATA") and "findings withheld" in text


def test_model_card_and_edge_info(exported, capsys):
    _, _, out = exported
    card = (out / "MODEL_CARD.md").read_text()
    assert card.startswith("> **TRAINED ON SYNTHETIC DATA — NOT FOR DIAGNOSIS.**")
    for section in ("# Model card: tiny_cnn", "**Intended use:**", "**Not intended for:**", "**Training data:**",
                    "## Performance", "## Findings and operating points", "## Known limits", "**Calibration:**",
                    "**Out-of-distribution check:**"):
        assert section in card, section
    assert edge_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("*** TRAINED ON SYNTHETIC DATA") and "MODEL_CARD.md (summary)" in text
    assert "## Performance" not in text  # the summary stops before the details
    assert "out-of-distribution check:" in text and "calibration: platt" in text
    # Every finding is listed with what its threshold means, or why it is not reliable.
    assert sum(line.split()[:1] in (["Atelectasis"], ["Hernia"], ["Pneumonia"]) for line in text.splitlines()) == 3
    assert edge_main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["operating_points"]) == 14 and info["model_card_summary"].startswith("> **TRAINED")
