"""``fedxr edge-federate RECIPE``: the student fine-tuned across simulated devices with NVFlare's edge stack.

The run folder's ``edge_federation/`` receives:

* ``population/`` — which of the site's training films each device holds (``population.json`` says how many);
* ``workspace/`` — NVFlare's simulator workspace (server and leaf-client logs);
* ``versions/`` and ``versions.jsonl`` — every model version the server made, with the updates behind it;
* ``device_tasks.jsonl`` — what each device did with each task (trained, dropped, straggled; films, steps);
* ``final.ckpt`` — the last version as a fedxr checkpoint (thresholds chosen again on the site's validation
  split), ready for ``python -m fedxr.export``;
* ``summary.json`` and ``versions.png`` — validation AUROC per version, devices heard from, dropped and stale,
  and the start and final models on the site's test split with the paired difference.

Not bit-reproducible, unlike ``fedxr federate`` in the simulator: devices train in threads and the server folds
updates in as they arrive, so which version a late update lands on depends on timing — as on real devices.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fedxr.config import EdgeFederationConfig, Recipe
from fedxr.data.atomic import write_bytes_atomic, write_json_atomic
from fedxr.crossdevice.device import TASK_LOG, StudentDevice
from fedxr.crossdevice.network import EdgeStudent
from fedxr.crossdevice.population import deal_devices, write_population
from fedxr.crossdevice.server import VERSIONS_FILE, RecordingModelManager, version_file
from fedxr.errors import FedxrError
from fedxr.records import read_lines

SUMMARY_FILE = "summary.json"
#: ``runtime: executorch``: the student's training step as the devices run it (ExecuTorch program).
DEVICE_PROGRAM = "device_step.pte"
PLOT_FILE = "versions.png"
FINAL_CHECKPOINT = "final.ckpt"
START_CHECKPOINT = "start.ckpt"
JOB_NAME = "fedxr_edge"


def default_start(recipe: Recipe, student: str | Path | None = None) -> Path:
    """The run's first student (distilled with the teacher; ``student`` when the caller has it): the model the
    devices keep improving. A FedBN run's students are one per site: devices holding a site's films start from that
    site's own (its BatchNorm), not the global checkpoint whose pooled statistics no site deploys."""
    from fedxr.federated.fedbn import site_models
    from fedxr.layout import chosen_checkpoint

    if student is None:
        if not recipe.distill.students:
            raise FedxrError("edge_federation: the recipe distils no student (distill.students is empty); set "
                             "edge_federation.init_from to a student checkpoint")
        student = chosen_checkpoint(recipe.layout.stage(recipe.layout.student_stage(recipe.distill.students[0])))
    cfg = recipe.edge_federation
    own = {} if cfg.manifest else site_models(student)
    return Path(own.get(cfg.site, student))


def site_manifest(recipe: Recipe, site: str) -> Path:
    from fedxr.data.manifest import site_manifest_paths
    from fedxr.data.prepare import require_sites

    paths = site_manifest_paths(require_sites(recipe))
    if site not in paths:
        raise FedxrError(f"edge_federation.site: no site {site!r} in {recipe.layout.sites}; the sites are "
                         f"{', '.join(paths)}")
    return paths[site]


def device_program(cfg: EdgeFederationConfig, ckpt: dict, start: Path) -> bytes | None:
    """``runtime: executorch``: the student's training step as an ExecuTorch program for a batch of
    ``cfg.batch_size`` films (None for the PyTorch runtime); a student ExecuTorch cannot train is refused here,
    before anything is written."""
    if cfg.runtime != "executorch":
        return None
    from fedxr.crossdevice.ondevice import check_trainable_on_device, export_training_step
    from fedxr.labels import NUM_LABELS

    net = EdgeStudent(ckpt["model_name"], weights=str(start), norm=ckpt.get("norm", "batch")).net
    check_trainable_on_device(net, ckpt["model_name"])
    size = ckpt["preprocessing"].size
    return export_training_step(net.train(), torch.zeros(cfg.batch_size, 1, size, size),
                                torch.zeros(cfg.batch_size, NUM_LABELS))


