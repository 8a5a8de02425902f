"""Federated accuracy on phantom data: centralised vs FedAvg, FedProx, SCAFFOLD, FedOpt, FedAvg+FedBN, local-only.

    python benchmarks/federated_accuracy.py --seeds 3       # natural + Dirichlet 0.5, every method, 3 seeds
    python benchmarks/federated_accuracy.py --smoke         # one tiny split, three methods (CI)
    python benchmarks/federated_accuracy.py --splits natural,dirichlet0.5 --methods central,fedavg,local

Seeds: ``--seeds N`` trains every cell with model.seed = 0..N-1 (initial weights, data order,
augmentation); the data and the site split stay fixed (data.seed), so the spread is the training noise
alone. Each cell is reported as mean ± standard deviation over the seeds.

Same data and the same total compute for every method: centralised training runs rounds × local_epochs
epochs over the pooled training images; each federated site runs local_epochs per round; each local-only
model trains rounds × local_epochs epochs on its own site. Every model is scored on the same pooled test
split (each site's test patients) by macro AUROC. For per-site models (local-only, and FedBN, whose
BatchNorm layers stay at each site) the row is the mean over sites of their pooled-test AUROC.
Splits: iid, DirichletA (label skew, concentration A) and natural (one site per phantom hospital).
Writes results/federated_accuracy.json and federated_accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402

from fedxr.config import load_recipe  # noqa: E402
from fedxr.data.manifest import site_manifest_paths  # noqa: E402
from fedxr.data.prepare import ensure_dataset, ensure_sites  # noqa: E402
from fedxr.plots import saved_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "compare_fedavg_fedprox_scaffold.yaml"
METHODS = ["central", "fedavg", "fedprox", "scaffold", "fedopt", "fedbn", "local"]
SPLITS = ["natural", "dirichlet0.5"]
FEDERATED = ["fedavg", "fedprox", "scaffold", "fedopt", "fedbn"]


def split_overrides(split: str) -> list[str]:
    if split == "iid":
        return ["data.scheme=iid"]
    if split == "natural":
        return ["data.scheme=column", "data.column=hospital"]
    if split.startswith("dirichlet"):
        return ["data.scheme=dirichlet", f"data.alpha={float(split.removeprefix('dirichlet'))}"]
    raise SystemExit(f"unknown split {split!r}; use iid, natural or dirichletALPHA (e.g. dirichlet0.5)")


def pooled_test_auroc(ckpt: str | Path, recipe) -> float | None:
    from fedxr.evaluation import evaluate_checkpoint

    res = evaluate_checkpoint(ckpt, recipe.layout.sites, split="test", out=Path(ckpt).parent / "eval_pooled_test",
                              cache_dir=recipe.data.cache_dir, progress=False)
    return res.macro_auroc


def run_method(method: str, recipe) -> dict:
    from fedxr.federated.fedbn import site_models
    from fedxr.federated.run import federate
    from fedxr.training import train

    t0 = time.perf_counter()
    fed = recipe.federated
    epochs = fed.rounds * fed.local_epochs
    baseline = recipe.changed("baseline epochs", model={"max_epochs": epochs})  # the federation's local work
    if method == "central":
        s = train(baseline, recipe.layout.sites, mode="central", progress=False)
        scores = [pooled_test_auroc(s["best"], recipe)]
    elif method == "local":
        scores = [pooled_test_auroc(train(baseline, recipe.layout.sites, mode="local", site=site, progress=False)["best"],
                                    recipe) for site in site_manifest_paths(recipe.layout.sites)]
    else:
        algorithm = "fedavg" if method == "fedbn" else method
        r = recipe.changed(method, federated={"algorithm": algorithm, "fedbn": method == "fedbn",
                                           "cross_site_eval": False})
        summary = federate(r, "sim", restart=True)  # a measurement: never a kept earlier run
        if method == "fedbn":
            # each site's own model, as fedxr gathers it (the model its own validation scored best)
            scores = [pooled_test_auroc(p, r) for p in site_models(summary.checkpoint).values()]
        else:
            scores = [pooled_test_auroc(summary.checkpoint, r)]
    valid = [s for s in scores if s is not None]
    return {"method": method, "macro_auroc": sum(valid) / len(valid) if valid else None,
            "per_model": scores, "wall_s": round(time.perf_counter() - t0, 1)}


def save(args, base: list[str], table: dict, splits: list[str], methods: list[str], complete: bool) -> Path:
    goals = {split: split_goals(table[split]) for split in ("dirichlet0.5", "natural") if split in table}
    recipe_used = load_recipe(args.recipe, base + list(args.overrides)).resolved()
    return write_result("federated_accuracy", {"table": table, "goals": {k: v for k, v in goals.items() if v},
                                               "recipe": recipe_used, "splits": splits, "methods": methods,
                                               "seeds": args.seeds, "complete": complete}, smoke=args.smoke)


def summarise_seeds(runs: list[dict]) -> dict:
    """Mean ± sample standard deviation of the macro AUROC over the seeds' runs."""
    import numpy as np

    values = [r["macro_auroc"] for r in runs if r["macro_auroc"] is not None]
    return {"macro_auroc": float(np.mean(values)) if values else None,
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "seeds": len(runs), "per_seed": [r["macro_auroc"] for r in runs], "runs": runs,
            "wall_s": round(sum(r["wall_s"] for r in runs), 1)}


