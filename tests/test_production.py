"""A production federation on this machine, the way hospitals run one: a provisioned project (server, two
hospitals, an admin; mutual TLS), each participant started from its own startup kit's start.sh in its own
folder with its own data, a preflight check of every kit, submission with `fedxr federate --env prod
--startup-kit ADMIN_KIT`, and one hospital killed in the middle of a round."""

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


def kill_when_training(server_kit: Path, kit: Path, round_index: int, fired: dict, stop: threading.Event) -> None:
    """SIGKILL every process of a hospital (its client, job and trainer) as soon as the server has handed it
    the train task of ``round_index`` (0-based): the hospital dies in the middle of that round."""
    while not stop.is_set():
        if train_tasks_sent(server_kit, kit.name) > round_index:
            procs = processes_using(kit)
            for p in procs:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            fired.update(at=time.time(), processes=len(procs))
            return
        time.sleep(0.05)


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


def test_production_federation_from_startup_kits_survives_a_killed_hospital(federation, capsys):
    tmp, kits = federation
    ov = tiny_recipe_overrides(tmp, patients=50, extra=(
        "data.phantom.hospitals=2", "data.sites=2", "data.scheme=column", "data.column=hospital",
        "federated.rounds=2", "federated.min_clients=1", "federated.cross_site_eval=false",
        "federated.timeout_s=60", "output.energy=false"))
    recipe = load_recipe(QUICKSTART, ov)
    ensure_dataset(recipe, progress=False)
    ensure_sites(recipe)

    # The server: its kit passes preflight (ports free, storage writable, dry run), then start.sh.
    server_check = preflight(kits["localhost"])
    assert server_check.ok, server_check.summary()
    # NVFlare's server waits up to 900 s for a vanished hospital's account of a job before it finalises the
    # job; a coordinator shortens that with this server setting (README, "Running across hospitals").
    start_participant(kits["localhost"], env={"NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT": "15"}, log=tmp / "server.out")
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

    # Kill hospital-b (its client, job and trainer processes) as soon as it starts round 1 (the last).
    fired, stop = {}, threading.Event()
    killer = threading.Thread(target=kill_when_training, args=(kits["localhost"], kits["hospital-b"], 1, fired, stop),
                              daemon=True)
    killer.start()
    try:
        code = main(["federate", str(QUICKSTART), *ov, "--env", "prod", "--startup-kit", str(kits[ADMIN])])
    finally:
        stop.set()
        killer.join(timeout=5)
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert fired.get("processes", 0) >= 1, "hospital-b was never killed"

    # The job finished with hospital-a alone meeting min_clients; its results were downloaded and converted.
    federate = recipe.layout.federate
    ckpt = load_checkpoint(federate / "global_last.ckpt")
    assert ckpt["source"] == "federate"
    summary = FederateSummary.read(federate)
    # The server's log of the job (downloaded with its results): hospital-b was handed both rounds and
    # answered only round 0; hospital-a answered both; the job still finished.
    server_job = Path(summary.workspace)
    assert summary.env == "prod"
    assert train_tasks_sent(server_job, "hospital-b") == 2
    assert train_results_received(server_job, "hospital-b") == 1
    assert train_results_received(server_job, "hospital-a") == 2
    # Round 1 was closed by its deadline (fedxr's SiteDeadlineFedAvg), not by NVFlare's dead-client check.
    job_log = "".join(p.read_text(errors="ignore") for p in server_job.rglob("log.txt"))
    assert "task train exit with status TaskCompletionStatus.TIMEOUT" in job_log
    assert "is dead - set task" not in job_log
    assert processes_using(kits["hospital-b"]) == []
    # Each hospital keeps its own record of what it sent (privacy.audit), in its job folder: nothing left its
    # network that it cannot see. hospital-b's ends where it was killed.
    for name, rounds in (("hospital-a", [0, 1]), ("hospital-b", [0])):
        sent = [m for p in kits[name].rglob("outgoing.jsonl") for m in read_lines(p)]  # each line's digest checked
        assert {m["site"] for m in sent} == {name}
        assert [m["round"] for m in sent if m["task"] == "train"] == rounds, name
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
