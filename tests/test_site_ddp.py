"""Several training processes inside one NVFlare site: Lightning DDP (gloo on CPU) under torchrun, in the
real simulator. 2 sites x 2 processes x 2 rounds at toy size."""

import json

import pytest
import torch

from fedxr.config import load_recipe
from fedxr.data.prepare import ensure_dataset, ensure_sites
from fedxr.federated.job import build_job
from fedxr.federated.ranks import launch_command, site_processes
from fedxr.federated.records import read_records
from fedxr.federated.deploy import processes_using
from fedxr.federated.run import federate

from helpers import QUICKSTART, tiny_recipe_overrides

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


def test_aggregate_is_the_step_weighted_mean_of_the_sites(ddp_run):
    recipe, _ = ddp_run
    records = recipe.layout.federate / "records"
    sent = [torch.load(records / f"site-{i}_round1.pt", weights_only=True) for i in (1, 2)]
    steps = [s["steps"] for s in sent]
    assert steps[0] != steps[1], steps  # the hospitals differ in size, so weighting matters
    server = next((recipe.layout.federate / "nvflare").rglob("app_server/FL_global_model.pt"))
    global_state = torch.load(server, weights_only=False)["model"]
    checked = 0
    for key, value in global_state.items():
        if not torch.is_floating_point(sent[0]["state_dict"][key]):
            continue
        expected = sum(n * s["state_dict"][key].double() for n, s in zip(steps, sent)) / sum(steps)
        torch.testing.assert_close(torch.as_tensor(value).double(), expected, rtol=0, atol=1e-6)
        checked += 1
    assert checked >= 10


def test_no_process_is_left_after_the_run(ddp_run):
    recipe, summary = ddp_run
    assert (recipe.layout.federate / "global_last.ckpt").is_file()
    assert processes_using(recipe.layout.federate) == []


def test_a_crashed_rank_fails_its_site_only_and_leaves_no_process(tmp_path, monkeypatch):
    """Rank 1 of site-2 crashes in round 1: torchrun stops the site's other rank, NVFlare reports the
    site's task failed, site-1 (min_clients 1) finishes the job, and nothing is left running."""
    recipe = ddp_recipe(tmp_path, extra=("federated.min_clients=1",))
    monkeypatch.setenv("FEDXR_TEST_FAIL_SITE", "site-2:1@1")
    federate(recipe, "sim")
    rounds = json.loads((recipe.layout.federate / "rounds.json").read_text())
    assert set(rounds[0]["sites"]) == {"site-1", "site-2"}
    assert set(rounds[1]["sites"]) == {"site-1"}
    log = "".join(p.read_text(errors="ignore") for p in (recipe.layout.federate / "nvflare").rglob("log.txt"))
    assert "site-2: injected failure at round 1 on rank 1" in log
    assert (recipe.layout.federate / "global_last.ckpt").is_file()
    assert processes_using(recipe.layout.federate) == []
