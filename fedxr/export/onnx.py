"""FP32 ONNX export of a fedxr checkpoint, its metadata, and parity checks against PyTorch."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from fedxr import __version__
from fedxr.edge import metadata
from fedxr.edge.model import sha256_of
from fedxr.errors import FedxrError

INPUT, OUTPUT, OOD_OUTPUT = "image", "logits", "ood_score"



def model_metadata(ckpt: dict, ckpt_path: Path, fmt: str, val_auroc: float | None, trust: dict) -> dict:
    """The fedxr metadata of one exported file: exactly :data:`fedxr.edge.metadata.KEYS`. ``thresholds`` are the
    operating points' (on calibrated probabilities); ``trust`` is :func:`fedxr.trust.fit.metadata_of`."""
    values = {"labels": list(ckpt["labels"]), **ckpt["preprocessing"].metadata(),
              "thresholds": [p["threshold"] for p in trust["operating_points"]],
              "model_name": ckpt["model_name"], "fedxr_version": __version__, "checkpoint_sha256": sha256_of(ckpt_path),
              "val_auroc": val_auroc, "format": fmt, "trained_on": ckpt.get("trained_on"), **trust}
    if set(values) != set(metadata.KEYS):  # the edge runtime documents and reads these keys
        raise AssertionError(f"export metadata keys {sorted(values)} differ from fedxr.edge.metadata.KEYS")
    return values


def set_metadata(path: Path, values: dict) -> None:
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(metadata.encode(values))
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def export_fp32(model: torch.nn.Module, size: int, path: Path, opset: int, fixed_batch: int | None = None) -> Path:
    """One self-contained .onnx file (weights inside), full onnx.checker pass; a dynamic batch axis, or
    every dimension fixed (``fixed_batch`` × 1 × size × size) for mobile and board accelerators."""
    model = model.eval()
    example = torch.zeros(fixed_batch or 2, 1, size, size)
    dynamic = None if fixed_batch else ({0: torch.export.Dim("batch", min=1, max=4096)},)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=dynamic,
                          external_data=False, opset_version=opset, input_names=[INPUT], output_names=[OUTPUT, OOD_OUTPUT],
                          verbose=False)
    side = [p for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
    for p in side:
        os.remove(p)
    if side:
        raise FedxrError(f"{path}: the exporter wrote side files {side}; the model must be one file")
    onnx.checker.check_model(str(path), full_check=True)
    return path


def parity(model: torch.nn.Module, session, batches: list[np.ndarray]) -> tuple[float, float]:
    """(max |logit difference|, max relative OOD-score difference) between PyTorch (a
    :class:`fedxr.trust.ood.ScoredNetwork`) and onnxruntime over the given input batches."""
    worst = worst_ood = 0.0
    with torch.no_grad():
        for x in batches:
            ref_logits, ref_ood = (t.numpy() for t in model(torch.from_numpy(x)))
            got = session.run(None, {session.get_inputs()[0].name: x})
            worst = max(worst, float(np.abs(ref_logits - got[0]).max()))
            worst_ood = max(worst_ood, float((np.abs(ref_ood - got[1]) / np.maximum(np.abs(ref_ood), 1e-6)).max()))
    return worst, worst_ood
