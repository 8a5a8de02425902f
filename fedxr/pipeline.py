"""`fedxr run RECIPE`: the stages a recipe drives, in order.

Stages so far: data (generate the phantom set when asked and absent) → sites (patient-wise site
manifests) → teacher (federated training with NVFlare, in the recipe's ``federated.env``) →
evaluate (the global model on every site's test split, pooled) → export (verified ONNX). Data and
sites are skipped when their outputs are up to date. Distillation, explanation and the report join
as they land.
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
    from fedxr.federated.run import federate, format_summary

    timings: dict[str, float] = {}
    t = _banner("data")
    root, made = ensure_dataset(recipe, progress=progress)
    print(f"{'generated' if made else 'found (skipped)'}: {root}")
    timings["data"] = time.perf_counter() - t

    t = _banner("sites")
    sites, written = ensure_sites(recipe, force=force)
    print(f"{'wrote' if written else 'up to date (skipped)'}: {sites}")
    timings["sites"] = time.perf_counter() - t

    t = _banner(f"teacher (federated, {recipe.federated.env}, {recipe.federated.algorithm}, "
                f"{recipe.federated.rounds} rounds, {recipe.model.name})")
    fed = federate(recipe, env=recipe.federated.env, recipe_path=str(recipe_path))
    print(format_summary(fed, recipe))
    timings["teacher"] = time.perf_counter() - t

    t = _banner("evaluate (global model, every site's test split pooled)")
    ckpt = fed["checkpoints"].get("global_best") or fed["checkpoints"]["global_last"]
    result = evaluate_checkpoint(ckpt, sites, split="test", cache_dir=recipe.data.cache_dir, num_workers=0,
                                 progress=progress)
    print(format_result(result))
    timings["evaluate"] = time.perf_counter() - t

    t = _banner("export (ONNX FP32 + INT8, verified)")
    from fedxr.export.exporter import export_checkpoint, format_manifest

    ex = recipe.export
    manifest = export_checkpoint(ckpt, Path(ex.out) / f"{recipe.output.name}_{recipe.model.name}", int8=ex.int8,
                                 fp16=ex.fp16, opset=ex.opset, data=sites, calibration_images=ex.calibration_images,
                                 parity_tolerance=ex.parity_tolerance)
    print(format_manifest(manifest))
    timings["export"] = time.perf_counter() - t
    total = sum(timings.values())
    print(f"\ndone in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    print(f"teacher:  {ckpt}\nmetrics:  {result['out']}/metrics.json\nrounds:   {fed.get('rounds')}")
    print(f"export:   {manifest['out']}/ (manifest.json)")
    print(f"try it:   python -m fedxr.edge predict {manifest['out']} ../shared/data/nih/00000001_000.png  (any PNG, JPEG or DICOM)")
    if not manifest["ok"]:
        from fedxr.errors import FedxrError

        raise FedxrError(f"export checks failed; see {manifest['out']}/manifest.json")
    return {"timings": timings, "federate": fed, "evaluate": result, "export": manifest}
