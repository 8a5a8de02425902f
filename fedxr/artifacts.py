"""Typed, torch-free views of the artifacts fedxr writes and reads back across modules.

An export folder's ``manifest.json`` is written by :mod:`fedxr.export.exporter` and read by the pipeline, the
report, the energy estimate, the edge runtime and the console. They read it through :class:`ExportManifest`,
so a renamed key fails here, in one place, with the file named — not somewhere else at run time. The same
holds for a federated run's ``summary.json`` (:class:`FederateSummary`: what the engine returns to the pipeline,
distillation, the CLI and the benchmarks, and writes) and an evaluation's ``metrics.json`` (:class:`EvalResult`:
returned by ``fedxr evaluate``, read back by the report and the console).
The JSON on disk keeps its keys (they are what the classes' fields are called); keys a reader does not need
stay in ``extra``. Each file carries ``schema_version``: a file without one is version 1 (what fedxr wrote
before the field existed, the same layout); a newer version than this fedxr knows is a clear error naming
both. Standard library only: the edge runtime (no torch) reads manifests too.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from fedxr.errors import FedxrError

MANIFEST_FILE = "manifest.json"


#: The layout version of each artifact this fedxr writes and reads (``schema_version`` in the file).
MANIFEST_VERSION = 1
FEDERATE_SUMMARY_VERSION = 1
EVAL_RESULT_VERSION = 1


class ManifestError(FedxrError):
    """An export manifest that is missing, unreadable or not an export manifest."""


class ArtifactError(FedxrError):
    """A run artifact (summary.json, metrics.json) that is missing, unreadable or from a newer fedxr."""


def _version(data: dict[str, Any], known: int, where: Any, error: type[FedxrError]) -> int:
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise error(f"{where}: schema_version {version!r} is not a version fedxr writes; write the file again")
    if version > known:
        raise error(f"{where}: written with layout version {version}, but this fedxr reads up to version {known}; "
                    "upgrade fedxr (pip install -U fedxr) or rerun the stage with this one")
    return version


@dataclass(frozen=True)
class ExportedFile:
    """One model file of an export: what it is, how it scored and ran at export, and its digest."""
    file: str
    format: str
    kept: bool = True
    val_auroc: Optional[float] = None
    latency_ms_b1_p50: Optional[float] = None
    size_bytes: Optional[int] = None
    sha256: Optional[str] = None
    parity_ok: Optional[bool] = None
    extra: dict[str, Any] = field(default_factory=dict)  # parity figures, OOD agreement, ORT conversion details

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ExportedFile":
        return cls(**_split(cls, data))

    def to_json(self) -> dict[str, Any]:
        return _join(self)

    def as_row(self) -> dict[str, Any]:
        """Every field (``None`` where the manifest has no value) with the extra keys: for tables and templates."""
        return {**self.extra, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}}


@dataclass(frozen=True)
class ExportManifest:
    """``EXPORT/manifest.json``: the files of one exported model, the checks they passed and the one to use."""
    files: tuple[ExportedFile, ...]
    recommended: str
    ok: bool = True
    model_name: Optional[str] = None
    checkpoint: Optional[str] = None
    target: Optional[str] = None
    input_size: Optional[int] = None
    int8_decision: Optional[str] = None
    trained_on: Optional[dict[str, Any]] = None
    trust: Optional[dict[str, Any]] = None
    schema_version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # runtime versions, operators config, usability, ...
    folder: Optional[Path] = field(default=None, compare=False)  # where it was read from (not written)

    @property
    def recommended_file(self) -> ExportedFile:
        """The entry of the file the export recommends (the fastest kept file that passed its checks)."""
        found = self.file(self.recommended)
        if found is None:
            raise ManifestError(f"{self._where()}: recommends {self.recommended!r}, which its files do not list; "
                                "export the model again")
        return found

    def file(self, name: str) -> ExportedFile | None:
        return next((f for f in self.files if f.file == name), None)

    @property
    def synthetic(self) -> bool:
        return bool((self.trained_on or {}).get("synthetic"))

    @classmethod
    def from_json(cls, data: Any, folder: Path | None = None) -> "ExportManifest":
        where = folder / MANIFEST_FILE if folder else "export manifest"
        if not isinstance(data, dict) or not isinstance(data.get("files"), list) or "recommended" not in data:
            raise ManifestError(f"{where}: not an export manifest (it needs 'files' and 'recommended'); export the "
                                "model again with `python -m fedxr.export CKPT`")
        bad = next((f for f in data["files"] if not isinstance(f, dict)), None)
        if bad is not None:
            raise ManifestError(f"{where}: a file entry is {type(bad).__name__}, not an object; export the model again")
        _version(data, MANIFEST_VERSION, where, ManifestError)
        try:
            files = tuple(ExportedFile.from_json(f) for f in data["files"])
        except TypeError as exc:
            raise ManifestError(f"{where}: a file entry is not one fedxr wrote ({exc}); export the model again") from None
        values = _split(cls, {k: v for k, v in data.items() if k not in ("files", "out")})
        return cls(files=files, folder=folder, **values)

    @classmethod
    def read(cls, path: str | Path) -> "ExportManifest":
        """The manifest of an export folder (or the manifest file itself)."""
        path = Path(path)
        file = path / MANIFEST_FILE if path.is_dir() else path
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{file}: no export manifest here; export the model with `python -m fedxr.export "
                                "CKPT`") from None
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{file}: the export manifest cannot be read ({exc}); copy the export folder again "
                                "or export again") from None
        return cls.from_json(data, folder=file.parent)

    def to_json(self) -> dict[str, Any]:
        out = _join(self, skip=("folder",))
        out["files"] = [f.to_json() for f in self.files]
        return out

    def _where(self) -> str:
        return str(self.folder / MANIFEST_FILE) if self.folder else "export manifest"


def _split(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The dataclass's own fields from ``data``; every other key goes to ``extra``."""
    names = {f.name for f in fields(cls)} - {"extra", "folder", "files"}
    return {**{k: v for k, v in data.items() if k in names}, "extra": {k: v for k, v in data.items() if k not in names}}


