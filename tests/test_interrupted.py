"""A `fedxr run` that fails, is stopped, or is killed outright says so (run_status.json, the console), and running
it again keeps the stages it finished."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedxr.layout import RunLayout
from fedxr.pipeline import _run_status

from helpers import QUICKSTART, console_overrides


def _status(path: Path) -> dict:
    return json.loads(path.read_text())


def test_run_status_says_how_a_run_ended(tmp_path):
    path = tmp_path / "run_status.json"
    with _run_status(path) as mark:
        assert _status(path)["state"] == "running" and _status(path)["pid"] == os.getpid()
        mark(stage="teacher")
        assert _status(path)["stage"] == "teacher"
    assert _status(path)["state"] == "finished"
    with pytest.raises(RuntimeError):
        with _run_status(path) as mark:
            mark(stage="export")
            raise RuntimeError("stage 'export' failed: no space left on device\n  log: …")
    assert _status(path) | {"started": 0, "ended": 0} == {
        "state": "failed", "stage": "export", "error": "stage 'export' failed: no space left on device",
        "pid": os.getpid(), "host": _status(path)["host"], "started": 0, "ended": 0}
    with pytest.raises(KeyboardInterrupt):
        with _run_status(path) as mark:
            mark(stage="distill")
            raise KeyboardInterrupt
    assert _status(path)["state"] == "interrupted" and _status(path)["stage"] == "distill"


def _fake_run(root: Path, state: str, pid: int, started: float | None = None, teacher_done: bool = False) -> RunLayout:
    layout = RunLayout(root / "r")
    layout.root.mkdir(parents=True)
    done = {"data": {"result": {"root": "x"}, "run_id": "1"}, "sites": {"result": {"sites": "x"}, "run_id": "2"}}
    if teacher_done:  # an earlier run's result, still there while a rerun of the stage goes on
        done["teacher"] = {"result": {"checkpoint": "x"}, "run_id": "3"}
    layout.pipeline_state.write_text(json.dumps(done))
    layout.run_status.write_text(json.dumps({"state": state, "pid": pid, "host": socket.gethostname(),
                                             "stage": "teacher", "started": time.time() if started is None else started}))
    return layout


def test_the_console_tells_a_killed_run_from_a_running_one(tmp_path):
    pytest.importorskip("fastapi", reason="the console extra is not installed: pip install -e '.[console]'")
    from fedxr.console import data

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    killed = _fake_run(tmp_path / "a", "running", gone.pid)
    assert data.run_state(killed)["state"] == "interrupted"
    assert data.stages(killed)["teacher"] == {"done": False, "disabled": False, "seconds": None, "interrupted": True}
    assert data.list_runs(tmp_path / "a")[0]["stopped"] == {"stage": "teacher", "how": "interrupted"}
    going = _fake_run(tmp_path / "b", "running", os.getpid())
    assert data.run_state(going)["state"] == "running" and data.stages(going)["teacher"]["running"]
    assert data.list_runs(tmp_path / "b")[0]["running"] == "teacher"
    failed = _fake_run(tmp_path / "c", "failed", os.getpid())
    assert data.stages(failed)["teacher"]["failed"] and data.list_runs(tmp_path / "c")[0]["running"] is None
    # A rerun of a stage that finished before (--from, changed settings) that failed: failed, not the old "done".
    rerun = _fake_run(tmp_path / "d", "failed", os.getpid(), teacher_done=True)
    assert data.stages(rerun)["teacher"]["done"] is False and data.stages(rerun)["teacher"]["failed"]
    assert data.list_runs(tmp_path / "d")[0]["stopped"] == {"stage": "teacher", "how": "failed"}


def test_a_reused_or_ended_pid_is_not_taken_for_the_run(tmp_path):
    """After a reboot a killed run's pid may belong to another process: one that began after the run did is not it;
    a zombie has ended."""
    pytest.importorskip("fastapi", reason="the console extra is not installed: pip install -e '.[console]'")
    from fedxr.console import data

    assert data._alive(os.getpid(), time.time())  # this process began before "now": it could have written it
    assert not data._alive(os.getpid(), time.time() - 3600)  # it began after a status written an hour ago
    reused = _fake_run(tmp_path / "a", "running", os.getpid(), started=time.time() - 3600)
    assert data.run_state(reused)["state"] == "interrupted"
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(100):  # bounded: until it has exited (not reaped: a zombie)
        if data._process_start(zombie.pid) and data._process_start(zombie.pid)[0] == "Z":
            break
        time.sleep(0.05)
    assert not data._alive(zombie.pid, time.time())
    zombie.wait()


def _site_rounds(records: Path) -> dict[tuple[str, int], float]:
    """(site, round) → when that site finished training that round, from the run's round records."""
    from fedxr.records import read_records

    return {(r["site"], r["round"]): r["t_trained"] for r in read_records(records)}


