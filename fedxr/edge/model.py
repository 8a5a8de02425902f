"""EdgeModel: an exported model plus everything needed to use it, read from the .onnx file itself."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from fedxr.artifacts import MANIFEST_FILE, ExportManifest, ManifestError
from fedxr.edge import metadata
from fedxr.errors import FedxrError
from fedxr.imaging import ImageReadError, resize_square
from fedxr.preprocessing import FALLBACK_MEAN, FALLBACK_STD, Preprocessing


class ModelMetadataError(FedxrError):
    """The model file lacks the fedxr metadata needed to preprocess inputs and name outputs."""


#: A frame whose gray levels vary less than this (standard deviation, 0-255) is blank: nothing to read.
BLANK_STD = 2.0


@dataclass
class Prediction:
    """One input's result: calibrated probabilities for every label; the reliable findings above their operating
    point's threshold (sorted by how far they clear it, with what that threshold means); whether the image is
    like those the model was trained on (when it is not, ``findings`` is empty and ``ood_reason`` says why)."""

    input: str
    probabilities: dict[str, float] = field(default_factory=dict)
    findings: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    statements: dict[str, str] = field(default_factory=dict)
    in_distribution: bool | None = None
    ood_score: float | None = None
    ood_reason: str | None = None

    @property
    def withheld(self) -> bool:
        return self.in_distribution is False

    def as_dict(self) -> dict:
        return {"input": self.input, "error": self.error, "in_distribution": self.in_distribution,
                "ood_score": self.ood_score, "ood_reason": self.ood_reason,
                "findings": [{"label": l, "probability": p, "operating_point": self.statements.get(l)} for l, p in self.findings],
                "probabilities": self.probabilities}


#: Files onnxruntime loads: ONNX, and the ORT format written by the board and mobile export targets.
MODEL_SUFFIXES = (".onnx", ".ort")


def resolve_model_path(path: str | Path) -> Path:
    """A .onnx/.ort file, or an export folder (its manifest's recommended file, else the FP32 model)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            try:
                rec = ExportManifest.read(path).recommended
            except ManifestError as exc:
                raise ModelIntegrityError(f"{exc}; or give the model file itself") from None
            if rec and (path / rec).is_file():
                return path / rec
        files = sorted(p for p in path.iterdir() if p.suffix in MODEL_SUFFIXES)
        if files:
            return next((p for p in files if p.stem.endswith("fp32")), files[0])
        raise FedxrError(f"{path}: no .onnx or .ort model in this folder; export one with `python -m fedxr.export CKPT`")
    raise FedxrError(f"{path}: model not found; give an export folder, a .onnx or a .ort file")


class ModelIntegrityError(FedxrError):
    """A model file is not the file its export manifest lists (changed, truncated or half-copied)."""


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (the exporter records it, the edge runtime checks it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_model_file(path: Path) -> bool:
    """Check a model file against the size and SHA-256 that the export manifest beside it records.

    True when checked and equal; False when no manifest lists the file (a file copied out of its export folder,
    or renamed: nothing to check it against). A difference raises ModelIntegrityError naming the file: a
    truncated copy (a full disk, a transfer cut short) or an altered file would otherwise load — a truncated
    ONNX file sometimes does — and predict from weights nobody checked.
    """
    manifest = path.parent / MANIFEST_FILE
    if not manifest.is_file():
        return False
    fix = ("copy the export folder again from the machine that exported it, or export again "
           "(`python -m fedxr.export CKPT`); --no-verify (verify=False) loads it unchecked")
    try:
        entry = ExportManifest.read(manifest).file(path.name)
    except ManifestError as exc:
        raise ModelIntegrityError(f"{exc}; --no-verify (verify=False) loads the model unchecked") from None
    if entry is None or not entry.sha256:
        return False
    size = path.stat().st_size
    if entry.size_bytes is not None and size != entry.size_bytes:
        raise ModelIntegrityError(f"{path}: {size:,} bytes, but {manifest.name} lists {entry.size_bytes:,} — the file is "
                                  f"incomplete or not the one exported; {fix}")
    if sha256_of(path) != entry.sha256:
        raise ModelIntegrityError(f"{path}: its SHA-256 differs from the one {manifest.name} lists — the file was changed "
                                  f"after export; {fix}")
    return True


class EdgeModel:
    """An ONNX chest X-ray classifier with its labels, preprocessing and thresholds."""

    def __init__(self, path: str | Path, threads: int | None = None, labels: Sequence[str] | None = None,
                 spinning: bool = False, verify: bool = True):
        import onnxruntime as ort

        self.path = resolve_model_path(path)
        #: Whether the file was checked against its export manifest's SHA-256 (False: no manifest lists it).
        self.verified = verify_model_file(self.path) if verify else False
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        # onnxruntime's threads busy-wait between runs by default; while images are decoded in parallel that
        # steals the decoders' cores (a folder of 1024-px PNGs: 175 → 225 img/s on 2 cores without it).
        # `bench` turns it back on: it measures the model alone, back to back.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if self.path.suffix == ".ort":
            # A mobile export's ORT file saves optimisations (INT8 kernel fusions among them) to be replayed at
            # load; without replay onnxruntime runs it at the basic level — different numbers from the ones the
            # exporter checked. Replay is onnxruntime's option for trusted models: give fedxr.edge only models
            # from your own export, as with any ONNX file.
            opts.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise FedxrError(f"{self.path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from None
        self.meta = metadata.decode(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        batch_dim = self.session.get_inputs()[0].shape[0]
        #: The batch size a fixed-shape model (export targets board and mobile) takes; None when dynamic.
        self.fixed_batch: int | None = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        missing = [k for k in metadata.REQUIRED if k not in self.meta]
        if missing:
            if labels is None:
                raise ModelMetadataError(
                    f"{self.path}: not a fedxr model (no {', '.join('fedxr.' + k for k in missing)} metadata); "
                    "export it with `python -m fedxr.export CKPT`, or pass --labels NAME,NAME,… to use it anyway "
                    f"(thresholds 0.5, normalisation mean {FALLBACK_MEAN} / std {FALLBACK_STD}, "
                    "input size from the model)")
            shape = self.session.get_inputs()[0].shape
            n_out = self.session.get_outputs()[0].shape[-1]
            if isinstance(n_out, int) and len(labels) != n_out:
                raise ModelMetadataError(f"--labels names {len(labels)} labels but the model has {n_out} outputs")
            self.meta = {"labels": list(labels), **Preprocessing(int(shape[-1])).metadata(),
                         "thresholds": [0.5] * len(labels), **self.meta}
        self.labels: list[str] = list(self.meta["labels"])
        self.preprocessing = Preprocessing.from_metadata(self.meta)
        self.size = self.preprocessing.size
        self.thresholds = np.asarray(self.meta["thresholds"], dtype=np.float64)
        #: What the model was trained on (fedxr.data.provenance), None for files from an older export.
        self.trained_on: dict | None = self.meta.get("trained_on")
        #: Platt scaling per finding (fedxr.trust.calibration); None: probabilities are the plain sigmoid.
        self.calibration: dict | None = self.meta.get("calibration")
        #: Per finding: threshold, rule, validation sensitivity/specificity, reliable/why (fedxr.trust.operating).
        self.operating_points: list[dict] | None = self.meta.get("operating_points")
        #: The out-of-distribution check: the graph output that computes it and the threshold.
        self.ood: dict | None = self.meta.get("ood")
        names = [o.name for o in self.session.get_outputs()]
        self._ood_index = names.index(self.ood["output"]) if self.ood and self.ood.get("output") in names else None
        self.unreliable: dict[str, str] = {p["label"]: p["why"] for p in (self.operating_points or []) if not p["reliable"]}

    @property
    def synthetic(self) -> bool:
        """Trained on fedxr's synthetic phantom: its predictions are not for diagnosis."""
        return bool(self.trained_on and self.trained_on.get("synthetic"))

    @property
    def provenance(self) -> str:
        from fedxr.data.provenance import describe

        return describe(self.trained_on)

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
        return self.run(batch)[0]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (the file's Platt scaling; plain sigmoid for a file without one)."""
        from fedxr.trust.calibration import apply_calibration

        return apply_calibration(logits, self.calibration)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 1, S, S) float32 → ((N, 14) logits, (N,) OOD scores or None for a file without the check). A
        fixed-shape model (batch dimension fixed at export) is run on slices of its own batch size."""
        if batch.ndim != 4 or batch.shape[1:] != (1, self.size, self.size):
            raise FedxrError(f"model input must be (N, 1, {self.size}, {self.size}) float32; got {tuple(batch.shape)}")
        batch = batch.astype(np.float32, copy=False)
        step = self.fixed_batch
        k = self._ood_index
        if step is None or len(batch) == step:
            out = self.session.run(None, {self.input_name: batch})
            return out[0], (out[k] if k is not None else None)
        logits, scores = [], []
        for i in range(0, len(batch), step):
            part = batch[i:i + step]
            pad = step - len(part)  # only a model fixed at batch > 1 needs padding of its last slice
            if pad:
                part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), np.float32)])
            out = self.session.run(None, {self.input_name: part})
            logits.append(out[0][:step - pad])
            if k is not None:
                scores.append(out[k][:step - pad])
        return np.concatenate(logits), (np.concatenate(scores) if k is not None else None)

    def statement(self, label: str) -> str | None:
        """What crossing ``label``'s threshold means, in words (None for a file without operating points)."""
        point = next((p for p in self.operating_points or [] if p["label"] == label), None)
        if point is None or not point["reliable"]:
            return None
        from fedxr.trust.operating import parse_rule

        kind, target = parse_rule(point["rule"])
        sens, spec = point["sensitivity"][0], point["specificity"][0]
        if kind == "sensitivity":
            return f"above the threshold for {target:.0%} sensitivity (specificity {spec:.2f} on validation)"
        if kind == "specificity":
            return f"above the threshold for {target:.0%} specificity (sensitivity {sens:.2f} on validation)"
        return f"above its threshold (Youden; sensitivity {sens:.2f}, specificity {spec:.2f} on validation)"

    def _label(self, prediction: Prediction, logits: np.ndarray, probs: np.ndarray, ood: float | None, gray: np.ndarray) -> None:
        prediction.probabilities = {l: round(float(v), 6) for l, v in zip(self.labels, probs)}
        reasons = []
        if ood is not None:
            assert self.ood is not None  # a score comes only from a file whose metadata describes the check
            prediction.ood_score = round(float(ood), 4)
            if ood > self.ood["threshold"]:
                reasons.append(f"its features lie {ood / self.ood['threshold']:.1f}x beyond the distance that "
                               f"{1 - self.ood['quantile']:.0%} of validation images exceed (score {ood:.2f}, threshold "
                               f"{self.ood['threshold']:.2f})")
        if float(gray.std()) < BLANK_STD:
            reasons.append("the image is blank (a single gray level)")
        if ood is not None or reasons:
            prediction.in_distribution = not reasons
            prediction.ood_reason = ("not like the images this model was trained on: " + "; ".join(reasons)) if reasons else None
        if prediction.withheld:
            return  # no confident list for an image the model is not for
        # Sorted by how far each clears its threshold (in logits: a probability margin means little near 0 or 1).
        margin = lambda v, t: np.log(v / (1 - v + 1e-12) + 1e-12) - np.log(t / (1 - t + 1e-12) + 1e-12)  # noqa: E731
        above = [(l, float(v), margin(float(v), float(t))) for l, v, t in zip(self.labels, probs, self.thresholds)
                 if v >= t and l not in self.unreliable]
        prediction.findings = [(l, round(v, 4)) for l, v, _ in sorted(above, key=lambda x: -x[2])]
        prediction.statements = {l: s for l, _ in prediction.findings if (s := self.statement(l))}

    def _prepare(self, index: int, item) -> tuple[Prediction, np.ndarray | None]:
        prediction = Prediction(input=f"array[{index}]" if isinstance(item, np.ndarray) else str(item))
        try:
            return prediction, self.preprocess(item)
        except (ImageReadError, FedxrError) as exc:
            prediction.error = str(exc)
        except Exception as exc:  # anything else one file can throw (a decoder's own error) fails that file only
            prediction.error = f"{prediction.input}: cannot be read ({type(exc).__name__}: {exc}); remove it or re-export it"
        return prediction, None

    def predict_iter(self, items: Iterable, batch_size: int = 8, workers: int | None = None) -> Iterator[Prediction]:
        """Predictions for paths and/or arrays, yielded in input order as they are ready.

        Images are decoded and resized by ``workers`` threads (default: one per core) while this thread runs
        the model: Pillow's and zlib's decoders, pydicom's pixel handlers and onnxruntime release the GIL,
        so a folder of large PNGs uses every core. At most ``2 × batch_size + 2 × workers`` images are held
        (a batch being assembled and the read-ahead), so memory stays flat however long the folder. An
        unreadable input gets ``error`` set and the others still run. Closing the iterator early cancels
        the read-ahead that has not started."""
        batch_size = max(1, batch_size)
        workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        window = batch_size + 2 * workers
        chunk: list[tuple[Prediction, np.ndarray | None]] = []

        def flush() -> Iterator[Prediction]:
            ready = [(p, g) for p, g in chunk if g is not None]
            if ready:
                logits, ood = self.run(self.preprocessing.batch([g for _, g in ready]))
                probs = self.probabilities(logits)
                for i, (p, g) in enumerate(ready):
                    self._label(p, logits[i], probs[i], None if ood is None else float(ood[i]), g)
            yield from (p for p, _ in chunk)
            chunk.clear()

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedxr-decode")
        try:
            pending: deque = deque()
            source = enumerate(items)
            exhausted = False
            while pending or not exhausted:
                while not exhausted and len(pending) < window:
                    nxt = next(source, None)
                    if nxt is None:
                        exhausted = True
                    else:
                        pending.append(pool.submit(self._prepare, *nxt))
                if pending:
                    chunk.append(pending.popleft().result())
                    if len(chunk) >= batch_size:  # errors count too: a run of bad files is reported as it comes
                        yield from flush()
            yield from flush()
        finally:  # also on break / Ctrl-C / a closed pipe: do not decode what nobody will read
            pool.shutdown(wait=False, cancel_futures=True)

    def predict(self, items: Iterable, batch_size: int = 8, workers: int | None = None) -> list[Prediction]:
        """All predictions of :meth:`predict_iter` as a list (input order)."""
        return list(self.predict_iter(items, batch_size, workers))


def load_model(path: str | Path, threads: int | None = None, labels: Sequence[str] | None = None,
               spinning: bool = False, verify: bool = True) -> EdgeModel:
    """Load an export folder, .onnx or .ort file for inference; a file its export manifest lists is checked
    against the manifest's size and SHA-256 first (``verify=False`` skips that)."""
    return EdgeModel(path, threads=threads, labels=labels, spinning=spinning, verify=verify)
