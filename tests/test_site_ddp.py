"""Several training processes inside one NVFlare site: Lightning DDP (gloo on CPU) under torchrun, in the
real simulator. 2 sites x 2 processes x 2 rounds at toy size."""

import json
import os
import threading
import time

import pytest

from fedxr.config import load_recipe
from fedxr.data.prepare import ensure_dataset, ensure_sites
from fedxr.federated.job import build_job
from fedxr.devices import site_processes
from fedxr.federated.ranks import launch_command
from fedxr.records import read_records
from fedxr.federated.deploy import processes_using, stop_processes
from fedxr.federated.run import federate

from helpers import QUICKSTART, assert_global_is_step_weighted_mean, tiny_recipe_overrides

pytestmark = pytest.mark.slow

DDP = ("model.accelerator=cpu", "model.devices=2", "model.strategy=ddp")


def ddp_recipe(tmp, extra=()):
    ov = tiny_recipe_overrides(tmp, patients=50, extra=(
        "data.phantom.hospitals=2", "data.sites=2", "data.scheme=column", "data.column=hospital",
        "federated.rounds=2", "data.batch_size=8", "federated.cross_site_eval=false", *DDP, *extra))
    recipe = load_recipe(QUICKSTART, ov)
    ensure_dataset(recipe, progress=False)
    ensure_sites(recipe)
    return recipe


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    recipe = ddp_recipe(tmp_path_factory.mktemp("ddp"), extra=("federated.min_clients=2",))
    summary = federate(recipe, "sim", extra_args="--save-updates")
    return recipe, summary


def test_each_site_runs_under_torchrun_with_its_own_port():
    assert site_processes(2) == 2
    assert site_processes("auto") == 1  # never Lightning's own launcher behind NVFlare's back
    assert launch_command("python", 1) == "python -u"
    command = launch_command("python", 2)
    assert "-m torch.distributed.run" in command
    assert "--nproc_per_node=2" in command
    # --standalone: torchrun's rendezvous binds a free port, so sites on one machine never share one.
    assert "--standalone" in command


def test_job_launches_the_sites_under_torchrun(tmp_path):
    recipe = ddp_recipe(tmp_path, extra=("federated.min_clients=2",))
    job = build_job(recipe, tmp_path / "job", "sim")
    job.export(str(tmp_path / "exported"))
    config = json.loads(next((tmp_path / "exported").rglob("config_fed_client.json")).read_text())
    command = " ".join(config["executors"][0]["executor"]["args"]["command"])
    assert "-m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=2 custom/fedxr_client.py" in command
    # This machine's cores are shared by 2 sites x 2 processes.
    import os

    assert f"--threads {max(1, (os.cpu_count() or 1) // 4)}" in command


def test_both_ranks_of_each_site_trained(ddp_run):
    recipe, _ = ddp_run
    rows = read_records(recipe.layout.federate / "records", every_rank=True)
    seen = {(r["site"], r["round"], r["rank"]) for r in rows}
    assert seen == {(s, n, k) for s in ("site-1", "site-2") for n in (0, 1) for k in (0, 1)}
    for r in rows:
        assert r["world_size"] == 2
        assert r["samples"] > 0, r
    for site in ("site-1", "site-2"):
        for rnd in (0, 1):
            shards = [r for r in rows if r["site"] == site and r["round"] == rnd]
            # DistributedSampler splits the site's training images between the ranks (padding the last
            # shard by at most one image per rank), so together they cover the whole split once.
            total, images = sum(r["samples"] for r in shards), shards[0]["train_images"]
            assert images <= total <= images + 1, (site, rnd, total, images)
    # The round table still has one entry per site (rank 0's), not one per process.
    assert all(r["rank"] == 0 for r in read_records(recipe.layout.federate / "records"))


def test_every_rank_holds_the_global_model_and_the_same_trained_model(ddp_run):
    """Rank 0 receives the global model from NVFlare; NVFlare's Lightning callback broadcasts it to the other
    ranks, so every rank validates the same model, and DDP keeps them equal through training."""
    recipe, _ = ddp_run
    rows = read_records(recipe.layout.federate / "records", every_rank=True)
    for site in ("site-1", "site-2"):
        for rnd in (0, 1):
            shards = [r for r in rows if r["site"] == site and r["round"] == rnd]
            assert len({r["received_digest"] for r in shards}) == 1, shards
            assert len({r["trained_digest"] for r in shards}) == 1, shards
            assert shards[0]["received_digest"] != shards[0]["trained_digest"]  # training changed the weights
    # Round 1 starts from the aggregate, not from what a site trained in round 0.
    site1 = {r["round"]: r for r in rows if r["site"] == "site-1" and r["rank"] == 0}
    assert site1[1]["received_digest"] != site1[0]["trained_digest"]


