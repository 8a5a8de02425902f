"""Devices that learn together: the quickstart student fine-tuned across simulated devices (NVFlare edge).

    python benchmarks/edge_federation.py                  # after `make demo`: 1,000 devices at a 4th hospital
    python benchmarks/edge_federation.py --rows scale     # 100, 1,000 and 10,000 devices: time, server memory
    python benchmarks/edge_federation.py --smoke          # toy data, 12 devices, 3 versions

The population is a hospital the student never saw: the phantom generated again with a 4th hospital (its own
acquisition profile and case mix, new patients), split by hospital, and the 4th hospital's training films dealt
out to the devices (5-50 each), with 30 % of tasks dropped mid-task and 10 % answered late. Rows:

* ``gain`` — the student before and after, on the 4th hospital's test split: macro AUROC with the paired 95 %
  bootstrap interval of the gain (goal: it excludes zero);
* ``stale`` — a third of the devices straggle long enough that their updates arrive two or more versions old:
  staleness weighting (NVFlare's 1/(1+sqrt(age))) off and on;
* ``dp`` — the ``gain`` row with differential privacy per device (ε = 8 per device over at most 3 updates);
* ``scale`` — 100, 1,000 and 10,000 devices, a few versions each: seconds per version and the peak resident
  memory of this process and its children (NVFlare's simulator: server, leaf client and its device threads).

Writes results/edge_federation.json after every row (a stopped run keeps what it has) and edge_federation.png.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from fedxr.config import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
#: The main row's federation: enough updates per version that a version averages many devices, enough versions to
#: see the trend; ~1,000 device tasks at NVFlare's ~2 dispatches a second.
MAIN = ["edge_federation.devices=1000", "edge_federation.selection=100", "edge_federation.updates_per_version=50",
        "edge_federation.versions=20", "edge_federation.dropout=0.3", "edge_federation.stragglers=0.1",
        "edge_federation.images_per_device=[5,50]"]


class PeakMemory:
    """Peak resident memory (MB) of this process and all its children, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self._stop = every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total / 1e6)
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def unseen_hospital(recipe, work: Path, patients: int, size: int) -> Path:
    """The phantom again with a 4th hospital, split by hospital; the manifest of the site holding the 4th."""
    import json

    from fedxr.data.prepare import ensure_dataset, ensure_sites

    four = recipe.changed("a 4th hospital", data={
        "root": str(work / "phantom4"), "phantom": {**recipe.data.phantom.model_dump(), "hospitals": 4,
                                                   "patients": patients, "size": size, "seed": 1},
        "sites": 4}, output={"runs_dir": str(work / "runs"), "name": "population"}, federated={"min_clients": 1})
    ensure_dataset(four, progress=False)
    sites, _ = ensure_sites(four)
    summary = json.loads((sites / "sites.json").read_text())
    holds = summary["settings"]["column_values"]
    hospitals = sorted({h for values in holds.values() for h in values})
    site = next(s for s, values in holds.items() if hospitals[-1] in values)
    return sites / f"{site}.csv"


def edge_row(overrides: list[str], start: Path, manifest: Path, name: str, settings: list[str],
             runs_dir: Path) -> dict:
    from fedxr.crossdevice.run import edge_federate

    run = load_recipe(RECIPE, [*overrides, f"output.runs_dir={runs_dir}", f"output.name={name}",
                               f"edge_federation.manifest={manifest}", *settings])
    with PeakMemory() as memory:
        t0 = time.time()
        summary = edge_federate(run, init_from=start, progress=False)
        seconds = time.time() - t0
    versions = summary["versions"]
    made = len(versions) - 1
    return {"name": name, "settings": settings, "seconds": round(seconds, 1),
            "seconds_per_version": round(summary["seconds"] / max(made, 1), 2),
            "peak_memory_mb": round(memory.peak, 1), "versions_made": made, "updates": summary["updates"],
            "device_tasks": summary["device_tasks"], "test": summary["test"],
            "val_by_version": [v["val_macro_auroc"] for v in versions], "update_bytes": summary["update_bytes"],
            "population": summary["population"]["films_per_device"], "films": summary["population"]["films"]}


def plot(rows: dict, path: Path) -> None:
    from fedxr.plots import saved_figure

    with saved_figure(path, ncols=2, figsize=(11, 4)) as (fig, (left, right)):
        for key in ("gain", "stale_unweighted", "stale_weighted", "dp_eps8"):
            if key in rows:
                left.plot(range(len(rows[key]["val_by_version"])), rows[key]["val_by_version"], marker=".",
                          label=key)
        left.set_xlabel("model version (0: the student it started from)")
        left.set_ylabel("validation macro AUROC (unseen hospital)")
        left.legend()
        scale = [r for k, r in rows.items() if k.startswith("scale_")]
        if not scale:
            right.axis("off")
            right.text(0.5, 0.5, "scale rows not measured\n(--rows scale)", ha="center", va="center")
        else:
            devices = [int(r["name"].rsplit("_", 1)[-1]) for r in scale]
            right.plot(devices, [r["seconds_per_version"] for r in scale], marker="o", label="s per version")
            right.set_xscale("log")
            right.set_xlabel("simulated devices")
            right.set_ylabel("seconds per model version")
            twin = right.twinx()
            twin.plot(devices, [r["peak_memory_mb"] for r in scale], marker="s", color="tab:red")
            # From zero: a flat line is the finding (memory does not grow with the devices), not a 5 % wiggle.
            right.set_ylim(0, 1.2 * max(r["seconds_per_version"] for r in scale))
            twin.set_ylim(0, 1.2 * max(r["peak_memory_mb"] for r in scale))
            twin.set_ylabel("peak memory (MB)", color="tab:red")


