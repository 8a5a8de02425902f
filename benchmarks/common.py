"""Helpers shared by the benchmark scripts: machine facts and writing results as JSON."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """Machine, device and library versions, stored with every result."""
    import numpy

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        info["device"] = "cpu"
    try:
        from fedxr.precision import cpu_bf16_flags, resolve_precision

        # What `model.precision: auto` trains in here: a figure measured in bf16 is not an FP32 figure.
        info["cpu_bf16_flags"] = list(cpu_bf16_flags())
        info["precision_auto"] = resolve_precision("auto", "auto")[0]
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "")
    except OSError:
        pass
    return info


def write_result(name: str, payload: dict, smoke: bool = False) -> Path:
    """Write ``results/NAME.json`` (``NAME.smoke.json`` in smoke mode, which is not committed)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'.smoke' if smoke else ''}.json"
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2))
    return path


def toy_federation(work: Path) -> list[str]:
    """Recipe overrides for a benchmark's --smoke run: 40 phantom patients of 2 hospitals at 32 px, 2 sites,
    tiny_cnn, everything under ``work``. Each script adds what it varies (rounds, students, ...)."""
    return [f"data.root={work / 'phantom'}", "data.phantom.patients=40", "data.phantom.hospitals=2",
            "data.phantom.size=32", "data.image_size=32", "data.sites=2", "data.batch_size=8",
            "data.num_workers=0", f"data.cache_dir={work / 'cache'}", f"output.runs_dir={work / 'runs'}",
            "model.name=tiny_cnn", "federated.min_clients=2"]


def one_epoch_checkpoints(work: Path, models: dict[str, tuple[str, int]], patients: int) -> tuple[dict[str, Path], Path]:
    """A fedxr checkpoint per role, ``{role: (registry model, input size)}``, each trained for one epoch on a
    small phantom set (real weights and validation AUROC, if modest: what an edge benchmark needs to export
    and time a model). Returns the checkpoints and the sites folder the exporter takes validation images from."""
    import lightning as L

    from fedxr.config import load_recipe
    from fedxr.data.manifest import site_manifest_paths
    from fedxr.data.prepare import ensure_dataset, ensure_sites
    from fedxr.training import make_classifier, make_datamodule, make_trainer

    largest = max(size for _, size in models.values())
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml", [
        f"data.root={work / 'phantom'}", f"data.phantom.patients={patients}", f"data.phantom.size={max(largest, 48)}",
        f"data.image_size={largest}", "data.sites=1", "data.scheme=iid", "federated.min_clients=1", "data.num_workers=0",
        f"data.cache_dir={work / 'cache'}", f"output.runs_dir={work / 'runs'}", "model.max_epochs=1", "data.batch_size=16"])
    ensure_dataset(recipe, progress=False)
    sites, _ = ensure_sites(recipe)
    manifests = list(site_manifest_paths(sites).values())
    checkpoints = {}
    for role, (name, size) in models.items():
        L.seed_everything(0, verbose=False)
        r = recipe.changed(role, model={"name": name}, data={"image_size": size})
        dm = make_datamodule(r, manifests, progress=False)
        module = make_classifier(r, dm)
        make_trainer(r, work / f"train_{role}", progress=False, logger=False, enable_model_summary=False).fit(module, datamodule=dm)
        checkpoints[role] = module.save_fedxr_checkpoint(work / f"{role}.ckpt")
    return checkpoints, sites