def test_aggregate_is_the_step_weighted_mean_of_the_sites(ddp_run):
    recipe, _ = ddp_run
    # The hospitals differ in size, so their steps differ and the weighting matters.
    assert_global_is_step_weighted_mean(recipe, last_round=1)


def nothing_left_running(folder, within_s: float = 15.0) -> bool:
    """No process started for this run is left (polled: processes being stopped take a moment to go)."""
    deadline = time.monotonic() + within_s
    while processes_using(folder):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_no_process_is_left_after_the_run(ddp_run):
    recipe, summary = ddp_run
    assert (recipe.layout.federate / "global_last.ckpt").is_file()
    assert nothing_left_running(recipe.layout.federate), processes_using(recipe.layout.federate)


def processes_of_site(site: str) -> dict:
    """A simulated site's torchrun agent and its workers (their working folder is the site's NVFlare folder)."""
    import psutil

    found = {"agent": [], "workers": []}
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            command, cwd = " ".join(proc.info["cmdline"] or []), (proc.info["cwd"] or "") + os.sep
        except psutil.Error:
            continue
        if f"{os.sep}{site}{os.sep}" in cwd and "fedxr_client.py" in command:
            found["agent" if "torch.distributed.run" in command else "workers"].append(proc.pid)
    return found


def time_workers_outlive_agent(site: str, stop: threading.Event, result: dict) -> None:
    """Seconds from the moment the site's agent is gone to the moment its workers are."""
    agent_gone = None
    while not stop.is_set():
        procs = processes_of_site(site)
        if procs["agent"] and len(procs["workers"]) >= 2:
            result["seen"] = True
        elif result.get("seen") and not procs["agent"] and agent_gone is None:
            agent_gone = time.monotonic()
        if agent_gone is not None and not procs["workers"]:
            result["outlived_s"] = time.monotonic() - agent_gone
            return
        time.sleep(0.05)


@pytest.mark.parametrize("fault", ["1", "agent"])
def test_a_crashed_site_process_fails_its_site_only_and_leaves_no_process(tmp_path, monkeypatch, fault):
    """In round 1, rank 1 of site-2 crashes (torchrun then stops the site's other rank), or site-2's torchrun
    agent is SIGKILLed (its workers die with it: they run in sessions of their own, so NVFlare's stop of the
    agent's process group would miss them). NVFlare reports the site's task failed, site-1 (min_clients 1)
    finishes the job, and nothing is left running."""
    recipe = ddp_recipe(tmp_path, extra=("federated.min_clients=1",))
    monkeypatch.setenv("FEDXR_TEST_FAIL_SITE", f"site-2:1@{fault}")
    stop, timing = threading.Event(), {}
    watcher = threading.Thread(target=time_workers_outlive_agent, args=("site-2", stop, timing), daemon=True)
    watcher.start()
    try:
        federate(recipe, "sim")
    finally:
        stop.set()
        watcher.join(timeout=5)
        left = nothing_left_running(recipe.layout.federate)
        stop_processes(recipe.layout.federate, grace_s=2)  # never leave a failed test's processes behind
    assert left, "site processes outlived the run"
    if fault == "agent":
        # The workers die with their agent (the kernel's parent-death signal), not later, when NVFlare ends
        # the job (without it they outlived the agent by ~5 s here, and by the rest of the job in general).
        assert timing.get("outlived_s", 99) < 2.0, timing
    rounds = json.loads((recipe.layout.federate / "rounds.json").read_text())
    assert set(rounds[0]["sites"]) == {"site-1", "site-2"}
    assert set(rounds[1]["sites"]) == {"site-1"}
    log = "".join(p.read_text(errors="ignore") for p in (recipe.layout.federate / "nvflare").rglob("log.txt"))
    if fault == "1":
        assert "site-2: injected failure at round 1 on rank 1" in log
    assert (recipe.layout.federate / "global_last.ckpt").is_file()


def test_a_round_below_quorum_stops_the_federation_with_the_reason(tmp_path, monkeypatch):
    """min_clients 2 and site-2 failing from round 1: round 1 has one answer of the two required, so the
    server stops the federation (instead of averaging one site) and fedxr says which round and why."""
    from fedxr.errors import FedxrError

    recipe = ddp_recipe(tmp_path, extra=("federated.min_clients=2", "model.devices=1", "model.strategy=auto"))
    monkeypatch.setenv("FEDXR_TEST_FAIL_SITE", "site-2:1")
    with pytest.raises(FedxrError, match=r"round 1: 1 of 2 sites answered .*min_clients is 2"):
        federate(recipe, "sim")
    assert nothing_left_running(recipe.layout.federate), processes_using(recipe.layout.federate)
