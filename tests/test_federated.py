"""Federated training through the real NVFlare simulator and POC mode, at toy size."""

import json
import re
from pathlib import Path

import pytest
import torch

from fedxr.cli import main
from fedxr.config import RecipeError, load_recipe
from fedxr.data.manifest import read_manifest
from fedxr.data.prepare import ensure_dataset, ensure_sites
from fedxr.federated.run import federate
from fedxr.models.checkpoint import load_checkpoint

from helpers import QUICKSTART, ROOT, assert_global_is_step_weighted_mean, tiny_recipe_overrides

pytestmark = pytest.mark.slow


def two_site_recipe(tmp, rounds=1, extra=()):
    # Two hospitals of different sizes: the sites do different numbers of steps per round.
    ov = tiny_recipe_overrides(tmp, patients=50, extra=(
        "data.phantom.hospitals=2", "data.sites=2", "data.scheme=column", "data.column=hospital",
        "federated.min_clients=2", f"federated.rounds={rounds}", "data.batch_size=8", *extra))
    recipe = load_recipe(QUICKSTART, ov)
    ensure_dataset(recipe, progress=False)
    ensure_sites(recipe)
    return recipe, ov


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    # The step cap binds at the larger site only (checked in test_sim_outputs).
    recipe, ov = two_site_recipe(tmp, rounds=3, extra=("federated.max_local_steps=4", "model.warmup_epochs=1"))
    summary = federate(recipe, "sim", extra_args="--save-updates")
    return recipe, ov, summary


def server_model(recipe, name="FL_global_model.pt") -> dict:
    path = next((recipe.layout.federate / "nvflare").rglob(f"app_server/{name}"))
    return torch.load(path, weights_only=False)["model"]


