"""Devices that learn together: the student fine-tuned across simulated devices with NVFlare's edge stack."""

import json
import os
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.edge.mud import ModelUpdate

from fedxr.cli import main
from fedxr.config import RecipeError, load_recipe
from fedxr.crossdevice.device import behaviour
from fedxr.crossdevice.population import deal_devices
from fedxr.crossdevice.run import edge_federate
from fedxr.crossdevice.server import VERSIONS_FILE, RecordingModelManager, version_file
from fedxr.errors import FedxrError
from fedxr.models.checkpoint import load_checkpoint, save_checkpoint
from fedxr.models.registry import build_model
from fedxr.report import write_report
from fedxr.results import RunResults

from helpers import QUICKSTART, tiny_recipe_overrides


def _update(version: int, diff: list[float], count: int, devices: tuple[str, ...]) -> ModelUpdate:
    dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data={"dict": {"w": list(diff)}, "count": count})
    return ModelUpdate(version, dxo.to_shareable(), {d: 0.0 for d in devices})


def test_fedbuff_versions_are_the_buffered_average_and_a_late_update_is_not_lost(tmp_path):
    m = RecordingModelManager(num_updates_for_model=3, global_lr=0.5, out_dir=str(tmp_path))
    ctx = FLContext()
    m.initialize_model(DXO(data_kind=DataKind.WEIGHTS, data={"w": [0.0, 0.0]}), ctx)
    m.generate_new_model(ctx)  # version 1: the starting model
    # Two devices trained on version 1, a third dropped out (an empty update that counts nothing).
    m.process_updates({1: _update(1, [1.0, 2.0], 1, ("a",))}, ctx)
    m.process_updates({1: _update(1, [3.0, 4.0], 1, ("b",))}, ctx)
    assert m.current_model_version == 1
    m.process_updates({1: _update(1, [0.0, 0.0], 0, ("c",))}, ctx)
    assert m.current_model_version == 2
    # new = old + global_lr * (sum of diffs / trained updates) = 0.5 * [4, 6] / 2
    np.testing.assert_array_equal(m.current_model.data["w"], [1.0, 1.5])
    # A straggler still on version 1 reports after version 2 exists; no selected device holds version 1 any more.
    m.process_updates({1: _update(1, [6.0, 6.0], 1, ("d",))}, ctx)
    m.prune_model_versions({2}, ctx)  # NVFlare's assessor prunes after every batch of updates
    assert 1 in m.updates, "the late update was thrown away before it was used"
    m.process_updates({2: _update(2, [2.0, 0.0], 1, ("e",)), 1: None}, ctx)
    m.process_updates({2: _update(2, [4.0, 3.0], 1, ("f",))}, ctx)
    assert m.current_model_version == 3
    # [1, 1.5] + 0.5 * ([6, 6] + [2, 0] + [4, 3]) / 3
    np.testing.assert_allclose(m.current_model.data["w"], [1.0 + 0.5 * 4.0, 1.5 + 0.5 * 3.0])
    m.prune_model_versions({3}, ctx)
    assert set(m.updates) == {3}, "a version whose updates were used is kept"
    records = [json.loads(x) for x in (tmp_path / VERSIONS_FILE).read_text().splitlines()]
    assert [r["version"] for r in records] == [1, 2, 3]
    assert {k: records[1][k] for k in ("devices", "trained", "dropped", "stale")} == \
        {"devices": 3, "trained": 2, "dropped": 1, "stale": 0}
    assert {k: records[2][k] for k in ("devices", "trained", "dropped", "stale", "max_staleness")} == \
        {"devices": 3, "trained": 3, "dropped": 0, "stale": 1, "max_staleness": 1}
    saved = torch.load(version_file(tmp_path, 3), weights_only=True)
    torch.testing.assert_close(saved["w"], torch.tensor([3.0, 3.0]))


