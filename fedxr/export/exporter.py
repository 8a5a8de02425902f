"""Checkpoint → verified ONNX artifacts + manifest.json (what `python -m fedxr.export` runs)."""

from __future__ import annotations

import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedxr.artifacts import MANIFEST_FILE, MANIFEST_VERSION, ExportManifest, ManifestError
from fedxr.data.manifest import read_manifest
from fedxr.errors import FedxrError
from fedxr.edge.model import sha256_of
from fedxr.export.onnx import INPUT, export_fp32, model_metadata, parity, set_metadata
from fedxr.export.quantize import quantize_int8
from fedxr.export.targets import (OPERATORS_CONFIG, Target, convert_to_ort, format_usability, get_target,
                                  mobile_usability, runs_on_arm)
from fedxr.labels import LABELS
from fedxr.layout import RunLayout
from fedxr.models.checkpoint import model_from_checkpoint
from fedxr.models.metrics import multilabel_scores
from fedxr.trust.card import CARD_FILE, render, write_card
from fedxr.trust.fit import DEFAULT_MAX_IMAGES, fit_trust, metadata_of, write_trust_files
from fedxr.trust.ood import DEFAULT_QUANTILE, OOD_OUTPUT, ScoredNetwork
from fedxr.data.atomic import atomic_dir, write_json_atomic

MIN_CALIBRATION = 100
INT8_MIN_SPEEDUP, INT8_MAX_AUROC_LOSS = 1.2, 0.01
#: Largest |logit| difference allowed between the FP16 file and PyTorch FP32: half precision keeps ~3
#: significant digits, so logits of a few units differ in the second or third decimal.
FP16_PARITY_TOLERANCE = 0.05
#: Largest relative difference of the OOD score between FP32 ONNX and PyTorch (a distance: float32 sums of
#: hundreds of squared terms agree to ~1e-6 relative; 1e-3 leaves room for other kernels).
OOD_PARITY_TOLERANCE = 1e-3


def _run_layout(ckpt: dict) -> RunLayout | None:
    """The run that wrote the checkpoint, from the resolved recipe inside it (None for a bare checkpoint)."""
    return RunLayout.of_resolved(ckpt.get("recipe") or {})


def sites_data(ckpt: dict, data: str | Path | None) -> Path:
    """The site manifests to verify, calibrate and fit the trust checks on (default: the checkpoint's run's)."""
    if data is None:
        layout = _run_layout(ckpt)
        if layout is None:
            raise FedxrError("the checkpoint names no run to take validation images from; pass --data SITES_DIR")
        data = layout.sites
    return Path(data)


