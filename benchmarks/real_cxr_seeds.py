"""Does federation beat each site alone on real radiographs, over training seeds? And the COVID sites.

    fedxr run recipes/real_cxr.yaml output.name=real_cxr_fedbn     # seed 0 (what benchmarks/real_cxr.py measured)
    python benchmarks/real_cxr_seeds.py --seeds 0,1 output.name=real_cxr_fedbn   # + seed 1 (~55 min, 2 cores)
    python benchmarks/real_cxr_seeds.py --smoke                    # a small real subset at 32 px (pytest -m bench)

For each training seed (``model.seed``; the data, the split and the sites stay those of the seed-0 run, copied)
the recipe's federated teacher is trained (seed 0: the run's own) and, beside it, each site's local-only model with
the compute that site spent in the federation (as ``benchmarks/real_cxr.py``). Students and the pooled model are
not repeated (the pooled one took 21 min a seed on 2 cores). Per seed and site:

* where a site's test split holds both classes: within-site macro AUROC, teacher − local with a paired 95 %
  bootstrap interval; over the seeds the mean and sd of that difference and how many seeds have it above zero;
* where it holds one class (the COVID cohorts: 1 and 2 normal test films, no AUROC): Pneumonia sensitivity at each
  model's own validation threshold and at 90 % specificity on every site's validation negatives — and, since those
  rest on one or two films, what the model *deployed at that site* (its FedBN model: the shared weights with its own
  BatchNorm; its local model) does with adult pneumonia where both classes exist: Pneumonia AUROC on NIH's test
  split, with a paired interval. A site that cannot train a model alone shows it there.

Writes results/real_cxr_seeds.json (the smoke run results/real_cxr_seeds.smoke.json, not committed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from real_cxr import (RECIPE, ROOT, baseline, baseline_epochs, federation_steps, paired,  # noqa: E402
                      smoke_overrides, trains_alike)

from fedxr.config import load_recipe  # noqa: E402

NOTE = ("within-site figures are primary. One-class (COVID) sites have no within-site AUROC: they are read at "
        "each model's own validation threshold and at 90 % validation specificity, and by their deployed models' "
        "Pneumonia AUROC on NIH's test split. NIH's training films are in the federation, not in the COVID site's "
        "local model: that reading shows what a site alone cannot learn and what the federation hands it, not that "
        "the federated model serves the site's own patients better")
#: Where adult pneumonia is labelled both ways: the COVID sites' models are scored there too.
ADULT_SOURCE = "nih"
FINDING = "Pneumonia"


def seeded(recipe, seed: int):
    """The recipe trained with ``seed``: seed 0 is the recipe's own run; another gets its own run folder holding a
    copy of the seed-0 run's site manifests (the same patients in the same splits)."""
    if seed == recipe.model.seed:
        return recipe
    other = recipe.changed(f"seed {seed}", model={"seed": seed}, output={"name": f"{recipe.output.name}_seed{seed}"})
    if not other.layout.sites.exists():
        shutil.copytree(recipe.layout.sites, other.layout.sites)
    return other


def teacher(recipe) -> str:
    """The seed's federated teacher: a finished run of it (summary.json written after its recipe, and that recipe's
    data, model and federated sections equal to this one's: other settings do not change the teacher), or trained
    now. (``federate`` itself keeps a finished job only when the whole recipe is the same, so a setting added to
    fedxr since would retrain a 32-minute federation.)"""
    from fedxr.federated.run import federate
    from fedxr.layout import chosen_checkpoint

    folder = recipe.layout.federate
    summary, written = folder / "summary.json", folder / "fedxr_recipe.yaml"
    if summary.is_file() and written.is_file() and summary.stat().st_mtime >= written.stat().st_mtime \
            and trains_alike(written, recipe, ("data", "model", "federated")):
        return str(chosen_checkpoint(folder))
    return str(federate(recipe, env="sim").checkpoint)