def test_an_update_older_than_the_history_is_turned_away_and_counted(tmp_path):
    m = RecordingModelManager(num_updates_for_model=1, max_model_history=2, out_dir=str(tmp_path))
    ctx = FLContext()
    m.initialize_model(DXO(data_kind=DataKind.WEIGHTS, data={"w": [0.0]}), ctx)
    m.generate_new_model(ctx)
    for v in (1, 2):
        m.process_updates({v: _update(v, [1.0], 1, (f"d{v}",))}, ctx)
    assert m.current_model_version == 3
    m.process_updates({1: _update(1, [100.0], 1, ("old",)), 3: _update(3, [1.0], 1, ("new",))}, ctx)
    assert m.current_model_version == 4 and m.current_model.data["w"] == [3.0]
    last = json.loads((tmp_path / VERSIONS_FILE).read_text().splitlines()[-1])
    # The turned-away update counts as nothing else (it was not folded in).
    assert (last["ignored_too_old"], last["devices"], last["trained"], last["stale"]) == (1, 1, 1, 0)


def test_only_dropped_updates_make_no_version(tmp_path):
    m = RecordingModelManager(num_updates_for_model=2, out_dir=str(tmp_path))
    ctx = FLContext()
    m.initialize_model(DXO(data_kind=DataKind.WEIGHTS, data={"w": [1.0]}), ctx)
    m.generate_new_model(ctx)
    m.process_updates({1: _update(1, [0.0], 0, ("a", "b"))}, ctx)
    assert m.current_model_version == 1 and m.current_model.data["w"] == [1.0], "an average of nothing was made"
    m.process_updates({1: _update(1, [2.0], 1, ("c",))}, ctx)
    m.process_updates({1: _update(1, [0.0], 0, ("d",))}, ctx)
    assert m.current_model_version == 2 and m.current_model.data["w"] == [3.0]
    last = json.loads((tmp_path / VERSIONS_FILE).read_text().splitlines()[-1])
    assert (last["version"], last["devices"], last["trained"], last["dropped"]) == (2, 4, 1, 3)


def test_devices_hold_five_to_fifty_films_and_skew_changes_their_case_mix():
    labels = np.zeros((400, 14), np.float32)
    labels[:200, 3] = 1  # half the films abnormal
    labels[0, 5] = np.nan
    shards = deal_devices(labels, 300, 5, 50, seed=0)
    sizes = [len(s) for s in shards]
    assert min(sizes) >= 5 and max(sizes) <= 50 and len(set(sizes)) > 20
    assert all(len(np.unique(s)) == len(s) for s in shards)
    assert all(np.array_equal(a, b) for a, b in zip(shards, deal_devices(labels, 300, 5, 50, seed=0)))
    share = lambda ss: np.array([np.mean(s < 200) for s in ss])  # noqa: E731
    alike, skewed = share(shards), share(deal_devices(labels, 300, 5, 50, seed=0, skew=0.2))
    assert skewed.std() > 2 * alike.std()
    tiny = deal_devices(labels[:3], 4, 5, 50, seed=1)
    assert all(len(s) == 3 for s in tiny), "a device cannot hold more films than the site has"
    with pytest.raises(FedxrError, match="no training films"):
        deal_devices(labels[:0], 4, 5, 50, seed=0)


def test_a_devices_behaviour_is_drawn_from_seed_device_and_version():
    draws = [behaviour(0, d, v, 0.3, 0.2) for d in range(200) for v in range(1, 6)]
    assert draws == [behaviour(0, d, v, 0.3, 0.2) for d in range(200) for v in range(1, 6)]
    share = {k: draws.count(k) / len(draws) for k in ("dropped", "straggler", "trained")}
    assert 0.25 < share["dropped"] < 0.35 and 0.1 < share["straggler"] < 0.2
    assert {behaviour(0, d, 1, 0.0, 0.0) for d in range(50)} == {"trained"}