def validation_images(ckpt: dict, data: str | Path | None, limit: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Up to ``limit`` validation images (uint8, resized for the model) and labels from site manifests
    (default: the site manifests of the run that wrote the checkpoint)."""
    data = sites_data(ckpt, data)
    manifests = [data] if data.is_file() else sorted(data.glob("site-*.csv"))
    if not manifests:
        raise FedxrError(f"{data}: no site manifests for validation images; pass --data SITES_DIR (from `fedxr data split`)")
    rows = [m[m["split"] == "val"] for m in (read_manifest(p) for p in manifests)]
    import pandas as pd

    val = pd.concat(rows).head(limit)
    if val.empty:
        raise FedxrError(f"{data}: the manifests have no validation rows to verify and calibrate with")
    prep = ckpt["preprocessing"]
    return [prep.load(p) for p in val["path"]], val[list(LABELS)].to_numpy(dtype=np.float32)


def _batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def _latency_ms(session, x1: np.ndarray) -> float:
    """Batch-1 latency (ms, median) of one file: :func:`_paired_latency_ms` of it alone."""
    return _paired_latency_ms([session], x1)[0]


def _paired_latency_ms(sessions: list, x1: np.ndarray, rounds: int = 5, runs: int = 10) -> list[float]:
    """Batch-1 latency (ms, median) of each session, timed interleaved: ``rounds`` rounds of ``runs`` calls to each
    in turn. A decision between two files (keep INT8 only when it is 1.2x faster) then does not hang on which file
    was timed during the machine's slow spell — another process, a frequency change — as two separate timings can
    (the real recipe's students measured 1.18x and 1.20x: at the rule's edge, where noise decides)."""
    names = [s.get_inputs()[0].name for s in sessions]
    for session, name in zip(sessions, names):
        for _ in range(3):
            session.run(None, {name: x1})
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for session, name, own in zip(sessions, names, times):
            for _ in range(runs):
                t = time.perf_counter()
                session.run(None, {name: x1})
                own.append(time.perf_counter() - t)
    return [round(float(np.median(own)) * 1000, 3) for own in times]


def _logits(session, x: np.ndarray, batch: int, output: int = 0) -> np.ndarray:
    """One output (0: logits, 1: the OOD score) over ``x`` in batches."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: b})[output] for b in _batches(x, batch)])


def _ood_agreement(session, reference: np.ndarray, x: np.ndarray, batch: int, threshold: float) -> dict:
    """How a file's OOD score compares with the FP32 file's on the validation images: largest relative
    difference and the share of images flagged the same way."""
    got = _logits(session, x, batch, output=1)
    rel = float(np.max(np.abs(got - reference) / np.maximum(np.abs(reference), 1e-6)))
    return {"ood_max_rel_diff": round(rel, 6), "ood_flag_agreement": round(float(((got > threshold) == (reference > threshold)).mean()), 4)}


def _auroc(session, x: np.ndarray, y: np.ndarray, batch: int = 16) -> float:
    logits = _logits(session, x, batch)
    return round(multilabel_scores(torch.sigmoid(torch.from_numpy(logits)), torch.from_numpy(y.copy()))["macro_auroc"], 4)


#: onnxruntime threads every latency in a manifest is timed with (and so the INT8 decision and the recommended
#: file): one, as every edge figure fedxr publishes is (`python -m fedxr.edge bench MODEL --threads 1`). The file
#: is chosen for a device that is not the exporting machine; one core's speed carries over between machines, the
#: exporting machine's core count does not — at two threads here the narrow student's INT8 file was 0.93x its FP32
#: file, at one thread 1.24x — and a small model's batch-1 latency at several threads is mostly their hand-offs.
TIMING_THREADS = 1


def _session(path: Path, threads: int | None = None):
    """An onnxruntime session opened as fedxr.edge opens it: an ORT file's saved runtime optimisations are
    replayed (without them it runs at the basic level: INT8 then computes QDQ in float, other numbers); ``threads``
    fixes onnxruntime's intra-op threads (default: its own choice)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if path.suffix == ".ort":
        opts.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _int8_decision(target: Target, int8: str, speedup: float, auroc: float, q_auroc: float) -> tuple[bool, str]:
    """Keep INT8 or not, and why. Speed only counts where it was measured on the kernels that will run it:
    here for a laptop, on ARM for a board or phone (when this export runs on one)."""
    loss = auroc - q_auroc
    accuracy = f"macro AUROC {q_auroc:.4f} vs {auroc:.4f} (loss {loss:+.4f}, allowed {INT8_MAX_AUROC_LOSS})"
    if target.fixed_batch is None or runs_on_arm():
        good = speedup >= INT8_MIN_SPEEDUP and loss <= INT8_MAX_AUROC_LOSS
        keep = int8 == "on" or good
        why = f"{speedup:.2f}x faster than FP32 on {platform.machine()} (needs >= {INT8_MIN_SPEEDUP}), {accuracy}"
    else:
        good = loss <= INT8_MAX_AUROC_LOSS
        keep = int8 == "on" or good
        why = (f"on accuracy alone, {accuracy}; speed not measured on ARM (this export ran on {platform.machine()}, "
               f"where INT8 is {speedup:.2f}x FP32 — that does not carry over to an ARM core's kernels: run "
               "`python -m fedxr.edge bench` on the device with each file)")
    return keep, f"INT8 {'kept' if keep else 'dropped'}: {why}" + (" — kept because --int8 on" if int8 == "on" and not good else "")


@dataclass
class _Export:
    """One export in progress: the scored network, the validation batch every file is checked on, and the
    files written so far (their manifest entries)."""
    model: Any                       # ScoredNetwork: (logits, ood_score)
    ckpt: dict
    ckpt_path: Path
    out: Path
    name: str
    x: np.ndarray
    labels: np.ndarray
    step: int | None                 # a fixed-shape target's batch size; None: any batch
    trust: dict
    opset: int
    files: list[dict] = field(default_factory=list)
    ok: bool = True

    @property
    def batch(self) -> int:
        return self.step or 16

    @property
    def check_inputs(self) -> list[np.ndarray]:
        """A fixed-shape model takes exactly its batch size: every check feeds it slices of that size."""
        return [self.x[:1], self.x[:8]] if self.step is None else _batches(self.x[:8], self.step)

    def meta(self, fmt: str, auroc: float | None) -> dict:
        return model_metadata(self.ckpt, self.ckpt_path, fmt, auroc, metadata_of(self.trust))

    def path(self, kind: str) -> Path:
        return self.out / f"{self.name}_{kind}.onnx"


def export_checkpoint(ckpt_path: str | Path, out: str | Path | None = None, int8: str = "auto", fp16: bool = False,
                      opset: int = 18, data: str | Path | None = None, calibration_images: int = 200,
                      parity_tolerance: float = 1e-4, target: str = "laptop", operating_point: str = "youden",
                      ood_quantile: float = DEFAULT_QUANTILE, trust_images: int = DEFAULT_MAX_IMAGES,
                      progress: bool = True) -> dict:
    """Export, verify and describe for a target (:data:`fedxr.export.targets.TARGETS`); returns the manifest
    (``ok`` is False when a check failed). The exported graph carries the OOD score as a second output and its
    metadata the calibration and operating points (:mod:`fedxr.trust`); MODEL_CARD.md is written beside it."""
    tgt = get_target(target)
    ckpt_path = Path(ckpt_path)
    model, ckpt = model_from_checkpoint(ckpt_path)
    name, prep = ckpt["model_name"], ckpt["preprocessing"]
    final = _output_folder(ckpt, name, tgt, out)
    # All or nothing: the files are written into a folder beside it that replaces the old export only when this
    # one is complete, so an export interrupted at any point (Ctrl-C, a kill, a full disk) leaves the previous
    # export whole — never its manifest beside half-written files.
    with atomic_dir(final, replace=True) as staging:
        manifest = _export_into(staging, model, ckpt, ckpt_path, name, prep, tgt, int8, fp16, opset, data,
                                calibration_images, parity_tolerance, operating_point, ood_quantile, trust_images,
                                progress)
        _keep_users_files(final, staging, name)
    manifest["out"] = str(final)
    return manifest


def _keep_users_files(old: Path, new: Path, name: str) -> None:
    """Carry into the new export folder everything the old one held that no export wrote — the user's own notes,
    another model's files, hidden files and folders — as hard links where the file system allows (no copy of a large
    folder; the old folder is removed after the swap). An earlier export's files (those its manifest lists, this
    model's ``NAME_KIND.onnx/.ort``, the operators config) are not carried: another target's files or a dropped INT8
    file must not be left behind."""
    if not old.is_dir():
        return
    exported = {f"{name}_{kind}.{ext}" for kind in ("fp32", "int8", "fp16") for ext in ("onnx", "ort")}
    exported.add(OPERATORS_CONFIG)
    try:
        exported |= {f.file for f in ExportManifest.read(old).files}
    except (ManifestError, FileNotFoundError):
        pass

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(src, dst, follow_symlinks=False)

    for entry in old.iterdir():
        if entry.name in exported or (new / entry.name).exists() or ".tmp-" in entry.name:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link)
        else:
            link(str(entry), str(new / entry.name))


def _export_into(out: Path, model, ckpt: dict, ckpt_path: Path, name: str, prep, tgt: Target, int8: str, fp16: bool,
                 opset: int, data, calibration_images: int, parity_tolerance: float, operating_point: str,
                 ood_quantile: float, trust_images: int, progress: bool) -> dict:
    images, labels = validation_images(ckpt, data, max(calibration_images, 16))
    print(f"fitting calibration, operating points ({operating_point}) and the OOD score on {sites_data(ckpt, data)}")
    try:
        trust = fit_trust(model, ckpt, sites_data(ckpt, data), operating_point, ood_quantile, trust_images, progress)
    except ValueError as exc:
        raise FedxrError(f"{ckpt_path}: cannot fit the trust checks: {exc}") from None
    job = _Export(model=ScoredNetwork(model, trust["ood"]).eval(),  # what every exported file computes
                  ckpt=ckpt, ckpt_path=ckpt_path, out=out, name=name, x=prep.batch(images), labels=labels,
                  step=tgt.fixed_batch, trust=trust, opset=opset)
    fp32, sess, _, auroc = _export_fp32(job, prep.size, parity_tolerance)
    ood_reference = _logits(sess, job.x, job.batch, output=1)
    decision = "int8 off"
    if int8 != "off":
        decision = _export_int8(job, tgt, int8, fp32, auroc, ood_reference, len(images))
    if fp16:
        _export_fp16(job, fp32, ood_reference)
    extra: dict = {}
    if tgt.ort_style:
        extra, ok = _ort_files(tgt, job.model, out, job.files, job.meta, job.x, labels, parity_tolerance)
        job.ok &= ok
    if tgt.usability_check:
        extra["mobile_usability"] = {f["file"]: mobile_usability(out / f["file"]) for f in job.files
                                     if f["kept"] and f["file"].endswith(".onnx")}
    return _write_manifest(job, tgt, prep.size, len(images), decision, extra)


def _output_folder(ckpt: dict, name: str, tgt: Target, out: str | Path | None) -> Path:
    """The export folder (default: the run's export/ folder for this model and target). An earlier export there
    is replaced whole (another target's files, a dropped INT8 file: none is left behind); everything else in the
    folder is kept (:func:`_keep_users_files`)."""
    if out is None:
        layout = _run_layout(ckpt) or RunLayout(Path("model"))  # a bare checkpoint: export/model_NAME
        out = layout.export(name, student=str(ckpt.get("source", "")).startswith("distill"))
        if tgt.fixed_batch:
            out = out.with_name(f"{out.name}_{tgt.name}")
    return Path(out)


def _export_fp32(job: _Export, size: int, tolerance: float) -> tuple[Path, Any, float, float]:
    """The FP32 file, checked against PyTorch (logits and OOD score) and by ONNX's full checker: its path, the
    session it was checked with, its latency (ms, batch 1) and validation AUROC."""
    import onnx

    fp32 = export_fp32(job.model, size, job.path("fp32"), job.opset, fixed_batch=job.step)
    sess = _session(fp32)
    diff, ood_diff = parity(job.model, sess, job.check_inputs)
    passed = diff <= tolerance and ood_diff <= OOD_PARITY_TOLERANCE
    job.ok &= passed
    auroc = _auroc(sess, job.x, job.labels, job.batch)
    set_metadata(fp32, job.meta("onnx-fp32", auroc))
    onnx.checker.check_model(str(fp32), full_check=True)
    lat32 = _latency_ms(_session(fp32, TIMING_THREADS), job.x[:1])
    job.files.append({"file": fp32.name, "format": "onnx-fp32", "parity_max_abs_logit": diff,
                      "parity_tolerance": tolerance, "parity_ood_max_rel": ood_diff, "parity_ok": passed,
                      "val_auroc": auroc, "latency_ms_b1_p50": lat32, "kept": True})
    return fp32, sess, lat32, auroc


def _export_int8(job: _Export, tgt: Target, int8: str, fp32: Path, auroc: float,
                 ood_reference: np.ndarray, calibration: int) -> str:
    """The INT8 (QDQ) file, calibrated on the validation batch; kept or dropped by the target's rule (speed and
    AUROC against FP32). Returns the decision, as the manifest states it."""
    if calibration < MIN_CALIBRATION:
        warnings.warn(f"INT8 calibration uses only {calibration} validation images (< {MIN_CALIBRATION}); "
                      "its ranges may not represent your data", stacklevel=3)
    q = quantize_int8(fp32, job.path("int8"), INPUT, _batches(job.x, job.step or 8), float_outputs=(OOD_OUTPUT,))
    qs = _session(q)
    q_auroc = _auroc(qs, job.x, job.labels, job.batch)
    # Side by side: the decision's two figures.
    lat32, q_lat = _paired_latency_ms([_session(fp32, TIMING_THREADS), _session(q, TIMING_THREADS)], job.x[:1])
    next(f for f in job.files if f["file"] == fp32.name)["latency_ms_b1_p50"] = lat32
    set_metadata(q, job.meta("onnx-int8-qdq", q_auroc))
    speedup = lat32 / q_lat if q_lat else 0.0
    keep, decision = _int8_decision(tgt, int8, speedup, auroc, q_auroc)
    job.files.append({"file": q.name, "format": "onnx-int8-qdq", "val_auroc": q_auroc, "latency_ms_b1_p50": q_lat,
                      "speedup_vs_fp32": round(speedup, 3), "kept": keep,
                      **_ood_agreement(qs, ood_reference, job.x, job.batch, job.trust["ood"]["threshold"])})
    if not keep:
        q.unlink()
    return decision


def _export_fp16(job: _Export, fp32: Path, ood_reference: np.ndarray) -> None:
    """The FP16 file (FP32 inputs and outputs), checked against PyTorch within FP16's own tolerance."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    h = job.path("fp16")
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(h))
    hs = _session(h)
    d16, _ = parity(job.model, hs, job.check_inputs)
    ok16 = d16 <= FP16_PARITY_TOLERANCE
    job.ok &= ok16
    auroc16 = _auroc(hs, job.x, job.labels, job.batch)
    set_metadata(h, job.meta("onnx-fp16", auroc16))  # its own format, not the FP32 file's
    job.files.append({"file": h.name, "format": "onnx-fp16", "parity_max_abs_logit": d16,
                      "parity_tolerance": FP16_PARITY_TOLERANCE, "parity_ok": ok16, "val_auroc": auroc16,
                      "latency_ms_b1_p50": _latency_ms(_session(h, TIMING_THREADS), job.x[:1]), "kept": True,
                      **_ood_agreement(hs, ood_reference, job.x, job.batch, job.trust["ood"]["threshold"])})