@pytest.mark.slow
def test_a_run_killed_outright_is_interrupted_and_its_rerun_resumes_at_the_next_round(tmp_path, console_run):
    """SIGKILL `fedxr run` once the teacher's federation has completed round 0 (nothing can clean up), then run it
    again: the finished stages are kept, the federation resumes at round 1 without training round 0 again, and the
    result is the uninterrupted run's, bit for bit (the console tests' run of the same recipe)."""
    from fedxr.federated.deploy import processes_using
    from fedxr.federated.resume import RESUME_DIR, last_round, site_state_file

    ov = console_overrides(tmp_path, rounds=2)
    layout = RunLayout(tmp_path / "runs" / "t")
    point = layout.federate / RESUME_DIR
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fedxr", "run", str(QUICKSTART), *ov]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(3000):  # bounded: at most 5 min for the data and sites stages and the first round
            # Round 0 kept by the server and by both sites (a site keeps its state just after it sent its update).
            if last_round(point) == 0 and all(site_state_file(layout.federate / "records" / s, 0).is_file()
                                               for s in ("site-1", "site-2")):
                break
            assert proc.poll() is None, "fedxr run ended before the teacher's round 0 was kept"
            time.sleep(0.1)
        else:
            pytest.fail("the teacher's federation never completed round 0")
        # A power cut: the run and the simulator it started (NVFlare starts its processes in sessions of their own).
        os.killpg(proc.pid, signal.SIGKILL)
        for orphan in processes_using(layout.federate / "nvflare"):
            with contextlib.suppress(OSError):
                orphan.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    status = _status(layout.run_status)
    assert status["state"] == "running" and status["stage"] == "teacher"  # what the killed process left behind
    assert last_round(point) == 0, "the simulator went on after the kill"
    from fedxr.console import data

    assert data.run_state(layout)["state"] == "interrupted"
    assert data.stages(layout)["teacher"].get("interrupted") and data.stages(layout)["sites"]["done"]
    sites_before = (layout.sites / "sites.json").stat().st_mtime_ns
    trained_before = _site_rounds(layout.federate / "records")
    assert {rnd for _, rnd in trained_before} <= {0, 1} and (("site-1", 0) in trained_before)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "stage: data — up to date, skipped" in rerun.stdout
    assert "stage: sites — up to date, skipped" in rerun.stdout
    assert "federate: resuming from round 1 of 2" in rerun.stdout, rerun.stdout[-3000:]
    trained_after = _site_rounds(layout.federate / "records")
    assert {k: v for k, v in trained_after.items() if k[1] == 0} == {k: v for k, v in trained_before.items() if k[1] == 0}
    assert sorted(trained_after) == [(s, r) for s in ("site-1", "site-2") for r in (0, 1)]
    assert sorted(p.name for p in point.iterdir()) == ["done.json"]  # the finished stage keeps no resume state
    assert not list((layout.federate / "records").rglob("resume_round*.pt"))
    assert (layout.sites / "sites.json").stat().st_mtime_ns == sites_before
    assert _status(layout.run_status)["state"] == "finished"
    assert data.run_state(layout)["state"] == "finished"
    assert not any(v.get("interrupted") or v.get("running") for v in data.stages(layout).values())
    from fedxr.models.checkpoint import load_checkpoint

    uninterrupted = RunLayout(console_run["runs"] / "t")
    for name in ("global_best.ckpt", "global_last.ckpt"):
        assert (load_checkpoint(layout.federate / name)["weights_sha256"]
                == load_checkpoint(uninterrupted.federate / name)["weights_sha256"]), name
    assert (json.loads((layout.evaluate / "metrics.json").read_text())["macro_auroc"]
            == json.loads((uninterrupted.evaluate / "metrics.json").read_text())["macro_auroc"])


