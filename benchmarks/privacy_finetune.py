"""Differential privacy that keeps a useful model: public pretraining, then private fine-tuning at the sites.

    python benchmarks/privacy_finetune.py              # after `make demo`: the quickstart sites (~20 min, 2 cores)
    python benchmarks/privacy_finetune.py --smoke      # toy data, 1 round each (CI)

1. **Public model**: the quickstart teacher's architecture with GroupNorm (what DP-SGD trains), trained without
   DP on a phantom draw of *other* hospitals (another seed: other patients, other acquisition profiles and case
   mix) — public data of another population, as NIH ChestX-ray14 is for a hospital federation.
2. **Fine-tuning at the three quickstart sites**, federated, every row from the same public start (or from
   scratch where it says so), the global model chosen on validation only and scored once on the pooled test set:
   the public model as it is (what fine-tuning has to add); non-private (GroupNorm, all weights) as the reference; DP-SGD at ε = 8 per site for each setting of the
   sweep (``--sweep TRAINABLE:LR …``), the setting chosen by validation AUROC at ε = 8 and used at ε = 1;
   DP-SGD from scratch at ε = 8 with the chosen setting. The BatchNorm teacher from scratch without DP is the
   quickstart's own figure (`make demo`), quoted beside.

Writes results/privacy_finetune.json and .png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, toy_federation, write_result  # noqa: E402
from privacy_utility import _prepare, _variant, federate_and_score  # noqa: E402

from fedxr.config import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def public_model(base, epochs: int) -> Path:
    """The public checkpoint: central training on another phantom population, GroupNorm, no DP."""
    from fedxr.training import train

    folder = Path(base.data.root).parent / f"{Path(base.data.root).name}_public"
    recipe = base.changed("public data", data={"root": str(folder), "phantom": {"seed": base.data.phantom.seed + 101}},
                          model={"norm": "group", "max_epochs": epochs},
                          output={"name": f"{base.output.name}_public"}, distill={"students": []})
    _prepare(recipe)
    summary_path = recipe.layout.root / "train_central" / "summary.json"
    if summary_path.is_file():
        return Path(json.loads(summary_path.read_text())["best"])
    print(f"--- public model: {recipe.model.name} (GroupNorm) on {folder}, {epochs} epochs, central", flush=True)
    return Path(train(recipe, recipe.layout.sites, mode="central", progress=False)["best"])


def fine_tune(base, label: str, rounds: int, init: Path | None, epsilon: float | None, trainable: str,
              lr: float | None) -> dict:
    from fedxr.models.checkpoint import load_checkpoint

    dp = {"epsilon": epsilon, **({"lr": lr} if lr else {})} if epsilon else False
    slug = re.sub(r"[^A-Za-z0-9]+", "_", label.replace("ε", "eps").replace(".", "p")).strip("_")
    name = f"{base.output.name}_ft_{slug}"
    recipe = _variant(base, label, name, privacy={"dp": dp}, federated={"rounds": rounds},
                      model={"init_from": str(init) if init else None, "trainable": trainable, "norm": "group"})
    saved = recipe.layout.root / "bench_row.json"
    if saved.is_file() and json.loads(saved.read_text()).get("rounds") == rounds:  # measured before: reuse it
        print(f"--- {label}: measured in {saved}", flush=True)
        return json.loads(saved.read_text())
    _prepare(recipe)
    print(f"--- {label}: {rounds} rounds", flush=True)
    scored = federate_and_score(recipe)
    selection = load_checkpoint(scored["checkpoint"])["metrics"].get("selection", {})
    val = max(selection.get("val_auroc", {}).values(), default=None)
    if val is None:  # no best-model selection (a toy run): the best validation AUROC of a global model by round
        table = json.loads((recipe.layout.federate / "rounds.json").read_text())
        val = max((r["aggregate_val_auroc"] for r in table if r.get("aggregate_val_auroc") is not None), default=0.0)
    row = {"label": label, "init": "public" if init else "scratch", "epsilon": epsilon, "trainable": trainable,
           "lr": lr or recipe.model.lr, "optimizer": recipe.privacy.dp.optimizer if epsilon else "adamw",
           "val_auroc": val, **scored}
    print(f"    val {val:.4f}, test {row['macro_auroc']:.4f} ({row['macro_auroc_ci95'][0]:.3f}–"
          f"{row['macro_auroc_ci95'][1]:.3f}), {row['seconds']:.0f} s", flush=True)
    row["rounds"] = rounds
    saved.write_text(json.dumps(row, indent=2))
    return row


def public_as_is(base, public: Path) -> dict:
    """The public model on the sites' test images without any fine-tuning: what fine-tuning has to add."""
    from fedxr.evaluation import evaluate_checkpoint

    score = evaluate_checkpoint(public, base.layout.sites, split="test", cache_dir=base.data.cache_dir,
                                out=public.parent / "eval_quickstart_test", progress=False)
    val = evaluate_checkpoint(public, base.layout.sites, split="val", cache_dir=base.data.cache_dir,
                              out=public.parent / "eval_quickstart_val", progress=False)
    print(f"--- public model, no fine-tuning: val {val['macro_auroc']:.4f}, test {score['macro_auroc']:.4f}", flush=True)
    return {"label": "public model, no fine-tuning", "init": "public", "epsilon": None, "trainable": "none",
            "lr": None, "optimizer": None, "val_auroc": val["macro_auroc"], "macro_auroc": score["macro_auroc"],
            "macro_auroc_ci95": score["macro_auroc_ci95"], "seconds": 0.0, "epsilon_spent": None,
            "noise_multiplier": None, "within_target": None}


