"""A `fedxr run` that fails, is stopped, or is killed outright says so (run_status.json, the console), and running
it again keeps the stages it finished."""

from __future__ import annotations

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


@pytest.mark.slow
def test_a_run_killed_outright_is_interrupted_and_its_rerun_keeps_the_finished_stages(tmp_path, console_run):
    """SIGKILL `fedxr run` while the teacher's federation runs (nothing can clean up), then run it again: the
    finished stages are kept, and the result is the uninterrupted run's (the console tests' run of the same
    recipe: the simulator is bit-reproducible)."""
    ov = console_overrides(tmp_path, rounds=2)
    layout = RunLayout(tmp_path / "runs" / "t")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fedxr", "run", str(QUICKSTART), *ov]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(600):  # bounded: at most 5 min for the data and sites stages
            if layout.run_status.is_file() and _status(layout.run_status).get("stage") == "teacher":
                break
            assert proc.poll() is None, "fedxr run ended before the teacher stage"
            time.sleep(0.5)
        else:
            pytest.fail("the teacher stage never started")
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and the simulator it started: a power cut, an OOM kill
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    status = _status(layout.run_status)
    assert status["state"] == "running" and status["stage"] == "teacher"  # what the killed process left behind
    from fedxr.console import data

    assert data.run_state(layout)["state"] == "interrupted"
    assert data.stages(layout)["teacher"].get("interrupted") and data.stages(layout)["sites"]["done"]
    sites_before = (layout.sites / "sites.json").stat().st_mtime_ns
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "stage: data — up to date, skipped" in rerun.stdout
    assert "stage: sites — up to date, skipped" in rerun.stdout
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