def test_edge_federation_settings_are_checked():
    with pytest.raises(RecipeError, match="updates_per_version"):
        load_recipe(QUICKSTART, ["edge_federation.selection=4", "edge_federation.updates_per_version=5"])
    with pytest.raises(RecipeError, match="dp.max_updates: 10 devices x 1 updates each cannot fill 4 versions"):
        load_recipe(QUICKSTART, ["edge_federation.devices=10", "edge_federation.versions=4",
                                 "edge_federation.dp.max_updates=1"])
    assert load_recipe(QUICKSTART, ["edge_federation.dp=true"]).edge_federation.dp.epsilon == 8.0
    with pytest.raises(RecipeError, match="images_per_device"):
        load_recipe(QUICKSTART, ["edge_federation.images_per_device=[9,3]"])
    # As a stage of `fedxr run` the devices start from the run's first student: a recipe without one must say where.
    with pytest.raises(RecipeError, match="edge_federation.enabled: .* distill.students is empty"):
        load_recipe(QUICKSTART, ["edge_federation.enabled=true", "distill.students=[]"])
    assert load_recipe(QUICKSTART, ["edge_federation.enabled=true", "distill.students=[]",
                                    "edge_federation.init_from=x.ckpt"]).edge_federation.enabled


@pytest.mark.slow
def test_a_toy_edge_federation_makes_its_versions_counts_every_update_and_leaves_nothing_running(tmp_path, capsys):
    ov = tiny_recipe_overrides(tmp_path, patients=60, extra=("data.phantom.hospitals=2", "data.sites=2",
                                                              "federated.min_clients=2"))
    assert main(["data", "prepare", str(QUICKSTART), *ov]) == 0
    # Any fedxr checkpoint can start the devices off; an untrained one keeps the test short.
    recipe = load_recipe(QUICKSTART, ov)
    start = save_checkpoint(tmp_path / "start.ckpt", model_name="tiny_cnn", state_dict=build_model("tiny_cnn").state_dict(),
                            preprocessing=recipe.preprocessing, thresholds=[0.5] * 14,
                            recipe=recipe.model_dump(mode="json"))
    edge = ["edge_federation.site=site-2", "edge_federation.devices=16", "edge_federation.selection=4",
            "edge_federation.updates_per_version=3", "edge_federation.versions=4", "edge_federation.dropout=0.3",
            "edge_federation.stragglers=0.3", "edge_federation.straggler_delay_s=1", "edge_federation.timeout_s=120",
            # Per-device DP: room for two updates per device (16 x 2 can fill 4 versions: a budget that could not is
            # refused up front, test_edge_federation_settings_are_checked).
            "edge_federation.dp.max_updates=2", "edge_federation.dp.epsilon=8"]
    assert main(["edge-federate", str(QUICKSTART), *ov, *edge, "edge_federation.site=site-9",
                 "--init-from", str(start)]) != 0
    assert "no site 'site-9'" in capsys.readouterr().err and not (tmp_path / "runs" / "t" / "edge_federation").exists()
    assert main(["edge-federate", str(QUICKSTART), *ov, *edge, "--init-from", str(start)]) == 0
    out = capsys.readouterr().out
    assert "edge federation at site-2: 4 versions" in out
    folder = tmp_path / "runs" / "t" / "edge_federation"
    summary = json.loads((folder / "summary.json").read_text())
    versions = summary["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3, 4]
    # Version 1 is the student as it started; each later one was made from at least updates_per_version updates.
    started = load_checkpoint(start)["state_dict"]
    v1 = torch.load(version_file(folder, 1), weights_only=True)
    assert all(torch.equal(started[k].float(), v1[k]) for k in started)
    assert all(v["devices"] >= 3 and v["trained"] >= 1 for v in versions[1:])
    # What the devices did: dropped and late exactly where the seeded rule says; the server heard no more
    # updates than the devices sent (one may still be on its way when the last version is made).
    tasks = [json.loads(x) for x in (folder / "device_tasks.jsonl").read_text().splitlines()]
    rule = {(t["device"], t["version"]): behaviour(0, t["device"], t["version"], 0.3, 0.3) for t in tasks}
    assert all(t["behaviour"] == rule[t["device"], t["version"]] or
               (t["behaviour"] == "budget_spent" and rule[t["device"], t["version"]] != "dropped") for t in tasks)
    assert all(t["films"] >= 5 or t["behaviour"] in ("dropped", "budget_spent") for t in tasks)
    assert summary["updates"]["dropped"] <= sum(t["behaviour"] in ("dropped", "budget_spent") for t in tasks)
    # Differential privacy: every trained update was clipped and noised, no device sent more than its budget allows.
    trained = [t for t in tasks if t["behaviour"] in ("trained", "straggler")]
    assert trained and all("norm" in t and 1 <= t["dp_updates"] <= 2 for t in trained)
    p = summary["privacy"]
    assert p["most_updates_by_one_device"] <= 2 and 0 < p["max_epsilon_spent"] <= 8.0 * 1.01
    assert p["film_epsilon_bound"] >= p["max_epsilon_spent"] and p["most_devices_holding_one_film"] >= 1
    # The noise is there: version 2 moved the head's weights by noise of the chosen size (an SGD step at lr 0.01
    # moves them by ~1e-3), averaged over the few updates behind it.
    v2 = torch.load(version_file(folder, 2), weights_only=True)
    moved = float((v2["head.weight"] - v1["head.weight"]).std())
    assert p["noise_std"] > 1 and p["noise_std"] / 4 < moved < p["noise_std"] * 1.1
    assert p["refused_for_budget"] == sum(t["behaviour"] == "budget_spent" for t in tasks)
    # What left the devices: one weight difference per task — the student's tensors and the update count, nothing else.
    sent = [json.loads(x) for x in (folder / "device_outgoing.jsonl").read_text().splitlines()]
    assert len(sent) == len(tasks)
    names = set(load_checkpoint(start)["state_dict"])
    for m in sent:
        assert m["kind"] == "WEIGHT_DIFF" and {n.removeprefix("net.") for n in m["tensors"]} == names
        assert set(m["values"]) == {"count"} and m["values"]["count"] in (0, 1) and m["other_keys"] == []
        assert m["bytes"] == summary["update_bytes"]
    assert summary["updates"]["devices"] <= len(tasks)
    assert (folder / "start.ckpt").read_bytes() == start.read_bytes(), "the starting student is kept beside its versions"
    report = write_report(recipe, RunResults()).read_text()  # what `fedxr run RECIPE --from report` writes
    section = report.split("## Devices that learn together", 1)[1].split("\n## ", 1)[0]
    assert "16 simulated devices holding site-2" in section and "](edge_federation/versions.png)" in section
    assert [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:] == ["1", "2", "3", "4"]
    # The console's run page shows the report, and serves the plot it links (to coordinators: one site's scores).
    from fedxr.console import data as console_data

    assert console_data.run_detail(tmp_path / "runs", "t")["images"]["edge_federation"] == "edge_federation/versions.png"
    final = load_checkpoint(folder / "final.ckpt")
    last = torch.load(version_file(folder, 4), weights_only=True)
    # (BatchNorm's integer step counters are averaged as floats by FedBuff and stored whole.)
    assert all(torch.equal(final["state_dict"][k], last[k]) for k in last if last[k].is_floating_point()
               and final["state_dict"][k].is_floating_point())
    assert final["trained_on"]["synthetic"] is True
    assert summary["test"]["gain_ci95"] is not None and (folder / "versions.png").stat().st_size > 5000
    assert final["source"].endswith("+edge_federation")
    for _ in range(20):  # NVFlare's simulator processes may take a moment to exit after the job
        leftovers = [p for p in psutil.process_iter(["cmdline"])
                     if p.pid != os.getpid() and str(folder) in " ".join(p.info["cmdline"] or [])]
        if not leftovers:
            break
        time.sleep(0.5)
    assert not leftovers, f"processes left running: {[p.info['cmdline'] for p in leftovers]}"


def test_a_dp_device_clips_its_parameters_change_noises_it_and_sends_no_statistics():
    from fedxr.crossdevice.privacy import privatise

    diff = {"w": np.full((100, 100), 0.03, np.float32), "b": np.full(100, 0.4, np.float32),
            "bn.running_var": np.full(8, 5.0, np.float32), "bn.num_batches_tracked": np.array(3.0, np.float32)}
    buffers = {"bn.running_var", "bn.num_batches_tracked"}
    norm = float(np.sqrt(10000 * 0.03**2 + 100 * 0.4**2))
    clipped, seen = privatise(diff, buffers, clip=1.0, std=0.0, generator=torch.Generator().manual_seed(0))
    assert seen == pytest.approx(norm, rel=1e-6) and norm > 1
    assert np.sqrt(sum(np.sum(clipped[k].astype(np.float64) ** 2) for k in ("w", "b"))) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped["b"] / clipped["w"][0, 0], 0.4 / 0.03, rtol=1e-5)  # one scale for all
    assert not clipped["bn.running_var"].any() and not clipped["bn.num_batches_tracked"].any()
    small = {k: v / 100 for k, v in diff.items()}
    kept, _ = privatise(small, buffers, clip=1.0, std=0.0, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(kept["w"], small["w"]), "an update within the clip is sent as it is"
    noised, _ = privatise(diff, buffers, clip=1.0, std=0.5, generator=torch.Generator().manual_seed(1))
    assert np.std(noised["w"] - clipped["w"]) == pytest.approx(0.5, rel=0.05)
    assert not noised["bn.running_var"].any()


def test_a_dp_devices_noise_spends_its_budget_in_max_updates():
    from fedxr.crossdevice.privacy import epsilon_spent, noise_multiplier

    m = noise_multiplier(8.0, 1e-5, 4)
    assert epsilon_spent(m, 1e-5, 4) <= 8.0 * 1.01 and epsilon_spent(m, 1e-5, 5) > 8.0
    assert epsilon_spent(m, 1e-5, 0) == 0.0 and noise_multiplier(1.0, 1e-5, 4) > m


def test_an_executorch_training_step_updates_the_weights_as_pytorchs_does():
    from fedxr.crossdevice.ondevice import INSTALL, step_parity

    if os.environ.get("FEDXR_REQUIRE_EXECUTORCH") != "1":  # CI sets it: there the test must run
        pytest.importorskip("executorch.extension.training", reason=f"ExecuTorch is not installed: {INSTALL}")
    result = step_parity("tiny_cnn", size=32, batch=4, lr=0.1)
    # Float32 kernels summing in another order: differences of a few ulps of the weights, against a step that moves
    # them by ~1e-3 — 1e-6 is well above the first and far below the second.
    assert result["max_abs_param_change"] > 1e-4
    assert result["max_abs_param_diff"] < 1e-6
    assert result["loss_executorch"] == pytest.approx(result["loss_torch"], abs=1e-6)


def test_a_student_executorch_would_train_wrongly_is_refused():
    from fedxr.crossdevice.ondevice import check_trainable_on_device

    with pytest.raises(FedxrError, match="GroupNorm"):
        check_trainable_on_device(build_model("tiny_cnn"), "tiny_cnn")
    with pytest.raises(FedxrError, match="executorch#21686"):
        check_trainable_on_device(build_model("resnet18_narrow", norm="group"), "resnet18_narrow")


def test_a_device_training_with_executorch_ends_where_pytorch_does():
    """`runtime: executorch`: a device's whole local training (its films, their order, their augmentation, several
    SGD steps) through the ExecuTorch program ends at the weights PyTorch's training reaches."""
    from fedxr.crossdevice.device import train_on_device
    from fedxr.crossdevice.ondevice import INSTALL, export_training_step, train_with_executorch

    if os.environ.get("FEDXR_REQUIRE_EXECUTORCH") != "1":
        pytest.importorskip("executorch.extension.training", reason=f"ExecuTorch is not installed: {INSTALL}")
    torch.manual_seed(0)
    net = build_model("tiny_cnn", norm="group")
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 32, 32), dtype=np.uint8)  # 3 batches of 4: no batch to fill up
    labels = rng.integers(0, 2, (12, 14)).astype(np.float32)
    labels[0, :5] = np.nan  # unknown labels stay out of both losses
    program = export_training_step(build_model("tiny_cnn", norm="group").train(), torch.zeros(4, 1, 32, 32),
                                   torch.zeros(4, 14))
    kwargs = dict(mean=0.5, std=0.25, lr=0.1, momentum=0.0, epochs=2, batch_size=4)
    torch.manual_seed(1)  # the augmentation's draws
    steps_et, trained = train_with_executorch(program, start, images, labels, generator=torch.Generator().manual_seed(2),
                                              **kwargs)
    torch.manual_seed(1)
    steps_pt = train_on_device(net, images, labels, generator=torch.Generator().manual_seed(2), **kwargs)
    assert steps_et == steps_pt == 6
    moved = max(float((net.state_dict()[k] - start[k]).abs().max()) for k in start)
    diff = max(float((trained[k] - net.state_dict()[k]).abs().max()) for k in start)
    # Six steps compound the float32 ordering differences of one (< 1e-6 there) a little; the steps move the
    # weights by ~1e-2.
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)
    # The program's batch shape is fixed: a device with 5 films fills its batches up from its own films.
    steps, _ = train_with_executorch(program, start, images[:5], labels[:5], generator=torch.Generator().manual_seed(2),
                                     **{**kwargs, "epochs": 1})
    assert steps == 2


