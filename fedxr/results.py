"""What each stage of a run hands to the next: small typed results instead of dicts with string keys.

``fedxr run`` keeps them in ``RUN/pipeline.json`` (their JSON form) so a skipped stage's result is read
back; the report, the console and ``fedxr distill`` read the same types. Each result lists the files
that must exist for the stage to count as done (``outputs``). Paths are strings, as stored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class StageResult:
    def outputs(self) -> list[str]:
        """Files whose existence means the stage's work is on disk."""
        return []

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StageResult | None":
        """The result from its JSON form, or None when it was written by another fedxr version (the stage
        then reruns rather than guessing)."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError, AttributeError):
            return None


@dataclass(frozen=True)
class DataResult(StageResult):
    root: str

    def outputs(self) -> list[str]:
        return [self.root]


@dataclass(frozen=True)
class SitesResult(StageResult):
    sites: str  # the manifest folder; its sites.json is the output

    def outputs(self) -> list[str]:
        from fedxr.layout import SITES_SUMMARY_FILE

        return [str(Path(self.sites) / SITES_SUMMARY_FILE)]


@dataclass(frozen=True)
class TeacherResult(StageResult):
    checkpoint: str              # the federated teacher: best global model, else the last
    rounds: Optional[str] = None  # rounds.json (per-round, per-site validation AUROC)

    def outputs(self) -> list[str]:
        return [self.checkpoint]


@dataclass(frozen=True)
class StudentResult(StageResult):
    kd: str                      # the distilled student's checkpoint
    no_kd: Optional[str] = None  # the same student trained without the teacher (ablation)


@dataclass(frozen=True)
class DistillResult(StageResult):
    teacher: str
    students: dict[str, StudentResult] = field(default_factory=dict)

    def outputs(self) -> list[str]:
        return [s.kd for s in self.students.values()]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DistillResult | None":
        try:
            students = {name: StudentResult(**s) for name, s in data["students"].items()}
            return cls(teacher=data["teacher"], students=students)
        except (TypeError, KeyError, AttributeError):
            return None


@dataclass(frozen=True)
class ExportResult(StageResult):
    manifests: dict[str, str]  # "teacher NAME" / "student NAME" → its manifest.json
    edge_model: str            # the export folder to try on a laptop or a board: the smallest model

    def outputs(self) -> list[str]:
        return list(self.manifests.values())


@dataclass(frozen=True)
class EvaluateResult(StageResult):
    metrics: str                          # the teacher's pooled-test metrics.json
    distill_report: Optional[str] = None  # distill_report.json, when the run has students
    per_site: Optional[str] = None        # per_site.json: every model on each site's own test split

    def outputs(self) -> list[str]:
        return [self.metrics] + [p for p in (self.distill_report, self.per_site) if p]


@dataclass(frozen=True)
class ExplainResult(StageResult):
    grid: str
    pointing_game: str

    def outputs(self) -> list[str]:
        return [self.grid, self.pointing_game]


@dataclass(frozen=True)
class EdgeResult(StageResult):
    summary: str  # edge_federation/summary.json: versions, the updates behind them, the test gain
    final: str    # the last version as a fedxr checkpoint (`python -m fedxr.export` takes it)

    def outputs(self) -> list[str]:
        return [self.summary, self.final]


@dataclass(frozen=True)
class ReportResult(StageResult):
    report: str

    def outputs(self) -> list[str]:
        return [self.report]


@dataclass
class RunResults:
    """Every stage's result in one run (None: not run, or disabled by the recipe) and stage seconds."""

    data: Optional[DataResult] = None
    sites: Optional[SitesResult] = None
    teacher: Optional[TeacherResult] = None
    distill: Optional[DistillResult] = None
    export: Optional[ExportResult] = None
    evaluate: Optional[EvaluateResult] = None
    explain: Optional[ExplainResult] = None
    edge: Optional[EdgeResult] = None
    report: Optional[ReportResult] = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def students(self) -> dict[str, StudentResult]:
        return self.distill.students if self.distill else {}