def plot(rows: list[dict], path: Path) -> None:
    from fedxr.plots import saved_figure

    with saved_figure(path, dpi=100, figsize=(7, 0.45 * len(rows) + 1.2)) as (fig, ax):
        ys = range(len(rows))
        xs = [r["macro_auroc"] for r in rows]
        err = [[x - r["macro_auroc_ci95"][0] for x, r in zip(xs, rows)],
               [r["macro_auroc_ci95"][1] - x for x, r in zip(xs, rows)]]
        ax.errorbar(xs, ys, xerr=err, fmt="o", capsize=3)
        ax.set_yticks(list(ys), [r["label"] for r in rows], fontsize=7)
        ax.axvline(0.5, color="r", ls=":", lw=1)
        ax.set_xlabel("test macro AUROC (95 % interval), pooled quickstart test set")
        ax.set_title("public pretraining, private fine-tuning", fontsize=9)
        ax.invert_yaxis()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    ap.add_argument("--rounds", type=int, default=3, help="fine-tuning rounds of every row")
    ap.add_argument("--public-epochs", type=int, default=4)
    ap.add_argument("--sweep", nargs="+", default=["head:0.1", "head:0.5", "head:2", "last_blocks:0.5"],
                    help="DP settings tried at ε = 8, each TRAINABLE:LR (model.trainable, privacy.dp.lr)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.smoke:
        work = ROOT / "runs" / "bench_privacy_finetune_smoke"
        overrides = [*toy_federation(work), "federated.cross_site_eval=false", "distill.students=[]", *overrides]
        args.rounds, args.public_epochs, args.sweep = 1, 1, ["head:0.5"]
    base = load_recipe(args.recipe, overrides)
    _prepare(base)  # the sites every row fine-tunes at (and is scored on): the same manifests for all
    public = public_model(base, args.public_epochs)
    rows = [public_as_is(base, public), fine_tune(base, "no DP, all weights", args.rounds, public, None, "all", None)]
    settings = [(t, float(lr)) for t, lr in (item.split(":") for item in args.sweep)]
    sweep = [fine_tune(base, f"ε=8 {t} lr={lr:g}", args.rounds, public, 8.0, t, lr) for t, lr in settings]
    rows += sweep
    best = max(sweep, key=lambda r: r["val_auroc"] or 0)  # chosen on validation, never on test
    rows.append(fine_tune(base, f"ε=1 {best['trainable']} lr={best['lr']:g}", args.rounds, public, 1.0,
                          best["trainable"], best["lr"]))
    rows.append(fine_tune(base, f"ε=8 from scratch {best['trainable']} lr={best['lr']:g}", args.rounds, None, 8.0,
                          best["trainable"], best["lr"]))
    reference = rows[1]["macro_auroc"]
    at = {eps: next(r for r in rows if r["epsilon"] == eps and r["init"] == "public"
                    and r["trainable"] == best["trainable"] and r["lr"] == best["lr"]) for eps in (8.0, 1.0)}
    gaps = {f"epsilon_{eps:g}": round(reference - r["macro_auroc"], 4) for eps, r in at.items()}
    png = RESULTS / f"privacy_finetune{'.smoke' if args.smoke else ''}.png"
    plot(rows, png)
    path = write_result("privacy_finetune", {
        "rows": rows, "chosen_on_validation": {"trainable": best["trainable"], "lr": best["lr"]},
        "gap_to_non_private": gaps, "goals": {"epsilon_8": 0.03, "epsilon_1": 0.08},
        "public_checkpoint": str(public), "rounds": args.rounds, "plot": str(png.relative_to(ROOT)),
        "recipe": base.resolved()}, smoke=args.smoke)
    print(f"gap to non-private fine-tuning: ε=8 {gaps['epsilon_8']:+.4f} (goal ≤ 0.03), ε=1 {gaps['epsilon_1']:+.4f} "
          f"(goal ≤ 0.08)\nwrote {path} and {png}")


if __name__ == "__main__":
    main()
