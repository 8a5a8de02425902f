"""What the console shows, read from the run folders and export folders fedxr writes (read-only).

Everything here goes through :class:`fedxr.layout.RunLayout` and the typed stage results, never guesses
paths, and accepts only names that are plain folder names under the configured roots: a name from a URL
can never reach outside them. Torch-free: the console runs where only the edge runtime is installed.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any
from pathlib import Path

from fedxr.artifacts import MANIFEST_FILE, ArtifactError, EvalResult, ExportManifest, ManifestError
from fedxr.errors import FedxrError
from fedxr.records import RecordsError, read_records, round_table
from fedxr.layout import RunLayout, read_sites_summary

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: Run-folder images the run page may show (written by fedxr; anything else is not served).
RUN_IMAGES = {"rounds": "federate/rounds.png", "cross_site": "federate/cross_site.png",
              "roc": "evaluate/roc_curves.png", "distill": "distill/distill_report.png",
              "gradcam": "explain/gradcam_grid.png", "prevalence": "report_prevalence.png",
              "edge_federation": "edge_federation/versions.png"}


def tail(path: Path, limit: int) -> str:
    """The last ``limit`` bytes of a (possibly long, growing) log, read without loading the whole file."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - limit))
        return fh.read().decode(errors="replace")


class NotFound(FedxrError):
    pass


def _plain_name(name: str, what: str) -> str:
    if not _NAME.match(name or "") or name in (".", ".."):
        raise NotFound(f"no {what} {name!r}")
    return name


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _json_dict(path: Path) -> dict | None:
    """A JSON object fedxr wrote, or None when it is missing, unreadable or not an object."""
    data = _json(path)
    return data if isinstance(data, dict) else None


def _json_list(path: Path) -> list | None:
    data = _json(path)
    return data if isinstance(data, list) else None


def run_layout(runs: Path, name: str) -> RunLayout:
    layout = RunLayout(Path(runs) / _plain_name(name, "run"))
    if not layout.root.is_dir():
        raise NotFound(f"no run {name!r} under {runs}")
    return layout


def _alive(pid: Any, started: Any) -> bool:
    """Whether the process that wrote a run status (``pid``, which began at ``started``) is still running. A pid is
    reused after its process ends (after a reboot, soon): a process with that pid that began after the run
    started is another one; a zombie has ended."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists (its start time is checked below)
        pass
    began = _process_start(pid)
    if began is None:
        return True  # no /proc (not Linux): the pid alone has to do
    state, began_at = began
    return state != "Z" and (not isinstance(started, (int, float)) or began_at <= started + 2)


def _process_start(pid: int) -> tuple[str, float] | None:
    """(state, start time in seconds since the epoch) of a process, from Linux's /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_state(layout: RunLayout) -> dict | None:
    """How `fedxr run` stands on this run folder (``run_status.json``): running, finished, failed or interrupted,
    and at which stage. A run marked running whose process is gone on this machine (killed outright, or the
    machine restarted) is interrupted. None for a run folder written before the status file existed."""
    status = _json_dict(layout.run_status)
    if not status or not isinstance(status.get("state"), str):
        return None
    if (status["state"] == "running" and status.get("host") == socket.gethostname()
            and not _alive(status.get("pid"), status.get("started"))):
        status = {**status, "state": "interrupted", "why": "its process is gone (killed, or the machine restarted)"}
    return status


def stages(layout: RunLayout) -> dict[str, dict]:
    """Each stage's state from pipeline.json: ran (with seconds), skipped or disabled; plus the stage `fedxr run`
    is in (``running``), or where it stopped (``failed``, ``interrupted``)."""
    state = _json_dict(layout.pipeline_state) or {}
    from fedxr.pipeline import STAGE_NAMES

    # In the stages' order (a stage added to fedxr after a run was made comes last in its pipeline.json).
    order = {name: i for i, name in enumerate(STAGE_NAMES)}
    out = {name: {"done": bool(s.get("result") or s.get("results")), "disabled": s.get("run_id") == "disabled",
                  "seconds": s.get("seconds")}
           for name, s in sorted(state.items(), key=lambda kv: order.get(kv[0], len(order))) if isinstance(s, dict)}
    done = {k for k, v in out.items() if v["done"]}
    run = run_state(layout)
    if run is not None:
        stage = run.get("stage")
        if run["state"] in ("running", "failed", "interrupted") and isinstance(stage, str):
            # The stage `fedxr run` is in (or stopped in) wins over an earlier run's result for it in pipeline.json
            # (a rerun with --from or changed settings keeps the old result there until it succeeds).
            entry = out.setdefault(stage, {"done": False, "disabled": False, "seconds": None})
            entry.update(done=False, **{run["state"]: True})
        return out
    # Older run folders: the stage whose log was written last, if it is not done, is taken to be running.
    logs = sorted(layout.root.glob("logs/*.log"), key=lambda p: p.stat().st_mtime)
    if logs and logs[-1].stem not in done:
        out.setdefault(logs[-1].stem, {"done": False, "disabled": False, "seconds": None})["running"] = True
    return out