def _write_manifest(job: _Export, tgt: Target, size: int, validation: int, decision: str, extra: dict) -> dict:
    """Digest every file, check the manifest with the schema every reader uses, then write it and the model card."""
    import onnx
    import onnxruntime as ort

    out, files = job.out, job.files
    for f in files:
        p = out / f["file"]
        if p.exists():
            f.update(size_bytes=p.stat().st_size, sha256=sha256_of(p), opset=job.opset)
    ckpt = job.ckpt
    manifest = {
        "checkpoint": str(job.ckpt_path), "checkpoint_sha256": sha256_of(job.ckpt_path), "model_name": job.name,
        "trained_on": ckpt.get("trained_on"), "target": tgt.name, "input_shape": [job.step or "batch", 1, size, size],
        "input_size": size, "validation_images": validation, "int8_decision": decision, "files": files,
        "recommended": _recommended(tgt, files), "ok": bool(job.ok), **extra,
        "runtime": {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__,
                    "python": platform.python_version(), "machine": platform.machine()},
    }
    manifest["trust"] = write_trust_files(out, job.trust, job.name)
    manifest["model_card"] = CARD_FILE
    manifest["schema_version"] = MANIFEST_VERSION
    typed = ExportManifest.from_json(manifest, folder=out)  # what every reader will see: checked before it is written
    undigested = [f.file for f in typed.files if (out / f.file).is_file() and not (f.sha256 and f.size_bytes)]
    if undigested:  # the edge runtime verifies files by these two fields: a file without them would load unchecked
        raise FedxrError(f"{out / MANIFEST_FILE}: no SHA-256 or size for {', '.join(undigested)} (a fedxr bug: report it)")
    write_json_atomic(out / MANIFEST_FILE, manifest)
    student = str(ckpt.get("source", "")).startswith("distill")
    write_card(out, render(job.name, student, ckpt.get("trained_on"), job.trust, typed))
    return manifest