def test_sim_outputs(sim_run, tmp_path, capsys):
    recipe, ov, summary = sim_run
    out = recipe.layout.federate
    ckpt = load_checkpoint(out / "global_last.ckpt")
    assert ckpt["model_name"] == "tiny_cnn"
    assert ckpt["source"] == "federate"
    assert len(ckpt["thresholds"]) == 14
    rounds = json.loads((out / "rounds.json").read_text())
    assert rounds[0]["round"] == 0
    assert set(rounds[0]["sites"]) == {"site-1", "site-2"}
    assert all(v["train_s"] > 0 and v["steps"] > 0 for v in rounds[0]["sites"].values())
    assert 0 <= rounds[0]["aggregate_val_auroc"] <= 1
    assert rounds[-1]["round"] == "final"
    # model.precision: auto — every site trained in what this machine resolves it to, and the records say so
    from fedxr.precision import resolve_precision
    assert {v["precision"] for r in rounds[:3] for v in r["sites"].values()} == {resolve_precision("auto", "auto")[0]}
    # federated.max_local_steps=4: the larger site trains 4 steps in every round (they once doubled from round to
    # round), the smaller its whole epoch; the capped site's learning rate reaches the end of its schedule.
    epochs = {site: -(-int((read_manifest(recipe.layout.sites / f"{site}.csv")["split"] == "train").sum()) // 8)
              for site in ("site-1", "site-2")}
    assert max(epochs.values()) > 4 >= min(epochs.values())
    for r in rounds[:3]:
        assert {site: v["steps"] for site, v in r["sites"].items()} == {s: min(4, n) for s, n in epochs.items()}
    capped = max(epochs, key=epochs.get)
    lr_end = [json.loads(line)["lr_end"] for line in (out / "records" / f"{capped}.jsonl").read_text().splitlines()]
    # warm-up of one epoch = one round's 4 steps (not the capped site's whole 6-batch epoch), then a cosine over the
    # remaining 8 steps: the full rate after round 0, half after round 1, zero after round 2
    assert lr_end[:3] == pytest.approx([recipe.model.lr, recipe.model.lr * 0.5, 0.0], abs=1e-9)
    # Sites on this machine ask for their next task after 0.5 s (NVFlare's default 2 s cost every round that long).
    from fedxr.federated.job import LOCAL_TASK_REQUEST_INTERVAL_S
    server_cfg = json.loads(next((out / "nvflare").rglob("app_server/config/config_fed_server.json")).read_text())
    assert server_cfg["server"]["task_request_interval"] == LOCAL_TASK_REQUEST_INTERVAL_S < 2
    cross = json.loads((out / "cross_site.json").read_text())
    assert set(cross["sites"]) == {"site-1", "site-2"}
    assert {"global (last)", "site-1 (local)", "site-2 (local)"} <= set(cross["models"])
    for png in ("rounds.png", "cross_site.png"):
        assert (out / png).stat().st_size > 5000
    assert any((out / "nvflare").rglob("events.out.tfevents*")), "server-side TensorBoard events"
    # The federated checkpoint is read unchanged by evaluate.
    assert main(["evaluate", str(out / "global_last.ckpt"), "--data", str(recipe.layout.sites),
                 "--json", "--out", str(tmp_path / "ev"), "--cache-dir", str(recipe.data.cache_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] > 0


def test_global_model_is_step_weighted_mean(sim_run):
    """FedAvg check computed independently: global = Σ steps_i · θ_i / Σ steps_i after the last round."""
    recipe, _, summary = sim_run
    assert_global_is_step_weighted_mean(recipe, last_round=2)


def test_global_best_is_the_model_its_score_belongs_to(sim_run, tmp_path):
    """Each round the sites score the global model they receive; that score must select that model, not
    the one aggregated after it. (1) NVFlare's in-round best, re-scored by cross-site evaluation on every
    site's validation split, has exactly the per-site scores of the round its selector chose (step-weighted
    mean). (2) fedxr's global_best.ckpt — that model or the last one, whichever validates better —
    re-scored here reproduces the cross-site scores of the model it says it is."""
    from fedxr.data.manifest import site_manifest_paths
    from fedxr.evaluation import evaluate_checkpoint
    from fedxr.records import read_records

    recipe, _, summary = sim_run
    by_round: dict[int, dict[str, dict]] = {}
    for r in read_records(recipe.layout.federate / "records"):
        by_round.setdefault(r["round"], {})[r["site"]] = r
    # NVFlare's selector never considers round 0 (the scores of the initial, untrained model: IntimeModelSelector
    # skips them), so its best is the best of rounds 1 and later.
    weighted = {rnd: sum(s["val_auroc"] * s["steps"] for s in sites.values()) / sum(s["steps"] for s in sites.values())
                for rnd, sites in by_round.items() if rnd >= 1}
    chosen_round = max(weighted, key=weighted.get)
    cross = json.loads((recipe.layout.federate / "cross_site.json").read_text())["by_data_site"]
    nvflare_best = {site: scores["global (best)"] for site, scores in cross.items()}
    assert nvflare_best == pytest.approx({s: r["val_auroc"] for s, r in by_round[chosen_round].items()}, abs=1e-4), weighted
    best = summary.checkpoints["global_best"]
    selection = load_checkpoint(best)["metrics"]["selection"]
    assert selection["chosen"] in ("global (best)", "global (last)")
    assert selection["val_auroc"][selection["chosen"]] == max(selection["val_auroc"].values())
    rescored = {site: evaluate_checkpoint(best, path, split="val", out=tmp_path / site, cache_dir=recipe.data.cache_dir,
                                          progress=False).macro_auroc_all
                for site, path in site_manifest_paths(recipe.layout.sites).items()}
    assert rescored == pytest.approx({site: scores[selection["chosen"]] for site, scores in cross.items()}, abs=1e-4)


def test_export_job(tmp_path, capsys):
    recipe, ov = two_site_recipe(tmp_path)
    assert main(["federate", str(QUICKSTART), *ov, "--export-job", str(tmp_path / "job")]) == 0
    assert "nvflare job submit" in capsys.readouterr().out
    meta = json.loads(next((tmp_path / "job").rglob("meta.json")).read_text())
    assert meta["min_clients"] == 2
    client_cfg = next((tmp_path / "job").rglob("config_fed_client.json")).read_text()
    assert "--recipe-b64" in client_cfg
    assert "--sites-dir" not in client_cfg  # data paths stay site facts
    server_cfg = json.loads(next((tmp_path / "job").rglob("config_fed_server.json")).read_text())
    assert "task_request_interval" not in server_cfg.get("server", {})  # across the internet: NVFlare's default
    # The server keeps its resume point under its own workspace and chooses the start round when the job starts;
    # each hospital keeps its state under its own (fedxr.federated.resume, production).
    controller = next(c for c in server_cfg["components"] + server_cfg["workflows"]
                      if c.get("path", "").endswith("SiteDeadlineFedAvg"))
    job = f"fedxr-{recipe.output.name}-federate"
    assert controller["args"]["resume_at_start"] is True and not controller["args"].get("resume_finished")
    assert controller["args"]["resume_dir"] == f"fedxr_resume/{job}" and controller["args"]["job_digest"]
    assert (f'"--keep-state","fedxr_state/{job}","--job-digest","{controller["args"]["job_digest"]}"'
            in re.sub(r"\s", "", client_cfg))


def test_bad_recipe_values_fail_before_start(tmp_path):
    base = tiny_recipe_overrides(tmp_path)
    with pytest.raises(RecipeError) as err:
        load_recipe(QUICKSTART, base + ["federated.rounds=0", "federated.min_clients=5", "federated.algorithm=fedsgd"])
    text = str(err.value)
    assert "federated.rounds" in text
    assert "federated.algorithm" in text
    with pytest.raises(RecipeError, match="min_clients: 5 is more than data.sites"):
        load_recipe(QUICKSTART, base + ["federated.min_clients=5"])


def test_site_without_data_names_the_site(monkeypatch, tmp_path):
    from fedxr.errors import DataError
    from fedxr.federated.site import resolve_site_manifest

    monkeypatch.delenv("FEDXR_SITE_MANIFEST", raising=False)
    monkeypatch.delenv("FEDXR_SITES_DIR", raising=False)
    with pytest.raises(DataError, match="site 'site-7' has no data.*FEDXR_SITE_MANIFEST=/path/to/site-7.csv"):
        resolve_site_manifest("site-7", tmp_path)
    (tmp_path / "site-7.csv").write_text("x")
    monkeypatch.setenv("FEDXR_SITES_DIR", str(tmp_path))
    assert resolve_site_manifest("site-7") == tmp_path / "site-7.csv"


def test_site_failing_from_round_two_does_not_stop_the_federation(tmp_path, monkeypatch):
    """3 sites, min_clients 2: site-3 crashes from its second round on (round index 1). NVFlare's
    FedAvg controller runs in resilient mode, so the failed task is left out of that round's aggregate
    and the remaining sites finish the job; the dead site is asked again next round and fails fast."""
    ov = tiny_recipe_overrides(tmp_path, patients=60, extra=(
        "data.sites=3", "data.scheme=iid", "federated.min_clients=2", "federated.rounds=2",
        "federated.cross_site_eval=false"))
    recipe = load_recipe(QUICKSTART, ov)
    ensure_dataset(recipe, progress=False)
    ensure_sites(recipe)
    monkeypatch.setenv("FEDXR_TEST_FAIL_SITE", "site-3:1")
    summary = federate(recipe, "sim")
    rounds = json.loads((recipe.layout.federate / "rounds.json").read_text())
    assert set(rounds[0]["sites"]) == {"site-1", "site-2", "site-3"}
    assert set(rounds[1]["sites"]) == {"site-1", "site-2"}  # site-3 failed; the round still completed
    assert (recipe.layout.federate / "global_last.ckpt").is_file()
    log = "".join(p.read_text(errors="ignore") for p in (recipe.layout.federate / "nvflare").rglob("log.txt"))
    assert "site-3: injected failure at round 1" in log
    assert summary.wall_s < 300  # a dead site does not hang the run


def test_readme_project_provisions_with_mutual_tls(tmp_path):
    """deploy/project.yml (the README's 'Running across hospitals') provisions real startup kits."""
    import subprocess
    import sys
    from pathlib import Path

    nvflare = Path(sys.executable).parent / "nvflare"  # the CLI installed beside this interpreter
    proc = subprocess.run([str(nvflare), "provision", "-p", str(ROOT / "deploy" / "project.yml"), "-w", str(tmp_path / "ws")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kits = next((tmp_path / "ws").rglob("prod_00"))
    assert {p.name for p in kits.iterdir()} >= {"fl-server.example.org", "hospital-a", "hospital-b", "hospital-c"}
    server = json.loads((kits / "fl-server.example.org" / "startup" / "fed_server.json").read_text())
    assert server["servers"][0]["connection_security"] == "mtls"


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold", "fedopt"])
def test_every_algorithm_builds_a_job(tmp_path, algorithm):
    from fedxr.federated.job import build_job

    recipe = load_recipe(QUICKSTART, tiny_recipe_overrides(tmp_path) + [f"federated.algorithm={algorithm}"])
    job = build_job(recipe, tmp_path / "f", "prod")
    job.export(str(tmp_path / "job"))
    server = next((tmp_path / "job").rglob("config_fed_server.json")).read_text()
    expected = {"fedavg": "FedAvg", "fedprox": "FedAvg", "scaffold": "Scaffold", "fedopt": "FedOpt"}[algorithm]
    assert expected in server
    if algorithm == "fedprox":
        assert "fedprox_mu" in server


def test_fedbn_keeps_batchnorm_local(tmp_path):
    import re

    from fedxr.federated.job import batchnorm_exclude_pattern, build_job
    from fedxr.models.classifier import XRayClassifier

    recipe = load_recipe(QUICKSTART, tiny_recipe_overrides(tmp_path) + ["federated.fedbn=true", "federated.cross_site_eval=false"])
    pattern = re.compile(batchnorm_exclude_pattern(recipe))
    module = XRayClassifier("tiny_cnn")
    bn_keys = {f"{name}.{k}" for name, mod in module.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)
               for k in list(dict(mod.named_parameters(recurse=False))) + list(dict(mod.named_buffers(recurse=False)))}
    excluded = {k for k in module.state_dict() if pattern.match(k)}
    assert excluded == bn_keys
    assert len(bn_keys) == 5 * 5  # 5 BatchNorms × weight, bias, mean, var, count
    assert "model.features.0.weight" not in excluded
    assert "model.head.weight" not in excluded
    job = build_job(recipe, tmp_path / "f", "prod")
    job.export(str(tmp_path / "job"))
    assert "exclude_vars" in next((tmp_path / "job").rglob("config_fed_server.json")).read_text()
    with pytest.raises(Exception, match="fedbn works with fedavg or fedprox"):
        build_job(load_recipe(QUICKSTART, tiny_recipe_overrides(tmp_path) + ["federated.fedbn=true", "federated.cross_site_eval=false",
                                                                              "federated.algorithm=scaffold"]), tmp_path / "g", "prod")


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold", "fedopt"])
def test_other_algorithms_run_in_the_simulator(tmp_path, algorithm):
    recipe, _ = two_site_recipe(tmp_path, extra=(f"federated.algorithm={algorithm}", "federated.cross_site_eval=false"))
    summary = federate(recipe, "sim")
    ckpt = load_checkpoint(summary.checkpoints["global_last"])
    assert ckpt["model_name"] == "tiny_cnn"
    rounds = json.loads(Path(summary.rounds).read_text())
    assert set(rounds[0]["sites"]) == {"site-1", "site-2"}


def test_a_round_no_site_completed_fails_the_run(tmp_path):
    from fedxr.errors import FedxrError
    from fedxr.federated.run import _check_sites_trained

    recipe = load_recipe(QUICKSTART, tiny_recipe_overrides(tmp_path) + ["federated.rounds=2"])
    records = tmp_path / "records"
    records.mkdir()
    (records / "site-1.jsonl").write_text(json.dumps({"site": "site-1", "round": 0}) + "\n")
    with pytest.raises(FedxrError, match=r"no site completed round\(s\) 1 .*site-1/log.txt"):
        _check_sites_trained(records, recipe, tmp_path / "ws")
    (records / "site-2.jsonl").write_text(json.dumps({"site": "site-2", "round": 1}) + "\n")
    _check_sites_trained(records, recipe, tmp_path / "ws")


def test_nvflare_private_hooks_fedxr_relies_on_are_still_there(tmp_path):
    """fedxr overrides two private methods of NVFlare's FedAvg/FedProx recipes (resilient rounds, every site
    asked) and calls two private helpers in its aggregator. If NVFlare renames or reshapes them the
    override would silently stop working: this test fails first."""
    import inspect

    from nvflare.app_common.workflows import base_fedavg
    from nvflare.app_opt.pt.recipes import FedAvgRecipe, FedProxRecipe

    for cls in (FedAvgRecipe, FedProxRecipe):
        assert callable(getattr(cls, "_get_controller_kwargs", None)), cls
        assert list(inspect.signature(cls._create_controller).parameters) == [
            "self", "persistor_id", "model_params", "model_aggregator"], cls
    for helper in (base_fedavg._get_client_name, base_fedavg._get_num_steps_weight):
        assert len(inspect.signature(helper).parameters) == 1, helper  # called with one FLModel
    # And their effect in a built job: 4 sites with a quorum of 2 — every site is asked each round, and a
    # failed site's result is left out instead of stopping the job.
    from fedxr.federated.job import build_job

    recipe = load_recipe(QUICKSTART, tiny_recipe_overrides(tmp_path) + ["data.sites=4", "federated.min_clients=2"])
    build_job(recipe, tmp_path / "f", "prod").export(str(tmp_path / "job"))
    args = json.loads(next((tmp_path / "job").rglob("config_fed_server.json")).read_text())["workflows"][0]["args"]
    assert args["num_clients"] == 4
    assert args["ignore_result_error"] is True
    # Each round's task has a deadline (federated.timeout_s): a vanished site does not stall the federation.
    workflow = json.loads(next((tmp_path / "job").rglob("config_fed_server.json")).read_text())["workflows"][0]
    assert workflow["path"] == "fedxr.federated.controller.SiteDeadlineFedAvg"
    assert args["site_timeout_s"] == recipe.federated.timeout_s
    assert args["aggregator"]["path"] == "fedxr.federated.aggregator.SiteOrderedFedAvg"
    # fedxr is an installed app package (FedJob.set_app_packages via the recipe's private _job): none of its
    # modules is copied into the job, where a partial copy would shadow the installed package.
    assert not [p for p in (tmp_path / "job").rglob("custom/fedxr/*")]
    assert any((tmp_path / "job").rglob("custom/fedxr_client.py"))  # the client script itself travels
    # POC names every site mandatory (the recipe's private _job.job), so a site that connects late is not left out.
    from fedxr.federated.run import require_every_site

    job = build_job(recipe, tmp_path / "g", "poc")
    require_every_site(job, ["site-1", "site-2", "site-3", "site-4"])
    job.export(str(tmp_path / "job2"))
    meta = json.loads(next((tmp_path / "job2").rglob("meta.json")).read_text())
    assert meta["mandatory_clients"] == ["site-1", "site-2", "site-3", "site-4"] and meta["min_clients"] == 2


def test_client_builds_the_model_the_job_describes(tmp_path):
    """The client script is generic: it trains whatever {class_path, args} the job carries."""
    from fedxr.federated.codec import decode_json
    from fedxr.federated.job import build_job, model_config

    recipe = load_recipe(QUICKSTART, tiny_recipe_overrides(tmp_path))
    build_job(recipe, tmp_path / "f", "prod").export(str(tmp_path / "job"))
    client = json.loads(next((tmp_path / "job").rglob("config_fed_client.json")).read_text())
    command = client["executors"][0]["executor"]["args"]["command"]
    assert "distill" not in " ".join(command[:3])
    assert decode_json(command[command.index("--model-b64") + 1]) == model_config(recipe)
    assert model_config(recipe)["args"]["preprocessing"] == {"size": 32, "mean": 0.5, "std": 0.25}


def test_prod_needs_an_admin_startup_kit(tmp_path, capsys):
    ov = tiny_recipe_overrides(tmp_path)
    assert main(["federate", str(QUICKSTART), *ov, "--env", "prod", "--startup-kit", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "not an NVFlare admin startup kit" in err
    assert "nvflare provision" in err
    # A provisioned project folder instead of the admin's own kit: the error names the kit inside it.
    kit = tmp_path / "prod_00" / "admin@hospital.org"
    (kit / "startup").mkdir(parents=True)
    (kit / "startup" / "fed_admin.json").write_text("{}")
    assert main(["federate", str(QUICKSTART), *ov, "--env", "prod", "--startup-kit", str(tmp_path / "prod_00")]) == 1
    err = capsys.readouterr().err
    assert str(kit) in err
    assert "Traceback" not in err