def _evaluation(layout: RunLayout) -> EvalResult | None:
    """The teacher's pooled-test evaluation of a run, or None while (or if) it has none."""
    try:
        return EvalResult.read(layout.evaluate)
    except ArtifactError:
        return None


def list_runs(runs: Path) -> list[dict]:
    """Every run folder under ``runs``: name, stages done, teacher and student macro AUROC, last update."""
    rows = []
    for folder in sorted(Path(runs).iterdir()) if Path(runs).is_dir() else []:
        layout = RunLayout(folder)
        if not _NAME.match(folder.name) or not (layout.pipeline_state.is_file() or layout.federate.is_dir()
                                                or layout.run_status.is_file()):
            continue
        stage_state = stages(layout)
        report = _json_dict(layout.distill / "distill_report.json") or {}
        students = {n: r.get("macro_auroc") for n, r in (report.get("students") or {}).items()}
        recipe = _recipe_name(layout)
        times = [p.stat().st_mtime for p in (layout.pipeline_state, *layout.root.glob("federate/records/*.jsonl"))
                 if p.is_file()]
        rows.append({"name": folder.name, "recipe": recipe, "stages_done": [k for k, v in stage_state.items() if v["done"]],
                     "running": next((k for k, v in stage_state.items() if v.get("running")), None),
                     "stopped": next(({"stage": k, "how": how} for k, v in stage_state.items()
                                      for how in ("failed", "interrupted") if v.get(how)), None),
                     "teacher_macro_auroc": (teacher.macro_auroc if (teacher := _evaluation(layout)) else None),
                     "students_macro_auroc": students, "updated": max(times) if times else None})
    return rows


def _recipe_name(layout: RunLayout) -> str | None:
    """The model and algorithm of the run's resolved recipe (a short description for the list)."""
    text = (layout.federate / "fedxr_recipe.yaml")
    if not text.is_file():
        return None
    found = dict(re.findall(r"^\s{2}(name|algorithm|rounds): (\S+)$", text.read_text(), re.M))
    return " · ".join(v for v in (found.get("name"), found.get("algorithm"), found.get("rounds") and
                                  f"{found['rounds']} rounds") if v) or None


def rounds(layout: RunLayout) -> list[dict]:
    """Per round and site: validation AUROC of the received global model and the site's training time.
    Read from the sites' records while a run is going (simulation, POC), else from rounds.json."""
    try:
        rows = read_records(layout.federate / "records") if (layout.federate / "records").is_dir() else []
    except RecordsError:  # a damaged line: the page shows the stage's finished table, if any (the run reports it)
        rows = []
    if rows:
        return round_table(rows, _json_dict(layout.federate / "cross_site.json"))
    return _json_list(layout.federate / "rounds.json") or []


def run_detail(runs: Path, name: str) -> dict:
    layout = run_layout(runs, name)
    report = _json(layout.distill / "distill_report.json")
    models = None
    if isinstance(report, dict):
        t = report.get("teacher", {})
        models = [{"model": f"teacher {t.get('model_name')}", "macro_auroc": t.get("macro_auroc"),
                   "ci95": t.get("macro_auroc_ci95"), "mmacs": (t.get("macs") or 0) / 1e6, "vs_teacher": None,
                   "kd_gain": None}]
        for n, r in (report.get("students") or {}).items():
            models.append({"model": f"{n} (KD)", "macro_auroc": r.get("macro_auroc"), "ci95": r.get("macro_auroc_ci95"),
                           "mmacs": (r.get("macs") or 0) / 1e6, "vs_teacher": r.get("auroc_vs_teacher"),
                           "kd_gain": r.get("kd_gain")})
    cross = _json(layout.federate / "cross_site.json")
    return {"name": name, "stages": stages(layout), "run_state": run_state(layout), "rounds": rounds(layout),
            "cross_site": cross.get("by_data_site") if isinstance(cross, dict) else None,
            "teacher_metrics": teacher.to_json() if (teacher := _evaluation(layout)) else None, "models": models,
            "images": {k: v for k, v in RUN_IMAGES.items() if (layout.root / v).is_file()},
            "report": layout.report.read_text() if layout.report.is_file() else None}


