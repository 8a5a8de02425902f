"""What distillation adds, over training seeds: the quickstart's student with and without the teacher.

    python benchmarks/distill_gain.py --seeds 3        # after `make demo`: its teacher, 3 seeds (~15 min, 2 cores)
    python benchmarks/distill_gain.py --smoke          # toy data, 2 seeds, 1 round, central distillation (CI)

For each training seed (model.seed = 0..N-1; the data, the split and the teacher stay fixed) the recipe's
first student is distilled federatedly from the teacher and trained the same way without it, exactly as
`fedxr run` does; both are scored on the pooled test set. Reports per seed the student's and the
ablation's macro AUROC, the KD gain with its paired bootstrap interval, and over the seeds the mean ±
standard deviation of the gain and of student − teacher. Writes results/distill_gain.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import toy_federation, write_result  # noqa: E402

from fedxr.config import load_recipe  # noqa: E402
from fedxr.errors import FedxrError  # noqa: E402
from fedxr.layout import GLOBAL_LAST, chosen_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_seed(recipe, teacher: Path, seed: int) -> dict:
    import shutil

    from fedxr.distill.report import compare_students
    from fedxr.distill.run import distill

    seeded = recipe.changed(f"seed {seed}", model={"seed": seed}, output={"name": f"{recipe.output.name}_kdseed{seed}"})
    if not seeded.layout.sites.exists():
        shutil.copytree(recipe.layout.sites, seeded.layout.sites)  # the same site manifests as the teacher's run
    distilled = distill(seeded, teacher, progress=False)
    report = compare_students(seeded, distilled, progress=False)
    student = next(iter(distilled.students))
    row = report["students"][student]
    return {"seed": seed, "student": student, "kd": row["macro_auroc"], "no_kd": row["no_kd"]["macro_auroc"],
            "teacher": report["teacher"]["macro_auroc"], "kd_gain": row["kd_gain"],
            "kd_gain_ci95": row["kd_gain_paired"]["ci95"], "vs_teacher": row["auroc_vs_teacher"],
            "mac_ratio": row["mac_ratio"]}


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--teacher", help="teacher checkpoint (default: the recipe run's federate/global_best.ckpt)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.smoke:
        work = ROOT / "runs" / "bench_distill_gain_smoke"
        # Central distillation: the same run_seed path at a fraction of the time (federated distillation has its
        # own tests in tests/test_distill_federated.py).
        overrides = [*toy_federation(work), "federated.rounds=1", "distill.students=[tiny_cnn]", "distill.rounds=1",
                     "distill.mode=central", *overrides]
        args.seeds = 2
    recipe = load_recipe(args.recipe, overrides)
    if args.smoke:  # toy data and sites; a teacher federated here unless one is given (CI gives its tiny run's)
        from fedxr.data.prepare import ensure_dataset, ensure_sites
        from fedxr.federated.run import federate

        ensure_dataset(recipe, progress=False)
        ensure_sites(recipe)
        if not args.teacher and not (recipe.layout.federate / GLOBAL_LAST).is_file():
            federate(recipe, "sim")
    try:  # the run's federated teacher as `fedxr run` picks it
        teacher = Path(args.teacher) if args.teacher else chosen_checkpoint(recipe.layout.federate)
    except FedxrError:
        raise SystemExit(f"no teacher in {recipe.layout.federate}: run `make demo` (or `fedxr run {args.recipe}`) "
                         "first, or pass --teacher") from None
    rows = []
    for seed in range(args.seeds):
        print(f"--- seed {seed}", flush=True)
        rows.append(run_seed(recipe, teacher, seed))
        r = rows[-1]
        print(f"    KD {r['kd']:.4f}  no KD {r['no_kd']:.4f}  gain {r['kd_gain']:+.4f}  teacher {r['teacher']:.4f}", flush=True)
    summary = {"kd_gain": mean_sd([r["kd_gain"] for r in rows]), "vs_teacher": mean_sd([r["vs_teacher"] for r in rows]),
               "kd": mean_sd([r["kd"] for r in rows]), "no_kd": mean_sd([r["no_kd"] for r in rows]),
               "gain_positive_in": sum(r["kd_gain"] > 0 for r in rows), "seeds": len(rows)}
    path = write_result("distill_gain", {"teacher": str(teacher), "rows": rows, "summary": summary,
                                         "recipe": recipe.resolved()}, smoke=args.smoke)
    g, v = summary["kd_gain"], summary["vs_teacher"]
    sd = lambda x: f" ± {x['sd']:.4f}" if x["sd"] is not None else ""  # noqa: E731
    print(f"KD gain {g['mean']:+.4f}{sd(g)} over {len(rows)} seeds (positive in {summary['gain_positive_in']}); "
          f"student − teacher {v['mean']:+.4f}{sd(v)}\nwrote {path}")


if __name__ == "__main__":
    main()
