"""Where everything of a run lives: the one owner of the run folder's paths and file names.

    runs/NAME/                      RunLayout.root
      pipeline.json, logs/STAGE.log  `fedxr run` state and stage logs
      sites/site-N.csv, sites.json   site manifests and their summary
      federate/                      the federated teacher (global_best.ckpt, global_last.ckpt, rounds.json, ...)
      distill/STUDENT[_no_kd]/       each student's federated run (and its no-teacher ablation)
      distill/                       distill_report.json and .png, the students' test scores
      train_central/, train_local_SITE/   baselines (best.ckpt, last.ckpt)
      evaluate/, explain/, report.md
    export/NAME_MODEL/, export/NAME_student_MODEL/   exported ONNX files (``export.out``)

Torch-, pandas- and pydantic-free: the console and the edge-only install can read run folders with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedxr.errors import DataError, FedxrError

SITES_SUMMARY_FILE = "sites.json"
#: Federated runs write the global model NVFlare chose (best) and the one after the last round (last);
#: centralised and single-site training write best.ckpt and last.ckpt. "best, else last" is
#: :func:`chosen_checkpoint`.
GLOBAL_BEST, GLOBAL_LAST = "global_best.ckpt", "global_last.ckpt"
BEST, LAST = "best.ckpt", "last.ckpt"
_PREFERENCE = (GLOBAL_BEST, BEST, GLOBAL_LAST, LAST)


def chosen_checkpoint(folder: str | Path) -> Path:
    """The model a run folder stands for: its best checkpoint, else its last (a toy run may have no best:
    NVFlare records one only when a validation score improved)."""
    folder = Path(folder)
    for name in _PREFERENCE:
        if (folder / name).is_file():
            return folder / name
    raise FedxrError(f"{folder}: no checkpoint ({', '.join(_PREFERENCE)}); run the stage that writes it "
                     "(e.g. `fedxr federate RECIPE`) or pass the checkpoint's path")


def read_sites_summary(folder: str | Path) -> dict:
    """A manifest folder's ``sites.json``: {"settings": split settings incl. the data ``root``, "sites": [per-site
    counts and prevalence]}. A missing or unreadable file is a DataError naming the command that writes it."""
    path = Path(folder) / SITES_SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; site manifests and their summary are written by "
                        "`fedxr data prepare RECIPE` (or `fedxr data split ROOT --out DIR`)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); write the manifests again with `fedxr data prepare RECIPE --force`") from None


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run. Build it with :meth:`of` (from a recipe) or :meth:`of_resolved` (from the
    resolved recipe a checkpoint carries)."""

    root: Path
    export_root: Path = Path("export")

    @classmethod
    def of(cls, recipe) -> "RunLayout":
        return cls(Path(recipe.output.runs_dir) / recipe.output.name, Path(recipe.export.out))

    @classmethod
    def of_resolved(cls, resolved: Mapping[str, Any]) -> "RunLayout | None":
        """The layout of the run a resolved recipe (e.g. ``checkpoint["recipe"]``) describes, or None."""
        out = resolved.get("output") or {}
        if not out.get("name"):
            return None
        return cls(Path(out.get("runs_dir", "runs")) / out["name"], Path((resolved.get("export") or {}).get("out", "export")))

    @property
    def name(self) -> str:
        return self.root.name

    # --- data -------------------------------------------------------------------------------------------
    @property
    def sites(self) -> Path:
        return self.root / "sites"

    @property
    def sites_summary(self) -> Path:
        return self.sites / SITES_SUMMARY_FILE

    # --- training stages --------------------------------------------------------------------------------
    FEDERATE = "federate"

    @property
    def federate(self) -> Path:
        return self.root / self.FEDERATE

    @property
    def distill(self) -> Path:
        return self.root / "distill"

    @staticmethod
    def student_stage(student: str, with_teacher: bool = True) -> str:
        """The sub-folder (and NVFlare job suffix) of a student's run, relative to the run folder."""
        return f"distill/{student}" if with_teacher else f"distill/{student}_no_kd"

    def stage(self, stage: str) -> Path:
        """The folder of a federated stage: ``federate`` or a :meth:`student_stage`."""
        return self.root / stage

    def train(self, tag: str) -> Path:
        """A centralised or single-site baseline: ``central`` or ``local_SITE``."""
        return self.root / f"{self._TRAIN}{tag}"

    def fedbn_sites(self, stage: str = "federate") -> Path:
        """Each site's own model of a FedBN federation (fedxr.federated.fedbn): the teacher's, or a student's
        (``stage`` as for :meth:`stage`)."""
        return self.stage(stage) / "fedbn_sites"

    def fedbn_model(self, site: str, stage: str = "federate") -> Path:
        """A site's personalised FedBN model (global layers + its own BatchNorm), where one was saved."""
        return self.fedbn_sites(stage) / f"{site}.ckpt"

    def baselines(self) -> dict[str, Path]:
        """The finished baselines of this run: {tag: folder holding summary.json}."""
        return {p.parent.name.removeprefix(self._TRAIN): p.parent
                for p in sorted(self.root.glob(f"{self._TRAIN}*/summary.json"))}

    _TRAIN = "train_"

    @property
    def edge_federation(self) -> Path:
        """``fedxr edge-federate``: the student fine-tuned across simulated devices (fedxr.crossdevice)."""
        return self.root / "edge_federation"

    # --- results ----------------------------------------------------------------------------------------
    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    @property
    def explain(self) -> Path:
        return self.root / "explain"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def energy(self) -> Path:
        """The run's energy summary (each training job also keeps its own energy.json in its folder)."""
        from fedxr.energy import ENERGY_FILE

        return self.root / ENERGY_FILE

    @property
    def pipeline_state(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def run_status(self) -> Path:
        """``run_status.json``: whether `fedxr run` is going on this run folder (its process and host), or how it
        ended: finished, failed or interrupted (a process killed outright leaves "running" with a dead pid)."""
        return self.root / "run_status.json"

    def log(self, stage: str) -> Path:
        return self.root / "logs" / f"{stage}.log"

    def export(self, model_name: str, student: bool = False) -> Path:
        """One exported model's folder: ``export/NAME_MODEL`` (teacher) or ``export/NAME_student_MODEL``."""
        return self.export_root / (f"{self.name}_student_{model_name}" if student else f"{self.name}_{model_name}")