def run_image(runs: Path, name: str, key: str) -> Path:
    layout = run_layout(runs, name)
    path = (layout.root / RUN_IMAGES.get(key, "-")).resolve()
    if key not in RUN_IMAGES or not path.is_file() or not path.is_relative_to(Path(runs).resolve()):
        raise NotFound(f"run {name!r} has no {key!r} image")
    return path


def sites(runs: Path) -> list[str]:
    names: set[str] = set()
    for folder in Path(runs).iterdir() if Path(runs).is_dir() else []:
        names.update(p.stem for p in (folder / "sites").glob("site-*.csv"))
    return sorted(names)


def site_detail(runs: Path, site: str) -> dict:
    """One hospital's view: per run, its data summary, its validation score and training time per round."""
    site = _plain_name(site, "site")
    per_run = []
    for folder in sorted(Path(runs).iterdir()) if Path(runs).is_dir() else []:
        layout = RunLayout(folder)
        if not (layout.sites / f"{site}.csv").is_file():
            continue
        try:
            summary = next((s for s in read_sites_summary(layout.sites)["sites"] if s["site"] == site), None)
        except FedxrError:
            summary = None
        table = [{"round": r["round"], **r["sites"][site]} for r in rounds(layout) if site in r.get("sites", {})]
        local = layout.fedbn_model(site)
        per_run.append({"run": folder.name, "data": summary, "rounds": table,
                        "local_model": local.name if local.is_file() else None})
    if not per_run:
        raise NotFound(f"no run has data of site {site!r}")
    return {"site": site, "runs": per_run}


# --- exported models ----------------------------------------------------------------------------------

def list_models(exports: Path) -> list[dict]:
    """Every export folder's manifest: files (format, size, SHA-256, AUROC, latency, kept), INT8 decision."""
    out = []
    for manifest in sorted(Path(exports).glob(f"*/{MANIFEST_FILE}")) if Path(exports).is_dir() else []:
        if not _NAME.match(manifest.parent.name):
            continue
        try:
            m = ExportManifest.read(manifest)
        except ManifestError:
            continue  # not an export this console can show
        files = [dict(f.as_row(), available=(manifest.parent / f.file).is_file()) for f in m.files
                 if isinstance(f.file, str) and _NAME.match(f.file)]
        card = manifest.parent / "MODEL_CARD.md"
        trust = m.trust if isinstance(m.trust, dict) else {}
        out.append({"folder": manifest.parent.name, "model_name": m.model_name, "input_size": m.input_size,
                    "recommended": m.recommended, "int8_decision": m.int8_decision, "ok": m.ok,
                    "checkpoint": m.checkpoint, "files": files, "synthetic": m.synthetic,
                    "card": card.read_text() if card.is_file() else None,
                    "ood": trust.get("ood", {}).get("threshold") if isinstance(trust.get("ood"), dict) else None})
    return out


def model_file(exports: Path, folder: str, file: str) -> Path:
    """The path of a downloadable file: listed in its folder's manifest, present, and — after resolving
    links — inside that folder. Anything else is NotFound (traversal, absolute paths, links out)."""
    folder, file = _plain_name(folder, "model folder"), _plain_name(file, "file")
    base = (Path(exports) / folder).resolve()
    if not base.is_relative_to(Path(exports).resolve()):  # a linked export folder pointing elsewhere
        raise NotFound(f"no export {folder!r}")
    try:
        listed = {f.file for f in ExportManifest.read(base / MANIFEST_FILE).files}
    except ManifestError:
        listed = set()
    path = (base / file)
    if file not in listed or not path.is_file() or path.resolve().parent != base:
        raise NotFound(f"no file {file!r} in the export {folder!r}")
    return path.resolve()


def model_folder(exports: Path, folder: str) -> Path:
    path = Path(exports) / _plain_name(folder, "model folder")
    if not (path / MANIFEST_FILE).is_file():
        raise NotFound(f"no exported model {folder!r}")
    return path
