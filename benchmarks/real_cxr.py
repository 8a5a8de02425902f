"""Does federation help on real radiographs? The real-images recipe against each site alone and pooled.

    fedxr run recipes/real_cxr.yaml                       # first: the federated teacher and students
    python benchmarks/real_cxr.py                         # + local-only per site, pooled central, edge speed
    python benchmarks/real_cxr.py --phantom-init runs/quickstart/federate/global_best.ckpt   # + the same
                                                          #   federation started from the phantom teacher
    python benchmarks/real_cxr.py --smoke                 # a small real subset at 32 px (CI)

Every model is scored on each site's own test split (within-site figures are the primary ones; the pooled
figure is shown beside, never instead). Models:

* the federated teacher and the distilled student (and the student without the teacher) of the recipe's run;
* local-only: the teacher architecture trained at one site on that site's data alone, for the steps that site
  trained in the federation (rounded up to whole epochs; scored at its own site);
* central: the same, on every site's training data pooled, for the steps of all sites together (the upper
  bound a federation aims at, at the same compute);
* optionally the federation started from another checkpoint (``model.init_from``, e.g. the phantom teacher).

Paired differences (the same bootstrap resamples of a site's test images for both models) with 95 % intervals:
federated − local, federated − central, student − teacher, KD gain. The edge: the teacher's best export (FP32 or
INT8, whichever is faster) against the student's recommended file, timed side by side at one thread. Writes
results/real_cxr.json and real_cxr.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from fedxr.config import load_recipe  # noqa: E402
from fedxr.errors import FedxrError  # noqa: E402
from fedxr.labels import LABELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "real_cxr.yaml"
REAL = (ROOT / ".." / "shared" / "data" / "real-cxr").resolve()
RESAMPLES = 1000


def federation_steps(layout) -> dict[str, int]:
    """Optimisation steps each site trained in the teacher's federation (rounds.json), summed over rounds."""
    import json

    steps: dict[str, int] = {}
    for rnd in json.loads((layout.federate / "rounds.json").read_text()):
        if rnd["round"] == "final":
            continue
        for site, rec in rnd["sites"].items():
            steps[site] = steps.get(site, 0) + int(rec.get("steps") or 0)
    return steps