def _ort_files(tgt: Target, model, out: Path, files: list[dict], meta, x: np.ndarray, labels: np.ndarray,
               tolerance: float) -> tuple[dict, bool]:
    """ORT format copies of every kept ONNX file, each checked against what it was made from: PyTorch for
    FP32, the ONNX file for INT8 and FP16, at the same optimisation level (the conversion must not change
    their outputs)."""
    sources = [f for f in files if f["kept"]]
    step = tgt.fixed_batch or 16  # as in export_checkpoint (every target with ORT files fixes its batch size)
    made, config = convert_to_ort({out / f["file"]: meta(f["format"].replace("onnx-", "ort-"), f["val_auroc"])
                                   for f in sources}, out, tgt)
    ok = True
    for f in sources:
        path = made[out / f["file"]]
        sess = _session(path)
        if f["format"] == "onnx-fp32":
            diff, _ = parity(model, sess, _batches(x[:8], step))
        else:
            converted = _logits(sess, x[:8], step)
            diff = float(np.abs(converted - _logits(_session(out / f["file"]), x[:8], step)).max())
        passed = diff <= tolerance
        ok &= passed
        files.append({"file": path.name, "format": f["format"].replace("onnx-", "ort-"), "converted_from": f["file"],
                      "parity_against": "pytorch" if f["format"] == "onnx-fp32" else f["file"],
                      "parity_max_abs_logit": diff, "parity_tolerance": tolerance, "parity_ok": passed,
                      "val_auroc": _auroc(sess, x, labels, step), "latency_ms_b1_p50": _latency_ms(_session(path, TIMING_THREADS), x[:1]),
                      "ort_optimization_style": tgt.ort_style, "ort_target_platform": tgt.ort_platform, "kept": True})
    return {"operators_config": {"file": config.name, "sha256": sha256_of(config),
                                 "operators": [l for l in config.read_text().splitlines() if l and not l.startswith("#")]}}, ok


