"""EdgeModel: an exported model plus everything needed to use it, read from the .onnx file itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from fedxr.edge import metadata
from fedxr.errors import FedxrError
from fedxr.imaging import ImageReadError, resize_square
from fedxr.preprocessing import FALLBACK_MEAN, FALLBACK_STD, Preprocessing


class ModelMetadataError(FedxrError):
    """The model file lacks the fedxr metadata needed to preprocess inputs and name outputs."""


@dataclass
class Prediction:
    """One input's result: probabilities for every label and the findings above their thresholds."""

    input: str
    probabilities: dict[str, float] = field(default_factory=dict)
    findings: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        return {"input": self.input, "error": self.error, "findings": [{"label": l, "probability": p} for l, p in self.findings],
                "probabilities": self.probabilities}


def resolve_model_path(path: str | Path) -> Path:
    """A .onnx file, or an export folder (its manifest's recommended file, else the FP32 model)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():
            rec = json.loads(manifest.read_text()).get("recommended")
            if rec and (path / rec).is_file():
                return path / rec
        onnx_files = sorted(path.glob("*.onnx"))
        if onnx_files:
            return next((p for p in onnx_files if p.stem.endswith("fp32")), onnx_files[0])
        raise FedxrError(f"{path}: no .onnx model in this folder; export one with `python -m fedxr.export CKPT`")
    raise FedxrError(f"{path}: model not found; give an export folder or a .onnx file")


class EdgeModel:
    """An ONNX chest X-ray classifier with its labels, preprocessing and thresholds."""

    def __init__(self, path: str | Path, threads: int | None = None, labels: Sequence[str] | None = None):
        import onnxruntime as ort

        self.path = resolve_model_path(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise FedxrError(f"{self.path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from None
        self.meta = metadata.decode(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        missing = [k for k in metadata.REQUIRED if k not in self.meta]
        if missing and labels is None:
            raise ModelMetadataError(
                f"{self.path}: not a fedxr model (no {', '.join('fedxr.' + k for k in missing)} metadata); "
                "export it with `python -m fedxr.export CKPT`, or pass --labels NAME,NAME,… to use it anyway "
                f"(thresholds 0.5, normalisation mean {FALLBACK_MEAN} / std {FALLBACK_STD}, input size from the model)")
        if missing:
            shape = self.session.get_inputs()[0].shape
            n_out = self.session.get_outputs()[0].shape[-1]
            if isinstance(n_out, int) and len(labels) != n_out:
                raise ModelMetadataError(f"--labels names {len(labels)} labels but the model has {n_out} outputs")
            self.meta = {"labels": list(labels), **Preprocessing(int(shape[-1])).metadata(),
                         "thresholds": [0.5] * len(labels), **self.meta}
        self.labels: list[str] = list(self.meta["labels"])
        self.preprocessing = Preprocessing.from_metadata(self.meta)
        self.size = self.preprocessing.size
        self.thresholds = np.asarray(self.meta["thresholds"], dtype=np.float32)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def preprocess(self, item) -> np.ndarray:
        """A path or an (H, W) uint8 array → the (S, S) uint8 image the model's input starts from."""
        if isinstance(item, np.ndarray):
            if item.ndim != 2 or item.dtype != np.uint8:
                raise FedxrError(f"array input must be (H, W) uint8 gray; got {item.dtype} {item.shape}")
            return resize_square(item, self.size)
        return self.preprocessing.load(item)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, S, S) float32 → (N, 14) logits. The input must already be preprocessed."""
        if batch.ndim != 4 or batch.shape[1:] != (1, self.size, self.size):
            raise FedxrError(f"model input must be (N, 1, {self.size}, {self.size}) float32; got {tuple(batch.shape)}")
        return self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]

    def predict(self, items: Iterable, batch_size: int = 8) -> list[Prediction]:
        """Predict for paths and/or arrays; an unreadable input gets ``error`` set, the rest still run."""
        items = list(items)
        results = [Prediction(input=str(it) if not isinstance(it, np.ndarray) else f"array[{i}]") for i, it in enumerate(items)]
        ready: list[tuple[int, np.ndarray]] = []
        for i, it in enumerate(items):
            try:
                ready.append((i, self.preprocess(it)))
            except (ImageReadError, FedxrError) as exc:
                results[i].error = str(exc)
        for start in range(0, len(ready), max(1, batch_size)):
            chunk = ready[start:start + batch_size]
            logits = self.logits(self.preprocessing.batch([g for _, g in chunk]))
            probs = 1.0 / (1.0 + np.exp(-logits))
            for (i, _), p in zip(chunk, probs):
                results[i].probabilities = {l: round(float(v), 6) for l, v in zip(self.labels, p)}
                results[i].findings = sorted(((l, round(float(v), 4)) for l, v, t in zip(self.labels, p, self.thresholds) if v >= t),
                                             key=lambda x: -x[1])
        return results


def load_model(path: str | Path, threads: int | None = None, labels: Sequence[str] | None = None) -> EdgeModel:
    """Load an export folder or .onnx file for inference."""
    return EdgeModel(path, threads=threads, labels=labels)