def earlier_rows(smoke: bool, start: Path, manifest: Path) -> dict:
    """The rows an earlier run of this script wrote for the same student and population (each row takes 15-30
    minutes: ``--rows stale`` after ``--rows gain`` keeps the gain row); a row run again replaces its own."""
    import json

    from common import RESULTS

    path = RESULTS / f"edge_federation{'.smoke' if smoke else ''}.json"
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = earlier.get("student") == str(start) and earlier.get("population") == str(manifest)
    return dict(earlier.get("rows") or {}) if same else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="gain,stale,dp,scale", help="comma-separated: gain, stale, dp, scale")
    ap.add_argument("--student", help="student checkpoint (default: the quickstart run's first student)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    rows_wanted = set(args.rows.split(","))
    work = ROOT / "runs" / ("bench_edge_federation_smoke" if args.smoke else "bench_edge_federation")
    overrides = list(args.overrides)
    if args.smoke:
        overrides = [f"data.root={work / 'phantom'}", "data.phantom.patients=40", "data.phantom.size=32",
                     "data.image_size=32", "model.name=tiny_cnn", f"data.cache_dir={work / 'cache'}",
                     f"output.runs_dir={work / 'runs'}", *overrides]
    recipe = load_recipe(RECIPE, overrides)
    if args.student:
        start = Path(args.student)
    elif args.smoke:
        from fedxr.models.checkpoint import save_checkpoint
        from fedxr.models.registry import build_model

        start = save_checkpoint(work / "start.ckpt", model_name="tiny_cnn", state_dict=build_model("tiny_cnn").state_dict(),
                                preprocessing=recipe.preprocessing, thresholds=[0.5] * 14,
                                recipe=recipe.model_dump(mode="json"))
    else:
        from fedxr.crossdevice.run import default_start
        from fedxr.errors import FedxrError

        try:
            start = default_start(recipe)
        except FedxrError as exc:
            raise SystemExit(f"{exc}\nrun `make demo` first (or pass --student CKPT)") from None
    manifest = unseen_hospital(recipe, work, patients=80 if args.smoke else recipe.data.phantom.patients,
                               size=recipe.data.phantom.size)
    small = ["edge_federation.devices=12", "edge_federation.selection=4", "edge_federation.updates_per_version=3",
             "edge_federation.versions=3", "edge_federation.straggler_delay_s=1"]
    rows = earlier_rows(args.smoke, start, manifest)

    def save() -> None:
        write_result("edge_federation", {"student": str(start), "population": str(manifest), "rows": rows},
                     smoke=args.smoke)
        plot(rows, (work if args.smoke else ROOT / "benchmarks" / "results") / "edge_federation.png")

    if "gain" in rows_wanted:
        rows["gain"] = edge_row(overrides, start, manifest, "gain", small if args.smoke else MAIN, work / "runs")
        save()
    if "stale" in rows_wanted:
        # A version every ~25 s (50 updates at ~2 dispatches/s); a straggler 60 s late lands 2+ versions later.
        stale = small + ["edge_federation.stragglers=0.34"] if args.smoke else \
            [*MAIN, "edge_federation.stragglers=0.34", "edge_federation.straggler_delay_s=60",
             "edge_federation.max_staleness=10",
             # A straggler sleeps in its simulator thread: as many threads as devices at work, or 2 threads
             # sleeping 60 s each would stall the whole row.
             "edge_federation.workers=100"]
        for weighted in (False, True):
            key = f"stale_{'weighted' if weighted else 'unweighted'}"
            rows[key] = edge_row(overrides, start, manifest, key, [*stale, f"edge_federation.staleness_weight={weighted}"], work / "runs")
            save()
    if "dp" in rows_wanted:
        # Per-device DP at ε = 8 over at most 3 updates per device (enough for 20 versions); the main row otherwise.
        dp = ["edge_federation.dp.epsilon=8", "edge_federation.dp.max_updates=4" if args.smoke else
              "edge_federation.dp.max_updates=3", "edge_federation.dp.clip=1.0"]
        rows["dp_eps8"] = edge_row(overrides, start, manifest, "dp_eps8", [*(small if args.smoke else MAIN), *dp], work / "runs")
        save()
    if "scale" in rows_wanted:
        for devices in ((12, 24) if args.smoke else (100, 1000, 10000)):
            settings = (small if args.smoke else
                        ["edge_federation.selection=100", "edge_federation.updates_per_version=50",
                         "edge_federation.versions=4"]) + [f"edge_federation.devices={devices}"]
            rows[f"scale_{devices}"] = edge_row(overrides, start, manifest, f"scale_{devices}", settings, work / "runs")
            save()
    for key, row in rows.items():
        t = row["test"]
        gain = "" if t["gain"] is None else f"{t['gain']:+.4f} ({t['gain_ci95'][0]:+.4f}…{t['gain_ci95'][1]:+.4f})"
        print(f"{key:18s} {row['versions_made']:3d} versions, {row['seconds_per_version']:6.1f} s each, "
              f"{row['peak_memory_mb']:7.0f} MB; updates {row['updates']}; test {t['start']} → {t['final']} {gain}")


if __name__ == "__main__":
    main()
