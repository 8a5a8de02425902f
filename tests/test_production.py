"""A production federation on this machine, the way hospitals run one: a provisioned project (server, two
hospitals, an admin; mutual TLS), each participant started from its own startup kit's start.sh in its own
folder with its own data, a preflight check of every kit, submission with `fedxr federate --env prod
--startup-kit ADMIN_KIT`, the coordinator's server killed outright after round 0 and started again from its kit,
and one hospital killed in the middle of the next round."""

import json
import re
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from fedxr.cli import main
from fedxr.artifacts import FederateSummary
from fedxr.config import load_recipe
from fedxr.data.prepare import ensure_dataset, ensure_sites
from fedxr.federated.deploy import nvflare_cli, preflight, processes_using, start_participant, stop_participant
from fedxr.federated.job import SERVER_RESUME_DIR, SITE_STATE_DIR, job_name
from fedxr.federated.watch import running_admin_cells
from fedxr.models.checkpoint import load_checkpoint
from fedxr.records import read_lines

from helpers import QUICKSTART, tiny_recipe_overrides

pytestmark = pytest.mark.slow

HOSPITALS = {"hospital-a": "site-1", "hospital-b": "site-2"}  # kit name -> the site manifest it holds
ADMIN = "admin@coordinator.example.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_yml(fl_port: int, admin_port: int) -> str:
    clients = "".join(f"  - name: {name}\n    type: client\n    org: {name.replace('-', '_')}\n" for name in HOSPITALS)
    return f"""api_version: 3
name: fedxr-prod-test
description: fedxr production test
participants:
  - name: localhost
    type: server
    org: coordinator
    fed_learn_port: {fl_port}
    admin_port: {admin_port}
{clients}  - name: {ADMIN}
    type: admin
    org: coordinator
    role: project_admin
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
    args:
      template_file:
        - master_template.yml
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args:
      config_folder: config
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""


def provision(tmp: Path) -> Path:
    import subprocess

    (tmp / "project.yml").write_text(project_yml(free_port(), free_port()))
    proc = subprocess.run([nvflare_cli(), "provision", "-p", str(tmp / "project.yml"), "-w", str(tmp / "ws")],
                          capture_output=True, text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return next((tmp / "ws").rglob("prod_00"))


def wait_for(what: str, check, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def count_in_logs(folder: Path, pattern: str) -> int:
    return sum(len(re.findall(pattern, p.read_text(errors="ignore"))) for p in folder.rglob("log.txt"))


def train_tasks_sent(log_folder: Path, hospital: str) -> int:
    """How many train tasks the server has handed to a hospital (the server's job log)."""
    return count_in_logs(log_folder, rf"return task to client\.\s+client_name: {hospital}\s+task_name: train\b")


def train_results_received(log_folder: Path, hospital: str) -> int:
    return count_in_logs(log_folder, rf"got result from client {hospital} for task: name=train\b")


def kill_kit(kit: Path) -> int:
    """SIGKILL every process started from a kit (what a machine's crash takes); returns how many there were."""
    procs = processes_using(kit)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def round_kept(server_kit: Path, hospital_kits: list[Path], job: str, rnd: int) -> bool:
    """Round ``rnd`` is complete: the server's resume point says so and every hospital kept its state after it
    (each under its own kit folder)."""
    import json

    try:
        done = json.loads((server_kit / SERVER_RESUME_DIR / job / "point.json").read_text())["points"][0]["round"]
    except (OSError, ValueError, KeyError, IndexError):
        return False
    return done >= rnd and all((kit / SITE_STATE_DIR / job / kit.name / f"resume_round{rnd}.pt").is_file()
                               for kit in hospital_kits)


def inject_faults(kits: dict, job: str, fired: dict, stop: threading.Event, server_env: dict, log: Path) -> None:
    """After round 0: SIGKILL the coordinator's server (its restart loop, server and job processes) and start it
    again from its kit, as its operator would. Then SIGKILL hospital-b as soon as the server has handed it the
    train task of the job submitted again (round 1): the hospital dies in the middle of that round."""
    try:
        server, hospitals = kits["localhost"], [kits[name] for name in HOSPITALS]
        while not stop.is_set() and not round_kept(server, hospitals, job, 0):
            time.sleep(0.1)
        if stop.is_set():
            return
        fired["server_processes"] = kill_kit(server)
        handed_before = train_tasks_sent(server, "hospital-b")  # the lost job may have handed it round 1 already
        time.sleep(2)
        start_participant(server, env=server_env, log=log)
        fired["server_restarted"] = time.time()
        while not stop.is_set():
            if train_tasks_sent(server, "hospital-b") > handed_before:
                fired.update(at=time.time(), processes=kill_kit(kits["hospital-b"]))
                return
            time.sleep(0.05)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        fired["error"] = exc


@pytest.fixture
def federation(tmp_path):
    """Provisioned kits, started server and hospitals; every process is stopped afterwards, also on failure."""
    prod = provision(tmp_path)
    kits = {name: prod / name for name in ["localhost", *HOSPITALS, ADMIN]}
    try:
        yield tmp_path, kits
    finally:
        for name in ["localhost", *HOSPITALS]:
            stop_participant(kits[name], grace_s=5)
        assert processes_using(tmp_path) == []


def test_production_federation_survives_a_restarted_coordinator_and_a_killed_hospital(federation, capsys):
    tmp, kits = federation
    ov = tiny_recipe_overrides(tmp, patients=50, extra=(
        "data.phantom.hospitals=2", "data.sites=2", "data.scheme=column", "data.column=hospital",
        "federated.rounds=2", "federated.min_clients=1", "federated.cross_site_eval=false",
        "federated.timeout_s=45", "output.energy=false"))
    recipe = load_recipe(QUICKSTART, ov)
    ensure_dataset(recipe, progress=False)
    ensure_sites(recipe)

    # The server: its kit passes preflight (ports free, storage writable, dry run), then start.sh.
    server_check = preflight(kits["localhost"])
    assert server_check.ok, server_check.summary()
    # NVFlare's server waits up to 900 s for a vanished hospital's account of a job before it finalises the
    # job; a coordinator shortens that with this server setting (README, "Running across hospitals").
    server_env = {"NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT": "15"}
    start_participant(kits["localhost"], env=server_env, log=tmp / "server.out")
    # Each hospital: preflight reaches the server over mutual TLS once it is up; then its own start.sh,
    # in its own kit folder, with its own data given as a site fact.
    for name, site in HOSPITALS.items():
        check = wait_for(f"{name}'s preflight", lambda: (c := preflight(kits[name])).ok and c, timeout_s=90,  # noqa: B023
                         every_s=2)  # (wait_for calls it before the loop moves on)
        assert check.problems == []
        start_participant(kits[name], env={"FEDXR_SITE_MANIFEST": str(recipe.layout.sites / f"{site}.csv")},
                          log=tmp / f"{name}.out")
    # Registered: each hospital's own output says so (the server's list also holds the preflight dry runs).
    wait_for("both hospitals to register", lambda: all(
        f"Successfully registered client:{name}" in (tmp / f"{name}.out").read_text(errors="ignore")
        for name in HOSPITALS), timeout_s=120)

    # The coordinator's server dies after round 0 and comes back from its kit; hospital-b (its client, job and
    # trainer processes) dies as soon as it is handed round 1 (the last) of the job submitted again.
    fired: dict = {}
    stop = threading.Event()
    job = job_name(recipe)
    injector = threading.Thread(target=inject_faults, args=(kits, job, fired, stop, server_env, tmp / "server.out"),
                                daemon=True)
    injector.start()
    cells_before = running_admin_cells()
    try:
        code = main(["federate", str(QUICKSTART), *ov, "--env", "prod", "--startup-kit", str(kits[ADMIN])])
    finally:
        stop.set()
        injector.join(timeout=5)
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "error" not in fired, fired.get("error")
    assert fired.get("server_processes", 0) >= 2, "the server was never killed"
    assert fired.get("processes", 0) >= 1, "hospital-b was never killed"
    # The submitter noticed the lost job, said so and sent it again; the server resumed it from its own point.
    assert "was lost (the coordinator's server restarted)" in captured.out
    # No admin connection of this process is left reconnecting to the server (it would keep the process alive).
    assert running_admin_cells() - cells_before == set()

    # The job finished with hospital-a alone meeting min_clients; its results were downloaded and converted.
    federate = recipe.layout.federate
    ckpt = load_checkpoint(federate / "global_last.ckpt")
    assert ckpt["source"] == "federate"
    summary = FederateSummary.read(federate)
    assert summary.env == "prod" and summary.resumed_from == 1
    # The server's log of the resumed job (downloaded with its results): it started at round 1; hospital-b was
    # handed round 1 and never answered; hospital-a answered it, having resumed its own state after round 0.
    server_job = Path(summary.workspace)
    assert train_tasks_sent(server_job, "hospital-b") == 1
    assert train_results_received(server_job, "hospital-b") == 0
    assert train_results_received(server_job, "hospital-a") == 1
    job_log = "".join(p.read_text(errors="ignore") for p in server_job.rglob("log.txt"))
    assert "resuming from round 1 of 2" in job_log
    assert count_in_logs(kits["hospital-a"], r"resumed this site's state after round 0") == 1
    # Round 1 was closed by its deadline (fedxr's SiteDeadlineFedAvg), not by NVFlare's dead-client check.
    assert "task train exit with status TaskCompletionStatus.TIMEOUT" in job_log
    assert "is dead - set task" not in job_log
    assert processes_using(kits["hospital-b"]) == []
    # A finished job's point is marked so: the same job submitted anew trains from round 0.
    point = json.loads((kits["localhost"] / SERVER_RESUME_DIR / job / "point.json").read_text())
    assert point["finished"] and point["points"][0]["round"] == 1
    # Each hospital keeps its own record of what it sent (privacy.audit), in its job folders: nothing left its
    # network that it cannot see. Round 0 was sent once (not trained again after the restart); hospital-b's record
    # ends where it was killed.
    for name, rounds in (("hospital-a", [0, 1]), ("hospital-b", [0])):
        sent = [m for p in kits[name].rglob("outgoing.jsonl") for m in read_lines(p)]  # each line's digest checked
        assert {m["site"] for m in sent} == {name}
        assert sorted(m["round"] for m in sent if m["task"] == "train") == rounds, name
        assert all(m["kind"] == "WEIGHTS" and m["tensors"] for m in sent if m["task"] == "train")


def test_preflight_names_what_is_wrong_before_anything_starts(tmp_path, capsys):
    """`fedxr preflight KIT`: a hospital's kit with no server up fails with NVFlare's finding and exit 3;
    a folder that is no kit is a clear error."""
    prod = provision(tmp_path)
    assert main(["preflight", str(prod / "hospital-a")]) == 3
    out = capsys.readouterr().out
    assert "hospital-a: preflight FAILED" in out
    assert "Check server available" in out
    assert main(["preflight", str(tmp_path)]) == 1
    assert "not an NVFlare startup kit" in capsys.readouterr().err