def build_job(cfg: EdgeFederationConfig, start: Path, ckpt: dict, folder: Path, population: Path,
              program: Path | None = None):
    """NVFlare's FedBuff edge job (what ``EdgeFedBuffRecipe`` builds) with fedxr's student, devices and model
    manager; the recipe class itself hard-wires NVFlare's own manager, which keeps no version."""
    from nvflare.app_opt.pt.job_config.model import PTModel
    from nvflare.edge.aggregators.model_update_dxo_factory import ModelUpdateDXOAggrFactory
    from nvflare.edge.assessors.buff_device_manager import BuffDeviceManager
    from nvflare.edge.assessors.model_update import ModelUpdateAssessor
    from nvflare.edge.tools.edge_job import EdgeJob
    from nvflare.recipe.spec import Recipe as FlareRecipe

    norm = ckpt.get("norm", "batch")
    pre = ckpt["preprocessing"]
    dp = privacy_settings(cfg)
    devices = StudentDevice(
        population=str(population.resolve()), model_name=ckpt["model_name"], norm=norm, mean=float(pre.mean),
        std=float(pre.std), lr=cfg.lr, momentum=cfg.momentum, local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size, dropout=cfg.dropout, stragglers=cfg.stragglers,
        straggler_delay_s=cfg.straggler_delay_s, seed=cfg.seed, log_dir=str(folder.resolve()),
        dp_clip=dp["clip"] if dp else 0.0, dp_std=dp["noise_std"] if dp else 0.0,
        dp_max_updates=dp["max_updates"] if dp else 0, executorch_program=str(program.resolve()) if program else "")
    job = EdgeJob(name=JOB_NAME, edge_method="edge")
    job.configure_simulation(devices, job_timeout=cfg.timeout_s, num_devices=cfg.devices, num_workers=cfg.workers)
    # update_timeout is per message from a client to its parent; one timeout ends that client's part in the job
    # (NVFlare's HUG executor), so it is generous.
    job.configure_client(aggregator_factory=ModelUpdateDXOAggrFactory(), max_model_versions=cfg.max_staleness or cfg.versions,
                         update_timeout=cfg.timeout_s)
    model = EdgeStudent(ckpt["model_name"], weights=str(start.resolve()), norm=norm)
    persistor_id = job.to_server(PTModel(model=model), id="persistor")["persistor_id"]
    manager_id = job.to_server(RecordingModelManager(
        num_updates_for_model=cfg.updates_per_version, max_model_history=cfg.max_staleness, global_lr=cfg.global_lr,
        staleness_weight=cfg.staleness_weight, out_dir=str(folder.resolve())), id="model_manager")
    device_manager_id = job.to_server(BuffDeviceManager(
        device_selection_size=cfg.selection, min_hole_to_fill=1, device_reuse=True), id="device_manager")
    job.configure_server(assessor=ModelUpdateAssessor(
        persistor_id=persistor_id, model_manager_id=manager_id, device_manager_id=device_manager_id,
        max_model_version=cfg.versions, device_wait_timeout=cfg.timeout_s))
    return FlareRecipe(job)


def privacy_settings(cfg: EdgeFederationConfig) -> dict | None:
    """The per-device DP mechanism of the recipe (fedxr.crossdevice.privacy), or None."""
    if not cfg.dp:
        return None
    from fedxr.crossdevice.privacy import noise_multiplier

    multiplier = noise_multiplier(cfg.dp.epsilon, cfg.dp.delta, cfg.dp.max_updates)
    return {"epsilon": cfg.dp.epsilon, "delta": cfg.dp.delta, "clip": cfg.dp.clip, "max_updates": cfg.dp.max_updates,
            "noise_multiplier": multiplier, "noise_std": multiplier * 2 * cfg.dp.clip,
            "mechanism": "each update clipped to L2 norm clip and noised on the device (Gaussian, sensitivity "
                         "2 x clip: a device's films replaced); RDP accountant (Opacus), no subsampling"}


def privacy_spent(folder: Path, dp: dict) -> dict:
    """Per device, ε spent by the noised updates it sent (from the devices' task log)."""
    from fedxr.crossdevice.privacy import epsilon_spent

    lines = _task_log(folder)
    sent: dict[int, int] = {}
    for t in lines:
        if "dp_updates" in t:
            sent[t["device"]] = max(sent.get(t["device"], 0), t["dp_updates"])
    most = max(sent.values(), default=0)
    clipped = [t["clipped"] for t in lines if "clipped" in t]
    from fedxr.crossdevice.population import Population

    population = Population.read(folder / "population")
    holders = np.bincount(np.concatenate([population.shard(d) for d in range(population.devices)]),
                          minlength=population.films)
    from fedxr.crossdevice.privacy import film_epsilon_bound

    return {**dp, "devices_that_sent": len(sent), "most_updates_by_one_device": most,
            "most_devices_holding_one_film": int(holders.max()),
            "film_epsilon_bound": film_epsilon_bound(dp["noise_multiplier"], dp["delta"], dp["max_updates"],
                                                     int(holders.max())),
            "max_epsilon_spent": epsilon_spent(dp["noise_multiplier"], dp["delta"], most),
            "share_clipped": float(np.mean(clipped)) if clipped else None,
            "refused_for_budget": sum(1 for t in lines if t["behaviour"] == "budget_spent")}


