"""`fedxr run RECIPE`: the stages a recipe drives, in order.

Stages so far: data (generate the phantom set when asked and absent) → sites (patient-wise site
manifests) → teacher (centralised baseline training until the federated stage lands) → evaluate.
Each stage prints what it does; data and sites are skipped when their outputs are up to date.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedxr.config import Recipe


def _banner(name: str) -> float:
    print(f"\n=== stage: {name} ===", flush=True)
    return time.perf_counter()


def run_pipeline(recipe: Recipe, recipe_path: str | Path, force: bool = False, progress: bool = True) -> dict:
    from fedxr.data.prepare import ensure_dataset, ensure_sites
    from fedxr.evaluation import evaluate_checkpoint, format_result
    from fedxr.training import train

    timings: dict[str, float] = {}
    t = _banner("data")
    root, made = ensure_dataset(recipe, progress=progress)
    print(f"{'generated' if made else 'found (skipped)'}: {root}")
    timings["data"] = time.perf_counter() - t

    t = _banner("sites")
    sites, written = ensure_sites(recipe, force=force)
    print(f"{'wrote' if written else 'up to date (skipped)'}: {sites}")
    timings["sites"] = time.perf_counter() - t

    t = _banner("teacher (central training)")
    summary = train(recipe, sites, mode="central", progress=progress)
    timings["teacher"] = time.perf_counter() - t

    t = _banner("evaluate")
    result = evaluate_checkpoint(summary["best"], sites, split="test", cache_dir=recipe.data.cache_dir,
                                 num_workers=0, progress=progress)
    print(format_result(result))
    timings["evaluate"] = time.perf_counter() - t
    total = sum(timings.values())
    print(f"\ndone in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print(f"checkpoint: {summary['best']}\nmetrics:    {result['out']}/metrics.json")
    return {"timings": timings, "train": summary, "evaluate": result}
