"""Typed, torch-free views of the artifacts fedxr writes and reads back across modules.

An export folder's ``manifest.json`` is written by :mod:`fedxr.export.exporter` and read by the pipeline, the
report, the energy estimate, the edge runtime and the console. They read it through :class:`ExportManifest`,
so a renamed key fails here, in one place, with the file named — not somewhere else at run time. The JSON
on disk is unchanged (its keys are what the classes' fields are called); keys a reader does not need stay
in ``extra``. Standard library only: the edge runtime (no torch) reads manifests too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from fedxr.errors import FedxrError

MANIFEST_FILE = "manifest.json"


class ManifestError(FedxrError):
    """An export manifest that is missing, unreadable or not an export manifest."""


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


def _join(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON form: the fields (``None`` left out, as the exporter never wrote them) with ``extra`` merged in."""
    out = {f.name: getattr(obj, f.name) for f in fields(obj)
           if f.name not in ("extra", "files", *skip) and getattr(obj, f.name) is not None}
    return {**out, **obj.extra}