def score_versions(folder: Path, ckpt: dict, dm) -> list[dict]:
    """Validation macro AUROC of every version the server made (version 1 is the starting student)."""
    from fedxr.evaluation import predict
    from fedxr.models.metrics import multilabel_scores

    records = read_lines(folder / VERSIONS_FILE)
    net = EdgeStudent(ckpt["model_name"], norm=ckpt.get("norm", "batch")).net
    for rec in records:
        net.load_state_dict(torch.load(version_file(folder, rec["version"]), weights_only=True))
        with torch.no_grad():
            probs, targets = predict(net, dm.val_dataloader())
        macro = multilabel_scores(probs, targets)["macro_auroc"]
        rec["val_macro_auroc"] = None if macro != macro else macro  # NaN: no finding with both classes
    return records


def save_final(folder: Path, version: int, ckpt: dict, dm, recipe: Recipe, start: Path,
               privacy: dict | None = None) -> Path:
    """The last version as a fedxr checkpoint, its thresholds chosen on the site's validation split."""
    from fedxr.evaluation import predict
    from fedxr.models.checkpoint import save_checkpoint
    from fedxr.models.metrics import choose_thresholds

    net = EdgeStudent(ckpt["model_name"], norm=ckpt.get("norm", "batch")).net
    net.load_state_dict(torch.load(version_file(folder, version), weights_only=True))
    with torch.no_grad():
        probs, targets = predict(net, dm.val_dataloader())
    extra = {"norm": ckpt["norm"]} if ckpt.get("norm", "batch") != "batch" else {}
    extra["edge_federation"] = {"started_from": str(start), "version": version}
    if privacy:  # what the devices spent: a later run started from this model adds its own to it
        extra["edge_federation"]["privacy"] = {k: privacy[k] for k in ("epsilon", "delta", "max_epsilon_spent",
                                                                      "film_epsilon_bound")}
    return save_checkpoint(folder / FINAL_CHECKPOINT, model_name=ckpt["model_name"], state_dict=net.state_dict(),
                           preprocessing=ckpt["preprocessing"], thresholds=choose_thresholds(probs, targets),
                           recipe=recipe.model_dump(mode="json"), source=f"{ckpt.get('source', 'train')}+edge_federation",
                           extra=extra)


def _task_log(folder: Path) -> list[dict]:
    """What the devices did, one checked record per task (none when no device was ever given a task)."""
    return read_lines(folder / TASK_LOG) if (folder / TASK_LOG).is_file() else []


def _tasks(folder: Path) -> dict:
    lines = _task_log(folder)
    count = {k: sum(1 for t in lines if t["behaviour"] == k) for k in ("trained", "straggler", "dropped", "budget_spent")}
    return {"tasks": len(lines), **count, "devices_heard_from": len({t["device"] for t in lines})}