def _digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path (hidden temporaries left out: nothing reads them)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _kill_at(cmd: list[str], seconds: float, env: dict, started=None) -> bool:
    """Start ``cmd`` in its own session and SIGKILL it and its children ``seconds`` after ``started()`` first holds
    (at once: after the start), so the kill lands inside the work, not in the interpreter's start-up; whether it was
    still running (False: it had finished)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(1200):  # bounded: 2 min for the work to begin
            if started is None or started() or proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return True


def _timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return time.perf_counter() - t


@pytest.mark.slow
def test_phantom_cache_and_export_killed_at_random_points_rerun_to_the_uninterrupted_outputs(tmp_path):
    """SIGKILL (nothing can clean up) phantom generation, the image cache's build and an export at random points
    of their work, then run each again: nothing half-written is left where a later stage would trust it, the rerun's
    outputs are byte for byte the uninterrupted run's, and the killed writers' temporaries are swept away."""
    import random

    from fedxr.config import load_recipe
    from fedxr.data.cache import cache_path

    rng = random.Random(29)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fedxr = [sys.executable, "-m", "fedxr"]

    def overrides(root: Path) -> list[str]:
        return console_overrides(root, rounds=1) + ["data.phantom.patients=120", "data.phantom.size=64"]

    # Phantom generation and the site manifests (`fedxr data prepare`, what `fedxr run` does first).
    reference, killed = tmp_path / "ref", tmp_path / "killed"
    full = _timed([*fedxr, "data", "prepare", str(QUICKSTART), *overrides(reference)], env)
    kills = 0
    for _ in range(2):
        kills += _kill_at([*fedxr, "data", "prepare", str(QUICKSTART), *overrides(killed)],
                          rng.uniform(0.4, 0.95) * full, env)
        phantom = killed / "phantom"
        # Killed: no data set, or a whole one (the folder appears by a rename only when complete).
        assert not phantom.exists() or (phantom / "phantom.json").is_file()
    assert kills, "no kill landed while the data were being made"
    _timed([*fedxr, "data", "prepare", str(QUICKSTART), *overrides(killed)], env)
    assert _digests(killed / "phantom") == _digests(reference / "phantom")
    assert _leftovers(killed) == []

    # The image cache: built by the training loader; here directly, at a size that takes a few seconds.
    recipe = load_recipe(QUICKSTART, overrides(killed))
    images = sorted(str(p) for p in (killed / "phantom" / "images").glob("*.png"))
    build = [sys.executable, "-c", "import sys; from fedxr.data.cache import build_cache; "
             "build_cache(sys.argv[3:], int(sys.argv[1]), sys.argv[2], workers=1, progress=False)"]
    images = images * 4  # a build of a few seconds
    full = _timed([*build, "128", str(tmp_path / "cache_ref"), *images], env)
    target = cache_path(images, 128, tmp_path / "cache")
    building = lambda: target.parent.is_dir() and bool(_leftovers(target.parent))  # noqa: E731
    reference_cache = _digests(tmp_path / "cache_ref")
    left = []
    for _ in range(2):
        target.unlink(missing_ok=True)  # (a kill that came just after the rename left a whole cache: build again)
        _kill_at([*build, "128", str(tmp_path / "cache"), *images], rng.uniform(0.0, 0.3) * full, env, building)
        # the cache file appears by a rename only when complete: absent, or whole
        assert not target.exists() or _digests(target.parent) == reference_cache
        left += _leftovers(target.parent)
    assert left, "no kill landed inside the build (nothing for the sweep to do)"
    _timed([*build, "128", str(tmp_path / "cache"), *images], env)
    assert _digests(tmp_path / "cache") == _digests(tmp_path / "cache_ref")
    assert _leftovers(target.parent) == []  # the killed builds' partial files (as large as the cache) are gone

    # An export over an earlier one: killed, the earlier export stays whole; rerun, the same files.
    from fedxr.edge.model import sha256_of
    from fedxr.models.checkpoint import save_checkpoint
    from fedxr.models.registry import build_model

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "model.ckpt", model_name="tiny_cnn", state_dict=build_model("tiny_cnn").state_dict(),
                           preprocessing=recipe.preprocessing, thresholds=[0.5] * 14, recipe=recipe.resolved())
    export = [sys.executable, "-m", "fedxr.export", str(ckpt), "--int8", "on", "--calibration-images", "16",
              "--trust-images", "64", "--data", str(recipe.layout.sites)]
    out = tmp_path / "export"
    full = _timed([*export, "--out", str(tmp_path / "export_ref")], env)
    _timed([*export, "--out", str(out), "--int8", "off"], env)  # the earlier export, without INT8
    earlier = _digests(out)
    exporting = lambda: bool(_leftovers(tmp_path))  # noqa: E731  (its staging folder beside the old export)
    assert _kill_at([*export, "--out", str(out)], rng.uniform(0.0, 0.3) * full, env, exporting)
    assert _digests(out) == earlier  # whole, and still verifies
    assert _leftovers(tmp_path), "the kill did not land inside the export (no staging folder left)"
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(sha256_of(out / f["file"]) == f["sha256"] for f in manifest["files"] if (out / f["file"]).is_file())
    _timed([*export, "--out", str(out)], env)
    model_files = lambda d: {k: v for k, v in _digests(d).items() if k.endswith((".onnx", ".ort"))}  # noqa: E731
    assert model_files(out) == model_files(tmp_path / "export_ref")  # manifest differs by its timings only
    assert _leftovers(tmp_path) == []


def test_the_sweep_removes_only_dead_writers_temporaries_of_this_machine_and_puts_back_a_half_swapped_folder(tmp_path):
    from fedxr.data.atomic import _host, sweep_stale_temporaries

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    target = tmp_path / "cache.npy"
    dead = tmp_path / f".cache.npy.tmp-{gone.pid}@{_host()}-0"
    live = tmp_path / f".cache.npy.tmp-{os.getppid()}@{_host()}-0"
    elsewhere = tmp_path / f".cache.npy.tmp-{gone.pid}@anothermachine-0"
    other_file = tmp_path / f".other.npy.tmp-{gone.pid}@{_host()}-0"
    for p in (dead, live, elsewhere, other_file):
        p.write_bytes(b"partial")
    assert sweep_stale_temporaries(target) == [dead]
    assert live.exists() and elsewhere.exists() and other_file.exists()
    # A folder swap killed between its two renames: the folder is missing, the previous one is ".old": put back.
    export = tmp_path / "export"
    old = tmp_path / f".export.old-{gone.pid}@{_host()}-0"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    staging = tmp_path / f".export.tmp-{gone.pid}@{_host()}-abc"
    staging.mkdir()
    sweep_stale_temporaries(export)
    assert (export / "manifest.json").read_text() == "{}" and not old.exists() and not staging.exists()


def test_a_resume_point_is_used_only_by_the_same_job_with_every_sites_state(tmp_path):
    """The rules that decide where a federated stage starts: the same job resumes after the newest point every site
    kept its state for (else the one before); a changed job, a point from a longer run, --restart-stage or a DP
    recipe start at 0; a finished run of the same job is kept, not trained again."""
    import torch

    from fedxr.artifacts import FederateSummary
    from fedxr.config import load_recipe
    from fedxr.federated.job import model_config
    from fedxr.federated.resume import (POINT_FILE, job_digest, last_round, mark_done, next_round, read_point,
                                        resumable, save_site_state, site_state_file, write_point)
    from fedxr.federated.run import _resume_settings

    recipe = load_recipe(QUICKSTART, ["federated.rounds=3", f"output.runs_dir={tmp_path / 'runs'}"])
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "site-1.csv").write_text("path,patient_id\n")
    folder, records = tmp_path / "stage", tmp_path / "stage" / "records"
    names, works = ["site-1", "site-2"], [records / "site-1", records / "site-2"]

    def settings(r=recipe, restart=False):
        return _resume_settings(r, folder, records, sites, names, restart, "", {}, "sim")

    digest = job_digest(recipe.to_yaml(), model_config(recipe), sites, [], extra="None||sim")
    assert settings()[0].digest == digest
    for rnd in (0, 1, 2):
        write_point(folder / "resume", digest, rnd, {"params": {"w": torch.full((2,), float(rnd))}},
                    {"best_val_metric": 0.5}, None)
        for work in works[:1 if rnd == 2 else 2]:  # site-2 has not kept round 2 yet
            save_site_state(work, rnd, {"round": rnd})
    assert not site_state_file(works[0], 0).exists() and site_state_file(works[0], 1).exists()  # the last two kept
    assert sorted(p.name for p in (folder / "resume").iterdir()) == ["global_round1.pt", "global_round2.pt", POINT_FILE]
    assert next_round(folder / "resume", digest, 3, works) == (2, "rounds 0-1 were completed by an interrupted run")
    assert next_round(folder / "resume", "another job", 3, works) == (
        0, "the recipe, the model or the sites' data changed since the interrupted run")
    assert next_round(folder / "resume", digest, 1, works)[0] == 0  # points past this job's last round
    site_state_file(works[1], 1).unlink()
    assert next_round(folder / "resume", digest, 3, works)[0] == 0  # neither point has site-2's state
    save_site_state(works[1], 1, {"round": 1})
    resumed, done = settings()
    assert resumed.start_round == 2 and done is None and last_round(folder / "resume") == 2
    changed = load_recipe(QUICKSTART, ["federated.rounds=3", "model.lr=0.5", f"output.runs_dir={tmp_path / 'runs'}"])
    assert settings(changed)[0].start_round == 0
    assert read_point(folder / "resume") is None and not list(records.rglob("resume_round*.pt"))  # thrown away
    write_point(folder / "resume", digest, 0, {}, {}, None)
    restarted, _ = settings(restart=True)
    assert restarted.start_round == 0 and read_point(folder / "resume") is None  # --restart-stage
    # A finished run of this job: kept while its outputs are there.
    ckpt = folder / "global_last.ckpt"
    ckpt.write_bytes(b"x")
    summary = FederateSummary(checkpoint=str(ckpt), checkpoints={"global_last": str(ckpt)}, workspace="w",
                              server_run="s", tensorboard="t")
    (folder / FederateSummary.FILE).write_text(json.dumps(summary.to_json()))
    mark_done(folder / "resume", digest, folder / FederateSummary.FILE)
    assert settings()[1] == summary and settings(restart=True)[1] is None
    ckpt.unlink()
    assert settings()[1] is None
    dp = load_recipe(QUICKSTART.with_name("quickstart_dp.yaml"))
    assert "privacy.dp" in (resumable(dp) or "") and resumable(recipe) is None


def test_a_production_server_resumes_the_same_job_and_a_new_submission_of_a_finished_one_starts_anew(tmp_path):
    """Production: the submitter cannot read the server's disk, so the server chooses the start round from its own
    point (no site states to check there: each site falls back to the global model if it kept none). A point whose
    rounds all finished is resumed only by the submitter's resubmission after a loss; --restart-stage gives the job
    a digest of its own; DP is not resumable."""
    import torch

    from fedxr.config import load_recipe
    from fedxr.federated.job import SERVER_RESUME_DIR
    from fedxr.federated.resume import mark_finished, next_round, read_point, write_point
    from fedxr.federated.run import _prod_resume_settings

    recipe = load_recipe(QUICKSTART, ["federated.rounds=3", f"output.runs_dir={tmp_path / 'runs'}"])
    settings = _prod_resume_settings(recipe, tmp_path / "stage", "federate", False, "", {})
    assert settings is not None and settings.on_server and not settings.resubmitted and settings.start_round == 0
    assert settings.folder == Path(SERVER_RESUME_DIR) / f"fedxr-{recipe.output.name}-federate"  # under the server's root
    assert _prod_resume_settings(recipe, tmp_path / "stage", "federate", False, "", {}).digest == settings.digest
    assert _prod_resume_settings(recipe, tmp_path / "stage", "federate", True, "", {}).digest != settings.digest
    dp = load_recipe(QUICKSTART.with_name("quickstart_dp.yaml"))
    assert _prod_resume_settings(dp, tmp_path / "stage", "federate", False, "", {}) is None

    folder, digest = tmp_path / "server" / settings.folder, settings.digest
    for rnd in (0, 1):
        write_point(folder, digest, rnd, {"params": {"w": torch.zeros(1)}}, {}, None)
    assert next_round(folder, digest, 3, [], finished_too=False) == (2, "rounds 0-1 were completed by an interrupted run")
    mark_finished(folder, digest, 2)  # round 2 is not done: nothing marked
    assert not read_point(folder).get("finished")
    write_point(folder, digest, 2, {"params": {"w": torch.zeros(1)}}, {}, None)
    mark_finished(folder, digest, 2)
    assert read_point(folder)["finished"]
    assert next_round(folder, digest, 3, [], finished_too=False)[0] == 0  # a new submission trains anew
    assert next_round(folder, digest, 3, [], finished_too=True)[0] == 3  # a resubmission: the final evaluation only
    write_point(folder, digest, 0, {"params": {"w": torch.zeros(1)}}, {}, None)  # the new run's first round
    assert not read_point(folder).get("finished") and [e["round"] for e in read_point(folder)["points"]] == [0]


def test_a_production_site_resumes_from_its_own_state_of_the_same_job_or_says_why_not(tmp_path, capsys):
    """The site's side of a production resume, decided at its first task: round 0 throws earlier states away; a
    later round without the state of the round before continues from the global model, with its own tensors from an
    older state of the same job; with no state of this job at all it fails the task rather than send untrained
    weights when asked for its own model, or when it would distil from a teacher only round 0's model carried."""
    import torch

    from fedxr.federated.client import _resume_at_first_task
    from fedxr.federated.resume import save_site_state, site_state_file

    class Student(torch.nn.Module):
        def __init__(self, teacher: bool = False):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)
            if teacher:
                self.teacher = torch.nn.Linear(2, 1)

    work = tmp_path / "state"

    def first(rnd, digest="job-a", module=None, submit=False):
        task = {"round": rnd, "evaluate": False, "submit": submit}
        return _resume_at_first_task(work, task, digest, module or Student(), None, None)

    with pytest.raises(RuntimeError, match="no model of its own to submit"):
        first(None, submit=True)  # cross-site scoring asks first, and this site never kept a state
    own = {k: torch.full_like(v, 7.0) for k, v in Student().state_dict().items()}
    save_site_state(work, 0, {"round": 0, "job": "job-a", "module": own})
    save_site_state(work, 1, {"round": 1, "job": "job-b", "module": own})  # another job's
    # Round 3 wants round 2's state: there is none; round 1's is another job's, round 0's is this job's.
    module = Student()
    assert first(3, module=module) is not None and torch.equal(module.lin.weight, own["lin.weight"])
    assert "its own tensors (e.g. FedBN BatchNorm) from round 0" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="no trained teacher"):
        first(3, "job-c", module=Student(teacher=True))
    with pytest.raises(RuntimeError, match="no model of its own to submit"):
        first(None, "job-c", submit=True)
    fresh = Student()
    before = fresh.lin.weight.clone()
    assert first(3, "job-c", module=fresh) is None and torch.equal(fresh.lin.weight, before)  # a late joiner
    assert "as initialised" in capsys.readouterr().out
    assert first(0) is None and not site_state_file(work, 0).exists() and not site_state_file(work, 1).exists()


def test_records_cut_back_to_the_rounds_a_resumed_federation_keeps(tmp_path):
    from fedxr.records import OUTGOING, append_line, keep_rounds_before, read_lines, start_records

    start_records(tmp_path)
    (tmp_path / OUTGOING).mkdir()
    for rnd in range(3):
        append_line(tmp_path / "site-1.jsonl", {"site": "site-1", "round": rnd})
        append_line(tmp_path / OUTGOING / "site-1.jsonl", {"site": "site-1", "round": rnd, "task": "train"})
    append_line(tmp_path / "site-1.jsonl", {"site": "site-1", "round": "final"})
    keep_rounds_before(tmp_path, 2)
    assert [r["round"] for r in read_lines(tmp_path / "site-1.jsonl")] == [0, 1]  # digests still check out
    assert [r["round"] for r in read_lines(tmp_path / OUTGOING / "site-1.jsonl")] == [0, 1]
