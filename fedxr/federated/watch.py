"""Watch a POC or production job for a participant that lost it, and submit it again from its last completed round.

NVFlare 2.9 keeps no job across a restart: a coordinator whose server process is killed (or whose machine
reboots) comes back — the startup kit's daemon restarts it within seconds, or an operator runs
``startup/start.sh`` — with the sites reconnected by themselves but with no job running, while its job store
still says ``RUNNING`` for ever (its server-side snapshots were removed: ``ServerEngine.persist_components`` is a
no-op). A site whose processes are killed and restarted comes back without its part of the job, and the job
then waits for it until every round's deadline.

fedxr's federations keep their own resume point after every round (:mod:`fedxr.federated.resume`), so the
submitter (``fedxr federate --env poc``, the teacher and distillation stages of ``fedxr run``) does what NVFlare
does not: it asks the server every few seconds about the job it submitted. The job is lost when the server
started after the job did (its start time, not the job's absence from the server's running jobs: a job that is
ending leaves that list before its status says so), or when a site that was seen running the job answers
without it for 30 s while the server still runs it (at a job's normal end the sites leave a few seconds before
the server). Then the submitter aborts what is left of the job, stops the lost job's leftover processes on this
machine, and submits the same job again, resuming from the last completed round. Only the round in flight is
lost. A stage that cannot resume (DP, HE) is not submitted again (it would start from round 0, DP spending
its budget twice): a restarted server fails it at once, with its reason; a site's loss is not watched for.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

#: How often the submitter asks the server about its job (seconds).
WATCH_EVERY_S = 5.0
#: How many checks in a row must find the job lost, for the same reason, before it counts as lost: a restarted
#: server is certain at once (its start time), a site gone from the job must stay gone for ~30 s.
SERVER_CONFIRMATIONS, SITE_CONFIRMATIONS = 2, 7
#: How many times one federation is submitted again before fedxr gives up and says why.
MAX_RESUBMISSIONS = 3
#: Statuses of a job that has not ended.
UNFINISHED = ("RUNNING", "SUBMITTED", "DISPATCHED")


def admin_kit(poc_workspace: Path, username: str) -> Path:
    """The admin startup kit of ``username`` that POC provisioning wrote into ``poc_workspace``."""
    from fedxr.federated.deploy import ADMIN_CONFIG

    kits = sorted(p.parent.parent for p in Path(poc_workspace).glob(f"**/{ADMIN_CONFIG}"))
    kit = next((k for k in kits if k.name == username), None)
    if kit is None:
        raise FileNotFoundError(f"{poc_workspace}: no admin startup kit of {username} (no {username}/{ADMIN_CONFIG})")
    return kit


#: The two kinds of loss.
SERVER_RESTARTED = "the coordinator's server restarted"


def why_lost(session, job_id: str, sites: list[str] | None, seen: set[str], connected: set[str] | None = None,
             server_only: bool = False) -> str | None:
    """Why the running job ``job_id`` can no longer finish (None: it can, or it is not running, or the server
    cannot say right now). ``session`` is an NVFlare admin session (``nvflare.fuel.flare_api``); ``seen`` collects
    the sites seen running the job (a site that never showed it is starting, not lost); ``sites``: the job's sites
    (None: every site seen running it, in production where the submitter does not know them); ``connected``
    collects the sites connected to the server while it runs the job (those a resubmission waits for);
    ``server_only``: only a restarted server is looked for (the sites are not asked)."""
    from datetime import datetime

    meta = session.get_job_meta(job_id) or {}
    if not str(meta.get("status") or "").startswith("RUNNING"):
        return None
    info = session.get_system_info()
    job_started = meta.get("start_time")
    server_started = info.server_info.start_time
    if job_started and server_started and float(server_started) > datetime.fromisoformat(job_started).timestamp():
        return SERVER_RESTARTED
    if server_only or job_id not in {j.job_id for j in info.job_info}:
        return None  # the job is ending on the server (its status follows): no site's loss
    if connected is not None:
        connected |= {c.name for c in info.client_info}
    clients = session.get_client_job_status() or []
    # A site that answered and listed its jobs (or "no_jobs") without this one has lost it; one that did not
    # answer ("no_reply", "error") may be busy: it decides nothing.
    with_job = {c.get("client_name") for c in clients if c.get("job_id") == job_id}
    seen |= with_job
    answered = {c.get("client_name") for c in clients if c.get("job_id") not in (None, "?") or c.get("status") == "no_jobs"}
    gone = [s for s in (sites if sites is not None else sorted(seen)) if s in seen and s in answered and s not in with_job]
    return f"site(s) {', '.join(gone)} no longer run it (restarted)" if gone else None


class JobWatch:
    """Questions about a POC job through one admin session, opened again after a failed call (a server that
    restarted); every answer is None when the server cannot be asked right now."""

    def __init__(self, kit: Path, sites: list[str] | None):
        self.kit, self.sites = Path(kit), None if sites is None else list(sites)
        self._session: Any = None
        self._seen: dict[str, set[str]] = {}  # job id: the sites seen running it
        self._connected: dict[str, set[str]] = {}  # job id: the sites seen connected while the server ran it
        # (job id, the latest reason, how many checks in a row gave it): a resubmitted job starts a streak of its own
        self._streak: tuple[str, str | None, int] = ("", None, 0)

    def _ask(self, question):
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        from fedxr.federated.deploy import admin_username

        try:
            if self._session is None:
                self._session = new_secure_session(admin_username(self.kit), str(self.kit), timeout=10)
            return question(self._session)
        except Exception:
            self.close()
            return None

    def status(self, job_id: str) -> str | None:
        answer = self._ask(lambda session: session.get_job_status(job_id))
        return None if answer is None else str(answer)

    def lost(self, job_id: str, server_only: bool = False) -> str | None:
        """:func:`why_lost` once as many checks in a row as its kind needs have given it; None until then, and
        when the server cannot say (which breaks the streak). ``server_only``: only a restarted server counts (a
        job that cannot resume: the end of a job whose server takes long to finish must not be taken for a site's
        loss)."""
        seen = self._seen.setdefault(job_id, set())
        connected = self._connected.setdefault(job_id, set())
        why = self._ask(lambda session: why_lost(session, job_id, self.sites, seen, connected, server_only))
        job, last, count = self._streak
        count = count + 1 if why is not None and (job, last) == (job_id, why) else 1
        self._streak = (job_id, why, count)
        needed = SERVER_CONFIRMATIONS if why == SERVER_RESTARTED else SITE_CONFIRMATIONS
        return why if why is not None and count >= needed else None

    def abort(self, job_id: str) -> None:
        """Abort what is left of a lost job (through this watch's session: NVFlare's own ``abort_job`` leaves its
        session open when the server refuses, and that session's connection then retries for ever and keeps the
        process from exiting)."""
        self._ask(lambda session: session.abort_job(job_id))

    def wait_for_sites(self, job_id: str, timeout_s: float, every_s: float = 2.0) -> list[str]:
        """Wait until every site seen running the lost job ``job_id`` is connected to the server again (a restarted
        server's sites reconnect by themselves within seconds), at most ``timeout_s``; returns those still missing.
        Submitted earlier, the job would start with the sites already back and leave the others out of every
        round (production schedules a job once ``min_clients`` sites are there)."""
        import time

        wanted = self._seen.get(job_id, set()) | self._connected.get(job_id, set())
        deadline = time.monotonic() + timeout_s
        while True:
            info = self._ask(lambda session: session.get_system_info())
            missing = sorted(wanted - {c.name for c in info.client_info}) if info is not None else sorted(wanted)
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(every_s)

    def wait_ended(self, job_id: str, timeout_s: float, every_s: float = 2.0) -> bool:
        """Wait until the server no longer runs job ``job_id`` (an aborted job's sites stop it within seconds), at
        most ``timeout_s``: the job submitted again must not share the sites' state folders with it. True once
        ended (a restarted server never ran it: at once)."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            info = self._ask(lambda session: session.get_system_info())
            if info is not None and job_id not in {j.job_id for j in info.job_info}:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(every_s)

    def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._session.close()
        self._session = None


def running_admin_cells() -> set[str]:
    """The names of this process's admin-session cells (connections to a server) that still run."""
    from nvflare.fuel.f3.cellnet.core_cell import CoreCell
    from nvflare.fuel.utils.admin_name_utils import is_valid_admin_client_name

    return {name for name, cell in list(CoreCell.ALL_CELLS.items())
            if getattr(cell, "running", False) and is_valid_admin_client_name(name)}


def stop_admin_cells_since(before: set[str]) -> list[str]:
    """Stop the cells started since ``before`` (:func:`running_admin_cells`) that are still running, and name them.
    A session that NVFlare left open when a call failed keeps reconnecting to its server after the server
    stopped, from a thread that is not a daemon: the submitting process (``fedxr federate``, the test run) would
    never exit."""
    from nvflare.fuel.f3.cellnet.core_cell import CoreCell

    left = sorted(running_admin_cells() - before)
    for name in left:
        with contextlib.suppress(Exception):
            CoreCell.ALL_CELLS[name].stop()
    return left


def stop_job_processes(workspace: Path, job_id: str, grace_s: float = 10.0) -> int:
    """Stop the processes of job ``job_id`` still running under the POC ``workspace`` (a server or site job
    process that outlived its parent), so that they cannot write into the stage's records while the job runs
    again; returns how many there were."""
    import psutil

    from fedxr.federated.deploy import processes_using, terminate

    procs = []
    for proc in processes_using(workspace):
        with contextlib.suppress(psutil.Error):
            if any(job_id in part for part in [*proc.cmdline(), proc.cwd()]):
                procs.append(proc)
    return terminate(procs, grace_s)


def resubmitting_poc_env(**kwargs):
    """NVFlare's ``PocEnv`` whose first ``deploy`` provisions and starts POC as usual, and whose later ones only
    submit the job to the POC system already running (NVFlare's would stop it, wipe its workspace and start a
    fresh one)."""
    from nvflare.recipe import PocEnv

    class ResubmittingPocEnv(PocEnv):
        started = False

        def deploy(self, job) -> str:
            if not self.started:
                job_id = super().deploy(job)
                self.started = True
                return job_id
            return self._get_session_manager().submit_job(job)

    return ResubmittingPocEnv(**kwargs)