def baseline_epochs(recipe, steps: int, sites: list[str]) -> int:
    """Whole epochs over ``sites``' training images that hold at least ``steps`` batches: a baseline gets the
    compute the federation spent (at that site, or at all sites together for the pooled model), rounded up."""
    from fedxr.data.manifest import read_manifest, site_manifest_paths

    paths = site_manifest_paths(recipe.layout.sites)
    images = sum(int((read_manifest(paths[s])["split"] == "train").sum()) for s in sites)
    per_epoch = -(-images // recipe.data.batch_size)
    return max(1, -(-steps // per_epoch))


def baseline(recipe, mode: str, site: str | None, epochs: int) -> str:
    """Train the teacher architecture locally (one site) or centrally (all sites pooled); its checkpoint."""
    from fedxr.layout import chosen_checkpoint
    from fedxr.training import train

    changed = recipe.changed(f"{mode} baseline", model={"max_epochs": epochs})
    folder = changed.layout.train("central" if mode == "central" else f"local_{site}")
    # Trained before with this very recipe (and so these sites, this schedule), and finished: summary.json is
    # written at the end, recipe.yaml at the start — an interrupted retraining leaves it older. Else retrain.
    summary, written = folder / "summary.json", folder / "recipe.yaml"
    if summary.is_file() and written.is_file() and summary.stat().st_mtime >= written.stat().st_mtime \
            and trains_alike(written, changed):
        return str(chosen_checkpoint(folder))
    summary = train(changed, recipe.layout.sites, mode=mode, site=site, progress=False)
    # A COVID site's validation split can hold one class only: no validation AUROC, so no "best"; then the last.
    return str(chosen_checkpoint(summary["folder"]))


def trains_alike(written: Path, recipe, sections: tuple[str, ...] = ("data", "model", "privacy")) -> bool:
    """Whether a model trained with the recipe file ``written`` is the one ``recipe`` would train: the ``sections``
    it reads are equal. A local or pooled baseline reads data and model — the federated, distill, export and output
    sections do not change it (so a second federation of the same sites, FedBN say, reuses the baselines)."""
    import yaml

    old, new = yaml.safe_load(written.read_text()), yaml.safe_load(recipe.to_yaml())
    return all(old.get(k) == new.get(k) for k in sections)


def paired(a: np.ndarray, b: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict | None:
    """Macro AUROC of a minus b over ``classes`` with a paired 95 % bootstrap interval (None: nothing to score)."""
    from fedxr.models.metrics import batched_auroc, bootstrap_macro_auroc, interval

    if not classes:
        return None
    idx = [LABELS.index(c) for c in classes]
    macro = lambda p: float(np.mean([batched_auroc(p[None, :, c], targets[None, :, c])[0] for c in idx]))  # noqa: E731
    samples = bootstrap_macro_auroc([a, b], targets, classes, RESAMPLES)
    diff = samples[0] - samples[1]
    return {"difference": macro(a) - macro(b), "ci95": interval(diff[~np.isnan(diff)]), "classes": classes}


def edge_speed(teacher_export: Path, student_export: Path, runs: int = 50) -> dict:
    """Batch-1 latency at one thread of every kept teacher file and the student's recommended file, in one process."""
    import json

    from fedxr.edge import load_model

    def time_file(path: Path) -> float:
        model = load_model(path, threads=1)
        x = np.random.default_rng(0).standard_normal((1, 1, model.size, model.size)).astype(np.float32)
        for _ in range(5):
            model.logits(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model.logits(x)
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1000)

    teacher = json.loads((teacher_export / "manifest.json").read_text())
    student = json.loads((student_export / "manifest.json").read_text())
    teacher_ms = {f["file"]: time_file(teacher_export / f["file"]) for f in teacher["files"]
                  if (teacher_export / f["file"]).is_file() and f["file"].endswith(".onnx")}
    best = min(teacher_ms, key=teacher_ms.get)
    student_ms = time_file(student_export / student["recommended"])
    return {"teacher_ms": teacher_ms, "teacher_best": best, "student_file": student["recommended"],
            "student_ms": student_ms, "speedup_vs_teacher_best": teacher_ms[best] / student_ms,
            "input_size": student["input_size"], "threads": 1, "goal": ">= 5x"}


def smoke_overrides(work: Path, patients: dict[str, int] | None = None) -> list[str]:
    """A small real subset at 32 px (``patients`` per source; default nih and the pediatric set), tiny models."""
    from fedxr.data.labelcsv import sample_patients

    import pandas as pd

    table = pd.read_csv(REAL / "labels.csv", dtype=str, keep_default_na=False)
    small = sample_patients(table, patients or {"nih": 60, "kermany": 80})
    small["path"] = [str(REAL / p) for p in small["path"]]
    (work / "real").mkdir(parents=True, exist_ok=True)
    small.to_csv(work / "real" / "labels.csv", index=False)
    return [f"data.root={work / 'real'}", "data.boxes_file=null", "data.sites=2", "data.image_size=32",
            "data.batch_size=16", "data.num_workers=0", f"data.cache_dir={work / 'cache'}", "model.name=tiny_cnn",
            "federated.rounds=1", "distill.students=[resnet18_eighth]", "distill.rounds=1", "explain.enabled=false",
            "export.calibration_images=16", f"export.out={work / 'export'}", f"output.runs_dir={work / 'runs'}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--phantom-init", help="also run the federation from this checkpoint (model.init_from)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.smoke:
        work = ROOT / "runs" / "bench_real_cxr_smoke"
        shutil.rmtree(work, ignore_errors=True)
        overrides = smoke_overrides(work) + overrides
    recipe = load_recipe(args.recipe, overrides)
    t0 = time.perf_counter()
    if args.smoke:
        from fedxr.pipeline import run_pipeline

        run_pipeline(recipe, args.recipe, progress=False)
    from fedxr.evaluation import evaluate_sites
    from fedxr.layout import RunLayout, chosen_checkpoint, read_sites_summary
    from fedxr.pipeline import _load_state

    layout = recipe.layout
    state = _load_state(layout.pipeline_state)
    if "distill" not in state or not layout.federate.exists():
        raise FedxrError(f"{layout.root}: no finished run; run `fedxr run {args.recipe}` first")
    from fedxr.evaluation import SiteModels
    from fedxr.federated.fedbn import site_models

    teacher = str(chosen_checkpoint(layout.federate))
    student = recipe.distill.students[0]
    # FedBN: the federated teacher is each site's own model; the global one (pooled BatchNorm) is shown beside.
    own = site_models(teacher)
    models: dict[str, SiteModels] = {"federated teacher": {**own, "*": teacher} if own else teacher}
    if own:
        models["federated teacher (global, pooled BatchNorm)"] = teacher
    for name, with_teacher in (("student (KD)", True), ("student (no teacher)", False)):
        ckpt = str(chosen_checkpoint(layout.stage(RunLayout.student_stage(student, with_teacher))))
        own_student = site_models(ckpt)
        models[name] = {**own_student, "*": ckpt} if own_student else ckpt
    seconds = {}
    from fedxr.data.manifest import site_manifest_paths

    sites = list(site_manifest_paths(layout.sites))
    # Each baseline gets the compute the federation spent: a site alone trains as many steps as it trained in
    # the federation (with federated.max_local_steps the largest site trained fewer than its whole epochs), the
    # pooled model as many as all sites together; rounded up to whole epochs.
    steps = federation_steps(layout)
    epochs = {"central": baseline_epochs(recipe, sum(steps.values()), sites)}
    epochs.update({site: baseline_epochs(recipe, steps.get(site, 0), [site]) for site in sites})
    t = time.perf_counter()
    models["central (pooled)"] = baseline(recipe, "central", None, epochs["central"])
    seconds["central"] = round(time.perf_counter() - t, 1)
    for site in sites:
        t = time.perf_counter()
        models[f"local {site}"] = baseline(recipe, "local", site, epochs[site])
        seconds[f"local {site}"] = round(time.perf_counter() - t, 1)
    if args.phantom_init:
        from fedxr.federated.run import federate

        init = recipe.changed("phantom init", model={"init_from": str(Path(args.phantom_init).resolve())},
                              output={"name": f"{recipe.output.name}_phantom_init"})
        if not init.layout.sites.exists():
            shutil.copytree(layout.sites, init.layout.sites)  # the same sites and splits
        t = time.perf_counter()
        from_phantom = federate(init, env="sim").checkpoint
        own_phantom = site_models(from_phantom)  # FedBN: scored as the teacher from scratch is, each site its own
        models["federated teacher from phantom"] = {**own_phantom, "*": from_phantom} if own_phantom else from_phantom
        seconds["federated from phantom"] = round(time.perf_counter() - t, 1)
    scored = evaluate_sites(models, layout.sites, out=layout.root / "benchmark_real", cache_dir=recipe.data.cache_dir,
                            progress=False, keep_predictions=True)
    holds = read_sites_summary(layout.sites)["settings"].get("column_values") or {}
    per_site = {}
    for site in sites:
        res = scored["sites"].get(site, {})
        if "skipped" in res:
            per_site[site] = {"skipped": res["skipped"]}
            continue
        preds = scored["predictions"][site]
        targets = preds["federated teacher"][1]
        counted = res["federated teacher"]["counted"]
        own = {k: v for k, v in res.items() if not k.startswith("local ") or k == f"local {site}"}
        row = {"holds": holds.get(site, []), "images": res["federated teacher"]["images"], "models": own,
               "federated_vs_local": paired(preds["federated teacher"][0], preds[f"local {site}"][0], targets, counted),
               "federated_vs_central": paired(preds["federated teacher"][0], preds["central (pooled)"][0], targets, counted),
               "student_vs_teacher": paired(preds["student (KD)"][0], preds["federated teacher"][0], targets, counted),
               "kd_gain": paired(preds["student (KD)"][0], preds["student (no teacher)"][0], targets, counted)}
        if "federated teacher from phantom" in preds:
            row["phantom_init_vs_scratch"] = paired(preds["federated teacher from phantom"][0],
                                                    preds["federated teacher"][0], targets, counted)
        # One class in the test split (a COVID cohort): sensitivity at the model's own validation threshold, and
        # at 90 % specificity on every site's validation negatives (the same rule for every model).
        one_class = {name: m.get("sensitivity_only") for name, m in own.items() if m.get("sensitivity_only")}
        if one_class:
            row["one_class"] = one_class
            # What the site's own model learned, where both classes exist: its AUROC at the other sites.
            row["local_model_elsewhere"] = {
                other: {c: {"local": res_o[f"local {site}"]["auroc"][c], "federated": res_o["federated teacher"]["auroc"][c]}
                        for c in res_o["federated teacher"]["counted"] if c in res_o[f"local {site}"]["auroc"]}
                for other, res_o in scored["sites"].items() if other != site and "skipped" not in res_o}
        per_site[site] = row
    export_root = Path(recipe.export.out)
    edge = None
    teacher_export, student_export = layout.export(recipe.model.name), layout.export(student, student=True)
    if (teacher_export / "manifest.json").is_file() and (student_export / "manifest.json").is_file():
        edge = edge_speed(teacher_export, student_export)
    pooled = {k: v for k, v in scored["pooled"].items() if not k.startswith("local ")}
    payload = {"recipe": str(args.recipe), "run": str(layout.root), "smoke": args.smoke, "labels": list(LABELS),
               "federation_steps": steps, "baseline_epochs": epochs,
               "baseline_rule": "each baseline trains the steps the federation trained (at that site; all sites "
                                "for the pooled model), rounded up to whole epochs",
               "sites": per_site, "pooled_not_within_site": pooled, "edge": edge, "seconds": seconds,
               "total_seconds": round(time.perf_counter() - t0, 1), "export_root": str(export_root),
               "note": "within-site figures are primary; pooled is shown for reference only"}
    path = write_result("real_cxr", payload, smoke=args.smoke)
    plot(per_site, path.with_suffix(".png"))
    print(format_table(per_site, edge))
    print(f"wrote {path}")


def _macro(s: dict | None) -> float | None:
    return s.get("macro_auroc") if s else None


def plot(per_site: dict, path: Path) -> None:
    from fedxr.plots import saved_figure

    names = ["federated teacher", "local", "central (pooled)", "student (KD)", "student (no teacher)"]
    pooled_bn = "federated teacher (global, pooled BatchNorm)"
    if any(pooled_bn in r.get("models", {}) for r in per_site.values()):
        names.insert(1, pooled_bn)
    sites = [s for s, r in per_site.items() if "skipped" not in r and _macro(r["models"]["federated teacher"]) is not None]
    with saved_figure(path, dpi=90, figsize=(2.2 + 2.2 * max(1, len(sites)), 4)) as (fig, ax):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals, lows, highs = [], [], []
            for s in sites:
                m = per_site[s]["models"].get(name if name != "local" else f"local {s}") or {}
                v, ci = m.get("macro_auroc"), m.get("macro_auroc_ci95")
                vals.append(v if v is not None else np.nan)
                lows.append(v - ci[0] if ci else 0)
                highs.append(ci[1] - v if ci else 0)
            ax.bar(np.arange(len(sites)) + i * width, vals, width, yerr=[lows, highs], capsize=2, label=name)
        ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2,
                      [f"{s}\n({', '.join(per_site[s]['holds'])})" for s in sites])
        ax.set_ylim(0.4, 1.15)
        ax.set_ylabel("within-site test macro AUROC (95 % CI)")
        ax.legend(fontsize=6, loc="upper center", ncol=3)
        ax.set_title("real chest X-rays: each site's own test split")


def format_table(per_site: dict, edge: dict | None) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "–"  # noqa: E731
    diff = lambda d: f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f}…{d['ci95'][1]:+.3f})" if d else "–"  # noqa: E731
    lines = [f"{'site':<22}{'fed':>7}{'local':>7}{'central':>8}{'student':>8}{'no-KD':>7}  fed−local               "
             "student−teacher"]
    for site, r in per_site.items():
        if "skipped" in r:
            lines.append(f"{site:<22}skipped: {r['skipped']}")
            continue
        m = r["models"]
        name = f"{site} ({', '.join(r['holds'])})"
        lines.append(f"{name:<22}{fmt(_macro(m['federated teacher'])):>7}{fmt(_macro(m.get(f'local {site}'))):>7}"
                     f"{fmt(_macro(m['central (pooled)'])):>8}{fmt(_macro(m['student (KD)'])):>8}"
                     f"{fmt(_macro(m['student (no teacher)'])):>7}  {diff(r['federated_vs_local']):<24}"
                     f"{diff(r['student_vs_teacher'])}")
    for site, r in per_site.items():
        for name, labels in (r.get("one_class") or {}).items():
            for c, v in labels.items():
                at = v.get("at_specificity") or {}
                lines.append(f"{site} {c} ({v['positives']} pos., {v['negatives']} neg.) [{name}]: sensitivity "
                             f"{v['sensitivity']:.2f} at its threshold, {at.get('sensitivity', float('nan')):.2f} at "
                             f"{at.get('validation_specificity', 0.9):.0%} validation specificity")
    if edge:
        lines.append(f"edge, 1 thread, {edge['input_size']} px: teacher best {edge['teacher_best']} "
                     f"{edge['teacher_ms'][edge['teacher_best']]:.2f} ms, student {edge['student_file']} "
                     f"{edge['student_ms']:.2f} ms → {edge['speedup_vs_teacher_best']:.1f}× (goal ≥ 5×)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