def _recommended(tgt: Target, files: list[dict]) -> str:
    """The file to use: the fastest kept one where speed was measured on the target's kernels; for a board or
    phone measured elsewhere, the FP32 ORT file (INT8's speed there is unknown)."""
    kept = [f for f in files if f["kept"] and f.get("parity_ok", True)] or [f for f in files if f["kept"]]
    if tgt.ort_style:
        ort_files = [f for f in kept if f["file"].endswith(".ort")]
        if runs_on_arm():
            return min(ort_files, key=lambda f: f["latency_ms_b1_p50"])["file"]
        return next(f["file"] for f in ort_files if f["format"] == "ort-fp32")
    return min(kept, key=lambda f: f["latency_ms_b1_p50"])["file"]


def format_manifest(m: dict) -> str:
    lines = [f"target: {m.get('target', 'laptop')}, input {' x '.join(str(d) for d in m.get('input_shape', []))}",
             f"{'file':<34}{'format':<15}{'MB':>7}{'AUROC':>8}{'b1 ms':>9}{'parity':>11}  kept"]
    for f in m["files"]:
        par = f"{f['parity_max_abs_logit']:.1e}" if "parity_max_abs_logit" in f else "-"
        size = f"{f['size_bytes'] / 1e6:.2f}" if "size_bytes" in f else "-"
        lines.append(f"{f['file']:<34}{f['format']:<15}{size:>7}{f['val_auroc']:>8.4f}{f['latency_ms_b1_p50']:>9.2f}"
                     f"{par:>11}  {'yes' if f['kept'] else 'no'}")
    lines.append(m["int8_decision"])
    if "operators_config" in m:
        lines.append(f"operators for a minimal onnxruntime build: {m['operators_config']['file']} "
                     f"({len(m['operators_config']['operators'])} operators; build.sh --minimal_build "
                     "--include_ops_by_config FILE)")
    for file, result in m.get("mobile_usability", {}).items():
        lines += format_usability(file, result)
    lines += [f"recommended: {m['recommended']}  ({'all checks passed' if m['ok'] else 'CHECK FAILED'})",
              f"next: python -m fedxr.edge predict {m['out']} path/to/cxr.png",
              f"      python -m fedxr.edge bench {m['out']}"]
    return "\n".join(lines)