def _join(obj: Any, skip: tuple[str, ...] = (), keep_none: bool = False) -> dict[str, Any]:
    """The JSON form: the fields (``None`` left out, as the exporter never wrote them, unless ``keep_none``) with
    ``extra`` merged in."""
    out = {f.name: getattr(obj, f.name) for f in fields(obj)
           if f.name not in ("extra", "files", *skip) and (keep_none or getattr(obj, f.name) is not None)}
    return {**out, **obj.extra}


def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no {what} here; {fix}") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: the {what} cannot be read ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: not a {what} (a JSON object); {fix}")
    return data


def _from_json(cls: type, data: dict[str, Any], where: Any, known: int, what: str) -> Any:
    _version(data, known, where, ArtifactError)
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise ArtifactError(f"{where}: not a {what}: it lacks {', '.join(missing)}; rerun the stage that wrote it")
    return cls(**_split(cls, data))


@dataclass(frozen=True)
class FederateSummary:
    """A federated run's ``summary.json`` (the teacher's ``federate/``, each student's stage): where its models,
    round table and records are, how long it took and in which environment."""
    checkpoint: str                           # the model this run stands for: best global model, else the last
    checkpoints: dict[str, str]               # "global_best" / "global_last" → checkpoint
    workspace: str                            # NVFlare's workspace (logs of the server and each site)
    server_run: str
    tensorboard: str
    env: Optional[str] = None                 # sim / poc / prod (None: a summary.json from before it was recorded)
    wall_s: Optional[float] = None
    rounds: Optional[str] = None              # rounds.json: per round and site, validation AUROC and times
    cross_site: Optional[str] = None          # cross_site.json, when the recipe asks for cross-site evaluation
    selection: Optional[dict[str, Any]] = None  # why global_best is the in-round best or the last model
    outgoing: Optional[str] = None            # outgoing.json: what left each site (privacy.audit)
    privacy: Optional[str] = None             # privacy.json: the DP ledger
    teacher: Optional[str] = None             # a distillation stage: the teacher it learnt from
    resumed_from: Optional[int] = None        # the round this run resumed an interrupted one at (None: from round 0)
    schema_version: int = FEDERATE_SUMMARY_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    FILE = "summary.json"

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Any = "federated run summary") -> "FederateSummary":
        return _from_json(cls, data, where, FEDERATE_SUMMARY_VERSION, "federated run summary")

    @classmethod
    def read(cls, path: str | Path) -> "FederateSummary":
        """A stage folder's summary (or the file itself)."""
        path = Path(path)
        file = path / cls.FILE if path.is_dir() else path
        return cls.from_json(_read_json(file, "federated run summary", "rerun the federated stage"), where=file)

    def to_json(self) -> dict[str, Any]:
        return _join(self)


@dataclass(frozen=True)
class ExportedJob:
    """``fedxr federate --export-job DIR``: the NVFlare job written for an admin to submit (nothing ran)."""
    exported: str


@dataclass(frozen=True)
class EvalResult:
    """``fedxr evaluate``'s ``metrics.json``: one checkpoint scored on one split — per-label AUROC / AP, the macro
    with its bootstrap interval, sensitivity and specificity at the checkpoint's thresholds."""
    checkpoint: str
    model_name: str
    split: str
    data: str
    images: int
    macro_auroc: Optional[float]
    auroc: dict[str, Optional[float]]
    counted: Optional[list[str]] = None       # the labels with enough positives and negatives to be averaged
    image_size: Optional[int] = None          # the checkpoint's input size (metrics.json before fd8fcda lacks it)
    macro_auroc_ci95: Optional[list[float]] = None
    macro_auroc_all: Optional[float] = None
    macro_ap: Optional[float] = None
    ap: dict[str, Optional[float]] = field(default_factory=dict)
    min_positives: Optional[int] = None
    positives: dict[str, int] = field(default_factory=dict)
    known: dict[str, int] = field(default_factory=dict)      # per label: images whose label is known
    unknown: list[str] = field(default_factory=list)         # labels no image of the split has a known label for
    prevalence: dict[str, Optional[float]] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)        # labels left out of the macro (one class, or unknown)
    note: Optional[str] = None
    at_thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    bootstrap: Optional[dict[str, Any]] = None
    schema_version: int = EVAL_RESULT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    out: Optional[str] = field(default=None, compare=False)  # the folder it was written to (not in the file)

    FILE = "metrics.json"

    @property
    def metrics_file(self) -> Path:
        if self.out is None:
            raise ArtifactError(f"the evaluation of {self.checkpoint} was not written to a folder")
        return Path(self.out) / self.FILE

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Any = "evaluation metrics", out: str | None = None) -> "EvalResult":
        result = _from_json(cls, {k: v for k, v in data.items() if k != "out"}, where, EVAL_RESULT_VERSION,
                            "fedxr evaluation (metrics.json)")
        return replace(result, out=out)

    @classmethod
    def read(cls, path: str | Path) -> "EvalResult":
        """An evaluation folder's ``metrics.json`` (or the file itself)."""
        path = Path(path)
        file = path / cls.FILE if path.is_dir() else path
        data = _read_json(file, "evaluation (metrics.json)", "score the checkpoint again with `fedxr evaluate`")
        return cls.from_json(data, where=file, out=str(file.parent))

    def to_json(self) -> dict[str, Any]:
        return _join(self, skip=("out",), keep_none=True)  # an AUROC that is None (one class) is written as null