def edge_federate(recipe: Recipe, init_from: str | Path | None = None, progress: bool = True) -> dict:
    """Run the recipe's ``edge_federation`` and write its folder; returns the summary."""
    from nvflare.recipe.sim_env import SimEnv

    from fedxr.distill.report import paired_differences
    from fedxr.evaluation import evaluate_checkpoint
    from fedxr.models.checkpoint import load_checkpoint
    from fedxr.models.registry import complexity

    cfg = recipe.edge_federation
    start = Path(init_from or cfg.init_from or default_start(recipe))
    ckpt = load_checkpoint(start)
    program = device_program(cfg, ckpt, start)  # exported (or refused) first: before the data, before the folder
    manifest = Path(cfg.manifest) if cfg.manifest else site_manifest(recipe, cfg.site)
    if not manifest.is_file():
        raise FedxrError(f"edge_federation.manifest: {manifest} not found; give a site manifest written by "
                         "`fedxr data split ROOT --out DIR` (DIR/site-N.csv)")
    population_name = f"{manifest.parent.name}/{manifest.stem}" if cfg.manifest else cfg.site
    from fedxr.data.datamodule import SiteDataModule

    dm = SiteDataModule([manifest], ckpt["preprocessing"], batch_size=64, num_workers=0, augment=False,
                        cache_dir=recipe.data.cache_dir, progress=progress)
    # Every split is needed (devices train on train, versions are scored on val, start and end on test): a
    # missing one is named now, before anything of an earlier edge federation is removed.
    labels = dm.split_labels("train")
    dm.split_labels("val")
    dm.split_labels("test")
    from fedxr.data.cache import cache_path

    folder = recipe.layout.edge_federation
    # The starting student is copied into the new folder first: it may be an earlier run's final.ckpt (devices
    # keep improving it), which the new run replaces.
    start_bytes = start.read_bytes()
    if folder.exists():
        shutil.rmtree(folder)  # a new federation: versions of an earlier one must not be read as this one's
    folder.mkdir(parents=True)
    started_from, start = start, write_bytes_atomic(folder / START_CHECKPOINT, lambda fh: fh.write(start_bytes))

    assert dm.rows is not None  # split_labels read the manifest
    rows = dm.rows[dm.rows["split"] == "train"]
    cache = cache_path(rows["path"].tolist(), ckpt["preprocessing"].size, recipe.data.cache_dir)
    shards = deal_devices(labels, cfg.devices, cfg.images_per_device[0], cfg.images_per_device[1], cfg.seed,
                          cfg.skew)
    population = write_population(folder / "population", cache, labels, shards, ckpt["preprocessing"].size,
                                  {**cfg.model_dump(mode="json"), "population": population_name, "manifest": str(manifest)})
    params = sum(p.numel() for p in EdgeStudent(ckpt["model_name"], norm=ckpt.get("norm", "batch")).state_dict().values())
    print(f"edge federation: {cfg.devices} devices on {population_name}'s {population.films} training films "
          f"({cfg.images_per_device[0]}-{cfg.images_per_device[1]} each), {cfg.selection} at work at once, "
          f"a new version every {cfg.updates_per_version} updates, {cfg.versions} versions; started from {started_from}",
          flush=True)
    t0 = time.time()
    program_file = write_bytes_atomic(folder / DEVICE_PROGRAM, lambda fh: fh.write(program)) if program else None
    build_job(cfg, start, ckpt, folder, population.folder, program_file).execute(
        SimEnv(num_clients=1, workspace_root=str((folder / "workspace").resolve())))
    seconds = time.time() - t0
    if not (folder / VERSIONS_FILE).is_file():
        raise FedxrError(f"edge federation: the server made no model version; see {folder / 'workspace'} "
                         "(server and site-1 logs)")
    versions = score_versions(folder, ckpt, dm)
    last = versions[-1]["version"]
    if last < cfg.versions:
        print(f"edge federation: stopped at version {last} of {cfg.versions} (devices ran out within "
              f"edge_federation.timeout_s = {cfg.timeout_s:g} s)", flush=True)
    dp = privacy_settings(cfg)
    privacy = privacy_spent(folder, dp) if dp else None
    final = save_final(folder, last, ckpt, dm, recipe, started_from, privacy)
    start_eval = evaluate_checkpoint(start, manifest, split="test", out=folder / "eval_start",
                                     cache_dir=recipe.data.cache_dir, progress=progress)
    final_eval = evaluate_checkpoint(final, manifest, split="test", out=folder / "eval_final",
                                     cache_dir=recipe.data.cache_dir, progress=progress)
    classes = start_eval.counted
    preds = {"checkpoint": str(start), "predictions": str(start_eval.metrics_file.parent / "predictions.npz")}
    final_preds = {"checkpoint": str(final), "predictions": str(final_eval.metrics_file.parent / "predictions.npz")}
    gain = paired_differences(final_preds, preds, classes) if classes else None
    summary = {
        "site": population_name, "manifest": str(manifest), "started_from": str(started_from), "final": str(final),
        "seconds": round(seconds, 1),
        "devices": cfg.devices, "population": json.loads((population.folder / "population.json").read_text()),
        "update_bytes": params * 4, "update_bytes_note": "float32 tensors of every state-dict entry; NVFlare sends "
        "them as nested lists, several times larger on the wire",
        "versions": versions, "device_tasks": _tasks(folder),
        "updates": {k: sum(v[k] for v in versions) for k in ("devices", "trained", "dropped", "stale",
                                                              "ignored_too_old")},
        "test": {"start": start_eval.macro_auroc, "start_ci95": start_eval.macro_auroc_ci95,
                 "final": final_eval.macro_auroc, "final_ci95": final_eval.macro_auroc_ci95,
                 "gain": None if final_eval.macro_auroc is None or start_eval.macro_auroc is None
                 else final_eval.macro_auroc - start_eval.macro_auroc,
                 "gain_ci95": gain["ci95"] if gain else None, "classes": classes, "images": final_eval.images},
        "model_name": ckpt["model_name"], "input_size": ckpt["preprocessing"].size,
        "macs": complexity(ckpt["model_name"], ckpt["preprocessing"].size)[1],
        "settings": cfg.model_dump(mode="json"),
        "runtime": {"devices_train_with": cfg.runtime, "program": str(program_file) if program_file else None,
                    "program_bytes": len(program) if program else None},
        "privacy": privacy,
    }
    write_json_atomic(folder / SUMMARY_FILE, summary)
    plot_versions(summary, folder / PLOT_FILE)
    return summary