@pytest.mark.slow
def test_devices_that_train_with_executorch_make_the_versions(tmp_path):
    """`edge_federation.runtime: executorch` in NVFlare's simulator: the server exports the student's training step
    once, every device trains through it, versions are made; a student ExecuTorch cannot train is refused first."""
    from fedxr.crossdevice.ondevice import INSTALL

    if os.environ.get("FEDXR_REQUIRE_EXECUTORCH") != "1":
        pytest.importorskip("executorch.extension.training", reason=f"ExecuTorch is not installed: {INSTALL}")
    ov = tiny_recipe_overrides(tmp_path, patients=60, extra=("data.phantom.hospitals=2", "data.sites=2",
                                                              "federated.min_clients=2"))
    assert main(["data", "prepare", str(QUICKSTART), *ov]) == 0
    recipe = load_recipe(QUICKSTART, ov)

    def student(norm: str) -> Path:
        return save_checkpoint(tmp_path / f"start_{norm}.ckpt", model_name="tiny_cnn",
                               state_dict=build_model("tiny_cnn", norm=norm).state_dict(),
                               preprocessing=recipe.preprocessing, thresholds=[0.5] * 14,
                               recipe=recipe.model_dump(mode="json"), extra={"norm": norm})

    edge = ["edge_federation.runtime=executorch", "edge_federation.site=site-2", "edge_federation.devices=6",
            "edge_federation.selection=2", "edge_federation.updates_per_version=2", "edge_federation.versions=2",
            "edge_federation.dropout=0", "edge_federation.stragglers=0", "edge_federation.batch_size=8",
            "edge_federation.timeout_s=120"]
    folder = tmp_path / "runs" / "t" / "edge_federation"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text("{}")  # an earlier edge federation's: a refused one must not touch it
    with pytest.raises(FedxrError, match="BatchNorm cannot be trained by ExecuTorch"):
        edge_federate(load_recipe(QUICKSTART, ov + edge), init_from=student("batch"), progress=False)
    assert (folder / "summary.json").read_text() == "{}"
    summary = edge_federate(load_recipe(QUICKSTART, ov + edge), init_from=student("group"), progress=False)
    assert summary["runtime"]["devices_train_with"] == "executorch" and (folder / "device_step.pte").is_file()
    assert [v["version"] for v in summary["versions"]] == [1, 2] and summary["updates"]["trained"] >= 2
    tasks = [json.loads(x) for x in (folder / "device_tasks.jsonl").read_text().splitlines()]
    # Batches are filled up to the program's 8 films: every device with films took at least one step per pass.
    assert all(t["steps"] >= 1 and t["steps"] == -(-t["films"] // 8) for t in tasks if t["behaviour"] == "trained")
    v2 = torch.load(version_file(folder, 2), weights_only=True)
    v1 = torch.load(version_file(folder, 1), weights_only=True)
    assert max(float((v2[k] - v1[k]).abs().max()) for k in v1) > 0  # the devices' training moved the model
    assert "trained through the student's ExecuTorch training program" in \
        write_report(load_recipe(QUICKSTART, ov + edge), RunResults()).read_text()