def split_goals(row: dict) -> dict:
    """The issue's goals for one split: the best federated method ≥ central − 0.02 and ≥ mean local + 0.05."""
    fed = {m: row[m]["macro_auroc"] for m in FEDERATED if row.get(m, {}).get("macro_auroc") is not None}
    ce, lo = (row.get(k, {}).get("macro_auroc") for k in ("central", "local"))
    if not fed or None in (ce, lo):
        return {}
    best = max(fed, key=fed.get)
    return {"best_federated": best, "best_minus_central": round(fed[best] - ce, 4),
            "best_ge_central_minus_0.02": fed[best] >= ce - 0.02, "best_minus_local_mean": round(fed[best] - lo, 4),
            "best_ge_local_plus_0.05": fed[best] >= lo + 0.05}


def cell(entry: dict) -> str:
    if entry["macro_auroc"] is None:
        return "–"
    return f"{entry['macro_auroc']:.3f}" + (f" ± {entry['sd']:.3f}" if entry.get("sd") is not None else "")


def plot(table: dict, methods: list[str], path: Path) -> None:
    import numpy as np

    splits = list(table)
    width = 0.8 / len(methods)
    with saved_figure(path, dpi=100, figsize=(2 + 2.2 * len(splits), 4.5)) as (fig, ax):
        for i, m in enumerate(methods):
            vals = [table[s].get(m, {}).get("macro_auroc") or np.nan for s in splits]
            err = [table[s].get(m, {}).get("sd") or 0.0 for s in splits]
            ax.bar(np.arange(len(splits)) + i * width - 0.4 + width / 2, vals, width, yerr=err, capsize=2, label=m)
        ax.set_xticks(range(len(splits)), splits)
        ax.set_ylim(0.45, None)
        ax.axhline(0.5, c="grey", lw=0.7, ls=":")
        ax.set_ylabel("pooled test macro AUROC")
        ax.set_title("federated accuracy on phantom data (same total compute; mean ± sd over seeds)")
        ax.legend(fontsize=8, ncol=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench_federated_accuracy"))
    ap.add_argument("--smoke", action="store_true", help="tiny data, one split, three methods, one round")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds per cell (model.seed = 0..N-1)")
    ap.add_argument("--merge", action="store_true",
                    help="add these splits to the table in results/federated_accuracy.json (same settings) instead of replacing it")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    work = Path(args.workdir) / ("smoke" if args.smoke else "full")
    splits, methods = args.splits.split(","), args.methods.split(",")
    base = [f"data.root={work / 'phantom'}", f"data.cache_dir={work / 'cache'}", f"output.runs_dir={work / 'runs'}"]
    if args.smoke:
        splits, methods = ["iid"], ["central", "fedavg", "local"]
        base += ["data.phantom.patients=40", "data.phantom.hospitals=2", "data.phantom.size=32", "data.image_size=32",
                 "data.sites=2", "federated.min_clients=2", "federated.rounds=1", "data.batch_size=8"]
    table: dict = {}
    if args.merge and (RESULTS / "federated_accuracy.json").is_file():
        earlier = json.loads((RESULTS / "federated_accuracy.json").read_text())
        table = {k: v for k, v in earlier["table"].items() if k not in splits}
        splits = list(table) + splits
    for split in [s for s in splits if s not in table]:
        recipe = load_recipe(args.recipe, base + split_overrides(split) + [f"output.name={split}"] + list(args.overrides))
        ensure_dataset(recipe, progress=False)
        ensure_sites(recipe, force=True)
        table[split] = {}
        for m in methods:
            runs = []
            for seed in range(args.seeds):
                print(f"--- {split}: {m}, seed {seed}", flush=True)
                runs.append(run_method(m, recipe.changed(f"seed {seed}", model={"seed": seed})))
                print(f"    macro AUROC {runs[-1]['macro_auroc']}  ({runs[-1]['wall_s']} s)", flush=True)
            table[split][m] = summarise_seeds(runs)
            # Written after every cell: a run stopped part-way keeps what it measured ("complete": false).
            path = save(args, base, table, splits, methods, complete=False)
    path = save(args, base, table, splits, methods, complete=True)
    goals = json.loads(path.read_text())["goals"]
    if not args.smoke:
        plot(table, methods, RESULTS / "federated_accuracy.png")
    header = "| split | " + " | ".join(methods) + " |"
    print(header + "\n|" + "---|" * (len(methods) + 1))
    for split, row in table.items():
        print(f"| {split} | " + " | ".join(cell(row[m]) for m in methods) + " |")
    print(f"goals: {json.dumps(goals)}\nwrote {path}")


if __name__ == "__main__":
    main()