def run_seed(recipe, seed: int, sites_holding: dict[str, list[str]]) -> dict:
    from fedxr.data.manifest import site_manifest_paths
    from fedxr.evaluation import evaluate_sites
    from fedxr.federated.fedbn import site_models

    t0 = time.perf_counter()
    recipe = seeded(recipe, seed)
    fed = teacher(recipe)
    seconds = {"teacher": round(time.perf_counter() - t0, 1)}
    sites = list(site_manifest_paths(recipe.layout.sites))
    steps = federation_steps(recipe.layout)
    own = site_models(fed)
    models: dict = {"federated teacher": {**own, "*": fed} if own else fed}
    for site in sites:
        t = time.perf_counter()
        models[f"local {site}"] = baseline(recipe, "local", site, baseline_epochs(recipe, steps.get(site, 0), [site]))
        seconds[f"local {site}"] = round(time.perf_counter() - t, 1)
        # A site's own federated model, scored at every site (for one-class sites: adult pneumonia elsewhere).
        models[f"federated {site}"] = str(own.get(site, fed))
    scored = evaluate_sites(models, recipe.layout.sites, out=recipe.layout.root / "benchmark_seeds",
                            cache_dir=recipe.data.cache_dir, progress=False, keep_predictions=True)
    adult = next((s for s, holds in sites_holding.items() if ADULT_SOURCE in holds), None)
    rows = {}
    for site in sites:
        res = scored["sites"].get(site, {})
        if "skipped" in res:
            rows[site] = {"skipped": res["skipped"]}
            continue
        fed_m, loc_m = res["federated teacher"], res[f"local {site}"]
        row: dict = {"holds": sites_holding.get(site, []), "teacher": fed_m.get("macro_auroc"),
                     "teacher_ci95": fed_m.get("macro_auroc_ci95"), "local": loc_m.get("macro_auroc"),
                     "local_ci95": loc_m.get("macro_auroc_ci95"), "counted": fed_m["counted"]}
        preds = scored["predictions"][site]
        targets = preds["federated teacher"][1]
        row["teacher_vs_local"] = paired(preds["federated teacher"][0], preds[f"local {site}"][0], targets,
                                         fed_m["counted"])
        one_class = fed_m.get("sensitivity_only") or {}
        if FINDING in one_class:
            read = lambda m: {"sensitivity": m["sensitivity"],  # noqa: E731
                              "at_90_specificity": (m.get("at_specificity") or {}).get("sensitivity")}
            row["one_class"] = {"positives": one_class[FINDING]["positives"],
                                "negatives": one_class[FINDING]["negatives"],
                                "teacher": read(one_class[FINDING]),
                                "local": read((loc_m.get("sensitivity_only") or {})[FINDING])}
            adult_res = scored["sites"].get(adult or "", {})
            if adult not in (None, site) and FINDING in adult_res.get(f"federated {site}", {}).get("counted", []):
                at = scored["predictions"][adult]
                row["adult_pneumonia_at"] = {
                    "model": models[f"federated {site}"],
                    "site": adult, "finding": FINDING,
                    "teacher": adult_res[f"federated {site}"]["auroc"].get(FINDING),
                    "local": adult_res[f"local {site}"]["auroc"].get(FINDING),
                    "teacher_vs_local": paired(at[f"federated {site}"][0], at[f"local {site}"][0],
                                               at[f"federated {site}"][1], [FINDING])}
        rows[site] = row
    return {"seed": seed, "run": str(recipe.layout.root), "teacher": fed, "federation_steps": steps,
            "sites": rows, "seconds": seconds}


def summarise(per_seed: list[dict]) -> dict:
    """Over the seeds, per site: the teacher − local difference (within-site AUROC, or for one-class sites the
    adult-pneumonia AUROC of the site's deployed models), mean ± sd, and in how many seeds it is above zero
    (and with its interval above zero)."""
    out: dict = {}
    for site in per_seed[0]["sites"]:
        rows = [s["sites"][site] for s in per_seed if "skipped" not in s["sites"].get(site, {"skipped": 1})]
        key = "adult_pneumonia_at" if rows and "one_class" in rows[0] else None
        diffs = [((r.get(key) or {}).get("teacher_vs_local") if key else r.get("teacher_vs_local")) for r in rows]
        diffs = [d for d in diffs if d and np.isfinite(d["difference"])]
        if not diffs:
            continue
        vals = np.array([d["difference"] for d in diffs])
        out[site] = {"reading": f"adult pneumonia AUROC at {ADULT_SOURCE}" if key else "within-site AUROC",
                     "seeds": len(vals), "mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else None,
                     "above_zero": int((vals > 0).sum()), "interval_above_zero": sum(d["ci95"][0] > 0 for d in diffs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds (0: the recipe's own run)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.smoke:
        work = ROOT / "runs" / "bench_real_cxr_seeds_smoke"
        shutil.rmtree(work, ignore_errors=True)
        # An adult site (nih) and a COVID one (hannover), tiny_cnn, one round.
        overrides = smoke_overrides(work, {"nih": 120, "hannover": 40}) + ["output.name=seeds_smoke"] + overrides
    recipe = load_recipe(args.recipe, overrides)
    from fedxr.data.prepare import ensure_sites
    from fedxr.layout import read_sites_summary

    ensure_sites(recipe)  # the seed-0 run's manifests if they are there with these settings; else written now
    holding = read_sites_summary(recipe.layout.sites)["settings"].get("column_values") or {}
    t0 = time.perf_counter()
    per_seed: list[dict] = []
    path = None
    for seed in [int(x) for x in args.seeds.split(",")]:
        print(f"--- seed {seed}", flush=True)
        per_seed.append(run_seed(recipe, seed, holding))
        print(json.dumps({s: {k: r.get(k) for k in ("teacher", "local", "teacher_vs_local")}
                          for s, r in per_seed[-1]["sites"].items()}, default=str), flush=True)
        # Written after every seed: a stopped run keeps the seeds it finished.
        payload = {"recipe": str(args.recipe), "run": str(recipe.layout.root), "smoke": args.smoke,
                   "seeds": per_seed, "over_seeds": summarise(per_seed), "note": NOTE,
                   "total_seconds": round(time.perf_counter() - t0, 1)}
        path = write_result("real_cxr_seeds", payload, smoke=args.smoke)
    print(json.dumps(payload["over_seeds"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
