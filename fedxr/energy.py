"""Energy and emissions of training, with CodeCarbon's offline tracker (no network), and of edge inference.

Every training job (a federated run — the teacher, each student, each no-teacher ablation — and each
central or local baseline) is wrapped in :func:`tracked`, which writes ``energy.json`` beside the job's
outputs: Wh for CPU, GPU and RAM, g CO2e at the recipe's grid (``output.energy.country``), and how each
figure was obtained. On one machine (simulation, POC) the tracker runs in *machine* mode, so it covers
every site process and the server. CodeCarbon measures CPU power with Intel RAPL and GPU power with NVML
where it can; otherwise (this project's CI machine: no RAPL) it estimates CPU power from the processor's
TDP and its load, and RAM power from the memory size — such figures are labelled "estimated". A tracker
that cannot start never fails a run: the job runs and its energy.json says why there is no figure.

:func:`summarise` gathers a run's figures into ``RUN/energy.json`` with the comparisons the report shows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from fedxr.artifacts import ExportManifest, ManifestError
from fedxr.data.atomic import write_json_atomic

ENERGY_FILE = "energy.json"
#: CodeCarbon CPU modes that read a hardware power counter; every other mode is a model of power.
MEASURED_CPU_MODES = ("intel_rapl", "intel_power_gadget", "apple_powermetrics", "amd_rapl")
#: Per busy core, when no CPU power model is at hand (an edge-only install has no CodeCarbon).
ASSUMED_CORE_W = 10.0


def _methods(tracker) -> dict[str, str]:
    """How CodeCarbon obtained each figure on this machine."""
    methods = {"cpu": "none", "gpu": "none (no NVML device)", "ram": "estimated (CodeCarbon memory-size model)"}
    for hw in getattr(tracker, "_hardware", []):
        kind = type(hw).__name__
        if kind == "CPU":
            mode = getattr(hw, "_mode", "unknown")
            methods["cpu"] = (f"measured ({mode})" if mode in MEASURED_CPU_MODES
                              else f"estimated (CodeCarbon {mode}: TDP {getattr(hw, '_tdp', '?')} W x load)")
        elif kind == "GPU":
            methods["gpu"] = "measured (NVML)"
    return methods


def _cpu_tdp_w(tracker) -> float | None:
    for hw in getattr(tracker, "_hardware", []):
        if type(hw).__name__ == "CPU" and getattr(hw, "_tdp", None):
            return float(hw._tdp)
    return None


@contextlib.contextmanager
def tracked(folder: str | Path, stage: str, country: str | None) -> Iterator[None]:
    """Track the energy of the block; write ``folder/energy.json``. ``country`` None: tracking is off."""
    if country is None:
        yield
        return
    folder = Path(folder)
    record: dict = {"stage": stage, "country": country, "tracker": "codecarbon offline, machine mode"}
    tracker, t0 = None, time.time()
    try:
        from codecarbon import OfflineEmissionsTracker

        from codecarbon.input import DataSource

        logging.getLogger("codecarbon").setLevel(logging.CRITICAL)
        if country not in DataSource().get_global_energy_mix_data():
            record["warning"] = (f"CodeCarbon has no grid data for {country!r}: emissions use its world average; "
                                 "set output.energy.country to an ISO 3166-1 alpha-3 code such as USA or DEU")
        tracker = OfflineEmissionsTracker(country_iso_code=country, tracking_mode="machine", save_to_file=False,
                                          log_level="error", measure_power_secs=5, allow_multiple_runs=True)
        tracker.start()
    except Exception as exc:  # no codecarbon, an unknown country, no permission: the run goes on without a figure
        record["error"] = f"energy not tracked: {type(exc).__name__}: {exc}"
        tracker = None
    try:
        yield
    finally:
        record["seconds"] = round(time.time() - t0, 1)
        if tracker is not None:
            try:
                kg = tracker.stop()
                if kg is None:  # stop() swallows its own exceptions (CodeCarbon's @suppress) and returns None
                    raise RuntimeError("CodeCarbon's tracker.stop() returned no emissions figure")
                d = tracker.final_emissions_data
                record.update(
                    energy_wh=1000 * d.energy_consumed, cpu_wh=1000 * d.cpu_energy, gpu_wh=1000 * d.gpu_energy,
                    ram_wh=1000 * d.ram_energy, emissions_g=1000 * float(kg), cpu_power_w=d.cpu_power,
                    ram_power_w=d.ram_power, gpu_power_w=d.gpu_power, cpu_tdp_w=_cpu_tdp_w(tracker),
                    cpu_count=d.cpu_count, cpu_model=d.cpu_model, gpu_model=d.gpu_model or None,
                    methods=_methods(tracker), grams_per_kwh=(1000 * float(kg) / d.energy_consumed
                                                              if d.energy_consumed else None))
            except Exception as exc:
                record["error"] = f"energy tracker failed at the end: {type(exc).__name__}: {exc}"
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / ENERGY_FILE, record)


def read(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / ENERGY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def edge_energy_per_image_j(latency_ms: float, threads: int, core_w: float | None = None) -> float:
    """An estimate: joules per prediction = latency x the power of the busy cores (``core_w`` each)."""
    return latency_ms / 1000 * threads * (core_w or ASSUMED_CORE_W)


def summarise(layout, recipe_country: str) -> dict | None:
    """``RUN/energy.json``: every tracked job of the run, the total, per-site shares, and the comparisons
    (federated teacher vs local-only trainings; edge energy per 1,000 predictions; distillation break-even)."""
    from fedxr.records import read_records

    jobs = {}
    for name, folder in [("teacher (federated)", layout.federate),
                         *[(f"baseline {tag}", f) for tag, f in layout.baselines().items()],
                         *[(f"student {p.name}" if not p.name.endswith("_no_kd") else
                            f"ablation {p.name.removesuffix('_no_kd')} (no teacher)", p)
                           for p in sorted(layout.distill.glob("*")) if (p / ENERGY_FILE).is_file()]]:
        record = read(folder)
        if record is not None:
            jobs[name] = record
    if not jobs:
        return None
    measured = {k: v for k, v in jobs.items() if "energy_wh" in v}
    total = {k: sum(v.get(k, 0.0) for v in measured.values()) for k in ("energy_wh", "cpu_wh", "gpu_wh", "ram_wh",
                                                                         "emissions_g", "seconds")}
    out: dict = {"country": recipe_country, "jobs": jobs, "total": total,
                 "note": "machine-level tracking: on one machine each figure covers every site process and the server"}
    teacher = jobs.get("teacher (federated)", {})
    if "energy_wh" in teacher and (layout.federate / "records").is_dir():
        train_s: dict[str, float] = {}
        for r in read_records(layout.federate / "records"):
            train_s[r["site"]] = train_s.get(r["site"], 0.0) + r.get("train_s", 0.0) + r.get("validate_s", 0.0)
        work = sum(train_s.values())
        out["teacher_per_site"] = {s: {"share": t / work, "energy_wh": teacher["energy_wh"] * t / work,
                                       "basis": "apportioned by the site's training + validation time"}
                                   for s, t in sorted(train_s.items())} if work else {}
    local = {k: v for k, v in measured.items() if k.startswith("baseline local_")}
    if "energy_wh" in teacher and local:
        local_wh = sum(v["energy_wh"] for v in local.values())
        out["federated_vs_local"] = {"federated_teacher_wh": teacher["energy_wh"], "local_only_sum_wh": local_wh,
                                     "sites": sorted(k.removeprefix("baseline local_") for k in local),
                                     "ratio": teacher["energy_wh"] / local_wh if local_wh else None}
    return out


def edge_comparison(manifests: dict[str, str], core_w: float | None, training_wh: float | None,
                    cores: int = 1) -> dict | None:
    """Energy per 1,000 edge predictions (batch 1, the recommended file of each export, timed at export with
    ``cores`` busy cores) and the number of predictions after which the student's lower cost repays the energy
    spent distilling it."""
    rows: dict[str, dict[str, Any]] = {}
    for label, path in manifests.items():
        try:
            f = ExportManifest.read(path).recommended_file
        except ManifestError:
            continue
        if f.latency_ms_b1_p50:
            j = edge_energy_per_image_j(f.latency_ms_b1_p50, cores, core_w)
            rows[label] = {"file": f.file, "latency_ms": f.latency_ms_b1_p50, "wh_per_1000": j * 1000 / 3600}
    teacher = next((v for k, v in rows.items() if k.startswith("teacher")), None)
    students = {k: v for k, v in rows.items() if k.startswith("student")}
    if not rows:
        return None
    result: dict = {"per_1000_predictions": rows,
                    "basis": (f"estimate: batch-1 latency at export x {cores} busy core(s) x {core_w or ASSUMED_CORE_W:.1f} W"
                              + (" (CodeCarbon's TDP model)" if core_w else " (assumed)"))}
    if teacher and students and training_wh:
        for s in students.values():
            saved_wh = (teacher["wh_per_1000"] - s["wh_per_1000"]) / 1000
            s["break_even_predictions"] = round(training_wh / saved_wh) if saved_wh > 0 else None
        result["distillation_training_wh"] = training_wh
    return result