def plot_versions(summary: dict, path: Path) -> None:
    from fedxr.plots import saved_figure

    v = summary["versions"]
    with saved_figure(path, ncols=2, figsize=(10, 3.6)) as (fig, (left, right)):
        left.plot([r["version"] for r in v], [np.nan if r["val_macro_auroc"] is None else r["val_macro_auroc"]
                                              for r in v], marker="o")
        left.set_xlabel("model version")
        left.set_ylabel("validation macro AUROC")
        left.set_title(f"{summary['site']}: {summary['devices']} devices")
        later = v[1:]
        x = [r["version"] for r in later]
        right.bar(x, [r["trained"] - r["stale"] for r in later], label="fresh")
        right.bar(x, [r["stale"] for r in later], bottom=[r["trained"] - r["stale"] for r in later], label="stale")
        right.bar(x, [r["dropped"] for r in later], bottom=[r["trained"] for r in later], label="dropped")
        right.set_xlabel("model version")
        right.set_ylabel("device updates behind it")
        right.legend()


def format_summary(summary: dict) -> str:
    t, u = summary["test"], summary["updates"]
    lines = [f"edge federation at {summary['site']}: {len(summary['versions'])} versions in {summary['seconds']:.0f} s; "
             f"device updates {u['devices']} (trained {u['trained']}, dropped {u['dropped']}, stale {u['stale']}, "
             f"too old {u['ignored_too_old']}); one update {summary['update_bytes'] / 1e6:.2f} MB"]
    for r in summary["versions"]:
        val = "  n/a " if r["val_macro_auroc"] is None else f"{r['val_macro_auroc']:.4f}"
        lines.append(f"  v{r['version']:<3d} val AUROC {val}  updates {r['trained']:>3d} trained, "
                     f"{r['dropped']:>3d} dropped, {r['stale']:>3d} stale")
    gain = "" if t["gain_ci95"] is None else f" ({t['gain_ci95'][0]:+.3f}…{t['gain_ci95'][1]:+.3f})"
    if t["gain"] is None:
        lines.append(f"test macro AUROC ({t['images']} films): no finding has both classes in the site's test split")
    else:
        lines.append(f"test macro AUROC ({t['images']} films): start {t['start']:.4f} → final {t['final']:.4f}, "
                     f"{t['gain']:+.4f}{gain}")
    if summary.get("privacy"):
        p = summary["privacy"]
        lines.append(f"differential privacy per device: at most ε = {p['max_epsilon_spent']:.2f} spent by one device, "
                     f"ε ≤ {p['film_epsilon_bound']:.1f} for a film held by {p['most_devices_holding_one_film']} devices "
                     f"(budget {p['epsilon']:g}, δ = {p['delta']:g}; {p['most_updates_by_one_device']} of "
                     f"{p['max_updates']} updates; noise σ = {p['noise_multiplier']:.2f} x 2 x clip {p['clip']:g}); "
                     f"{p['refused_for_budget']} tasks refused for the budget")
    lines.append(f"final model: {summary['final']}  (`fedxr run RECIPE --from report` adds this to the run's report)")
    return "\n".join(lines)
