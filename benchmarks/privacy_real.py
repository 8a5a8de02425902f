"""Differential privacy on real radiographs: a public NIH model, fine-tuned privately at real hospitals.

    python benchmarks/privacy_real.py                  # ../shared/data/real-cxr, 64 px (~27 min, 2 cores)
    python benchmarks/privacy_real.py --smoke          # a few real patients at 32 px, 1 round (CI)

NIH ChestX-ray14 is itself public, so a hospital federation can pretrain on it and fine-tune privately. Here:

1. **Public model**: the teacher architecture (ResNet-18, GroupNorm: what DP-SGD trains) trained centrally,
   without DP, on the ``nih`` source of ``real-cxr`` only (its own patient-wise train/val split).
2. **Private federation**: the other three sources as three sites — the Guangzhou pediatric hospital
   (``kermany``: Pneumonia vs normal, its own test folder is its test split), Hannover and ieee8023 (COVID-19
   cohorts, nearly all positive). Every row fine-tunes from the same public start for the same rounds, the
   global model is chosen on (under DP: noised) validation only, and is scored once on each site's own test
   split. Rows: the public model as it is; non-private fine-tuning of all weights (the reference); DP-SGD at
   ε = 8 per image for each setting of ``--sweep`` (chosen on validation, never on test) and that setting per
   patient and at ε = 1.

The primary figure is **within-site Pneumonia AUROC at the pediatric site** (the COVID sites' test splits
hold one or two normal films: their AUROC is shown where it exists, with its very wide interval), with the
paired difference to non-private fine-tuning (same bootstrap resamples of the same test images). The pooled
macro AUROC over the three sites is kept in the JSON for reference only.

Writes results/privacy_real.json and .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from privacy_finetune import DP_EXTRA, describe, fine_tune, parse_setting  # noqa: E402
from privacy_utility import _prepare  # noqa: E402
from real_cxr import REAL, RESAMPLES, paired  # noqa: E402

from fedxr.config import load_recipe  # noqa: E402
from fedxr.labels import LABELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "real_cxr.yaml"
PUBLIC_SOURCES = ("nih",)
PRIVATE_SOURCES = ("hannover", "ieee8023", "kermany")
FINDING = "Pneumonia"


def write_tables(work: Path, smoke: bool) -> tuple[Path, Path]:
    """labels.csv of the public source and of the private ones (absolute image paths: the films stay in
    ../shared). The smoke run samples whole patients: a few from each source."""
    import pandas as pd

    from fedxr.data.labelcsv import sample_patients

    table = pd.read_csv(REAL / "labels.csv", dtype=str, keep_default_na=False)
    if smoke:
        table = sample_patients(table, {"nih": 60, "kermany": 80, "hannover": 12, "ieee8023": 12})
    table["path"] = [str(REAL / p) for p in table["path"]]
    folders = []
    for name, sources in (("public", PUBLIC_SOURCES), ("private", PRIVATE_SOURCES)):
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        part = table[table["source"].isin(sources)]
        if not (folder / "labels.csv").is_file() or pd.read_csv(folder / "labels.csv", dtype=str,
                                                                 keep_default_na=False).shape != part.shape:
            part.to_csv(folder / "labels.csv", index=False)
        folders.append(folder)
    return folders[0], folders[1]


def recipes(args, work: Path):
    public_root, private_root = write_tables(work, args.smoke)
    common = [f"data.image_size={args.image_size}", "data.boxes_file=null", f"output.runs_dir={work / 'runs'}",
              "distill.students=[]", "explain.enabled=false", "federated.cross_site_eval=false",
              # DP plans its budget in logical batches; the real recipe's step cap is for its plain FedAvg run
              "federated.max_local_steps=null",
              # DP's GroupNorm has no BatchNorm to keep at the sites (and DP refuses FedBN); measured without it
              "federated.fedbn=false"]
    if args.smoke:
        common += ["data.batch_size=16", "data.num_workers=0", "model.name=tiny_cnn", f"data.cache_dir={work / 'cache'}"]
    public = load_recipe(args.recipe, [*common, f"data.root={public_root}", "data.sites=1", "federated.min_clients=1", "model.norm=group",
                                       f"model.max_epochs={args.public_epochs}", "output.name=public"])
    private = load_recipe(args.recipe, [*common, f"data.root={private_root}", f"data.sites={len(PRIVATE_SOURCES)}",
                                        "output.name=private", *args.overrides])
    return public, private


def public_model(recipe) -> Path:
    from fedxr.training import train

    _prepare(recipe)
    summary_path = recipe.layout.root / "train_central" / "summary.json"
    if summary_path.is_file():
        return Path(json.loads(summary_path.read_text())["best"])
    print(f"--- public model: {recipe.model.name} (GroupNorm) on {recipe.data.root}, {recipe.model.max_epochs} "
          "epochs, central", flush=True)
    return Path(train(recipe, recipe.layout.sites, mode="central", progress=False)["best"])


def within_site(rows: list[dict], public: Path, base) -> dict:
    """Every row's checkpoint on each private site's own test split; paired differences to the reference."""
    from fedxr.evaluation import evaluate_sites
    from fedxr.layout import read_sites_summary
    from fedxr.models.metrics import batched_auroc, bootstrap_macro_auroc, interval

    models = {"public model, no fine-tuning": str(public), **{r["label"]: r["checkpoint"] for r in rows}}
    scored = evaluate_sites(models, base.layout.sites, out=base.layout.root / "within_site", progress=False,
                            cache_dir=base.data.cache_dir, keep_predictions=True)
    holds = read_sites_summary(base.layout.sites)["settings"].get("column_values") or {}
    reference = rows[0]["label"]
    per_site = {}
    for site, res in scored["sites"].items():
        if "skipped" in res:
            per_site[site] = {"holds": holds.get(site, []), "skipped": res["skipped"]}
            continue
        preds = scored["predictions"][site]
        targets = preds[reference][1]
        k = LABELS.index(FINDING)
        known = ~np.isnan(targets[:, k])
        scoreable = bool(known.any() and (targets[known, k] == 1).any() and (targets[known, k] == 0).any())
        entry = {"holds": holds.get(site, []), "images": res[reference]["images"],
                 "positives": int((targets[known, k] == 1).sum()), "negatives": int((targets[known, k] == 0).sum()),
                 "models": {}}
        for name in models:
            # From the predictions, not the site's macro (which needs MIN_TEST_POSITIVES of each class): a
            # COVID site's one normal film still gives an AUROC, with the interval that says what it is worth.
            auroc, ci = None, None
            if scoreable:
                probs = preds[name][0]
                auroc = float(batched_auroc(probs[known, k][None], targets[known, k][None])[0])
                boot = bootstrap_macro_auroc([probs], targets, [FINDING], RESAMPLES)[0]
                ci = interval(boot[~np.isnan(boot)])
            entry["models"][name] = {"auroc": auroc, "ci95": ci}
            if scoreable and name != reference:
                entry["models"][name]["vs_reference"] = paired(preds[name][0], preds[reference][0], targets, [FINDING])
        per_site[site] = entry
    return per_site


def plot(per_site: dict, names: list[str], path: Path) -> None:
    """Each model's within-site AUROC with its interval, for the sites whose test split has enough positives and
    negatives to mean something (a COVID site's one normal film does not; its figures stay in the JSON)."""
    from fedxr.models.metrics import MIN_TEST_POSITIVES
    from fedxr.plots import saved_figure

    both = [s for s, r in per_site.items() if "skipped" not in r and r["positives"] and r["negatives"]]
    sites = [s for s in both if min(per_site[s]["positives"], per_site[s]["negatives"]) >= MIN_TEST_POSITIVES] or both
    with saved_figure(path, dpi=90, nrows=max(1, len(sites)), squeeze=False, layout_rect=(0.04, 0, 1, 1),
                      figsize=(8, 0.8 + 0.4 * len(names) * max(1, len(sites)))) as (fig, axes):
        for ax, s in zip(axes[:, 0], sites):
            r = per_site[s]
            for y, name in enumerate(names):
                m = r["models"][name]
                if m["auroc"] is not None:
                    lo, hi = m["ci95"] or (m["auroc"], m["auroc"])
                    ax.errorbar([m["auroc"]], [y], xerr=[[m["auroc"] - lo], [hi - m["auroc"]]], fmt="o", capsize=3)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.invert_yaxis()
            ax.axvline(0.5, color="r", ls=":", lw=1)
            ax.set_xlim(0.3, 1.0)
            ax.set_title(f"{s} ({', '.join(r['holds'])}): {r['positives']} positive / {r['negatives']} normal test "
                         "films — public NIH model, private fine-tuning", fontsize=8)
        axes[-1, 0].set_xlabel(f"within-site test {FINDING} AUROC (95 % interval)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--public-epochs", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--sweep", nargs="+", default=["head:0.1", "head:0.5:256", "norms_and_head:0.1", "norms_and_head:0.5"],
                    help="DP settings tried at ε = 8, TRAINABLE:LR[:LOGICAL_BATCH[:COPIES]] (see privacy_finetune.py)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="changes to the private federation's recipe")
    args = ap.parse_args()
    work = ROOT / "runs" / ("bench_privacy_real_smoke" if args.smoke else "bench_privacy_real")
    if args.smoke:
        shutil.rmtree(work, ignore_errors=True)
        args.rounds, args.public_epochs, args.image_size, args.sweep = 1, 1, 32, ["head:0.5"]
        DP_EXTRA["val_min_count"] = 2  # a handful of validation films per site
    public_recipe, base = recipes(args, work)
    public = public_model(public_recipe)
    _prepare(base)
    rows = [fine_tune(base, "no DP, all weights", args.rounds, public, None, "all", None)]
    settings = [parse_setting(item) for item in args.sweep]
    sweep = [fine_tune(base, f"ε=8 {describe(s)}", args.rounds, public, 8.0, **s) for s in settings]
    rows += sweep
    best_row = max(sweep, key=lambda r: r["val_auroc"] or 0)  # on (noised) validation, never on test
    best = settings[sweep.index(best_row)]
    if not args.smoke:  # CI: two federations fewer (the per-patient path is smoke-run by privacy_finetune.py)
        rows.append(fine_tune(base, f"ε=8 per patient {describe(best)}", args.rounds, public, 8.0, **best,
                              unit="patient"))
        rows.append(fine_tune(base, f"ε=1 {describe(best)}", args.rounds, public, 1.0, **best))
    per_site = within_site(rows, public, base)
    names = ["public model, no fine-tuning", *[r["label"] for r in rows]]
    png = Path(__file__).resolve().parent / "results" / f"privacy_real{'.smoke' if args.smoke else ''}.png"
    plot(per_site, names, png)
    primary = per_site.get(next((s for s, r in per_site.items() if "kermany" in r.get("holds", [])), ""), {})
    gaps = {}
    for r in rows[1:]:
        vs = (primary.get("models", {}).get(r["label"]) or {}).get("vs_reference")
        if vs:
            gaps[r["label"]] = {"difference": round(vs["difference"], 4), "ci95": vs["ci95"]}
    path = write_result("privacy_real", {
        "public_sources": list(PUBLIC_SOURCES), "private_sources": list(PRIVATE_SOURCES), "finding": FINDING,
        "image_size": args.image_size, "rounds": args.rounds, "public_epochs": args.public_epochs,
        "public_checkpoint": str(public), "chosen_on_validation": best, "rows": rows, "within_site": per_site,
        "primary_site_gap_to_non_private": gaps, "goal": {"epsilon_8": 0.03}, "plot": str(png.relative_to(ROOT)),
        "note": "within-site Pneumonia AUROC at the pediatric site is the primary figure; rows' pooled "
                "macro_auroc is over the three private sites, for reference only", "recipe": base.resolved()},
        smoke=args.smoke)
    for site, r in per_site.items():
        if "skipped" in r:
            print(f"{site}: skipped ({r['skipped']})")
            continue
        print(f"{site} ({', '.join(r['holds'])}): {r['positives']} positive / {r['negatives']} negative test films")
        for name in names:
            m = r["models"][name]
            vs = m.get("vs_reference")
            print(f"  {name:<42} {m['auroc'] if m['auroc'] is not None else float('nan'):.3f}"
                  + (f"  vs no DP {vs['difference']:+.3f} ({vs['ci95'][0]:+.3f}…{vs['ci95'][1]:+.3f})" if vs else ""))
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
