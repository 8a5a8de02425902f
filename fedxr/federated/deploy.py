"""Production startup kits: NVFlare's preflight check, and starting and stopping a participant from its kit.

A hospital runs ``startup/start.sh`` from its own kit; fedxr does not replace that. These helpers are what
``fedxr preflight`` and ``fedxr federate --env prod`` use to check a kit before anything is submitted, and
what the production test uses to run a whole federation (server, hospitals, admin) on one machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedxr.errors import FedxrError

#: How long one preflight check may take (the server check starts a dry run of the server).
PREFLIGHT_TIMEOUT_S = 180


#: The file that makes a folder an NVFlare admin startup kit (provisioning writes it into each admin's kit).
ADMIN_CONFIG = Path("startup") / "fed_admin.json"


def admin_username(kit: str | Path) -> str:
    """The user an admin kit logs in as: the name provisioning wrote into ``startup/fed_admin.json`` (the CN of
    the kit's certificate; NVFlare refuses any other), else the kit folder's name, which provisioning
    makes the same."""
    kit = Path(kit)
    try:
        return json.loads((kit / "startup" / "fed_admin.json").read_text())["admin"]["username"] or kit.name
    except (OSError, ValueError, KeyError, TypeError):
        return kit.name


def nvflare_cli() -> str:
    """The ``nvflare`` command installed beside this interpreter (a venv need not be activated)."""
    beside = Path(sys.executable).parent / "nvflare"
    return str(beside) if beside.is_file() else "nvflare"


@dataclass
class Preflight:
    """The outcome of ``nvflare preflight-check`` on one startup kit."""

    kit: Path
    ok: bool
    problems: list[str]
    output: str

    def summary(self) -> str:
        if self.ok:
            return f"{self.kit}: preflight passed"
        return f"{self.kit}: preflight FAILED\n" + "\n".join(f"  - {p}" for p in self.problems)


def _problems(output: str) -> list[str]:
    """The rows of NVFlare's result table that did not pass, as 'check: problem (fix)'."""
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("Check") and cells[1] not in ("PASSED", "Problems"):
            rows.append(f"{cells[0]}: {cells[1]}" + (f" ({cells[2]})" if cells[2] not in ("", "N/A") else ""))
    return rows


def preflight(kit: str | Path, timeout_s: int = PREFLIGHT_TIMEOUT_S) -> Preflight:
    """Run ``nvflare preflight-check -p KIT``: the server kit checks its ports and storage and dry-runs the
    server; a hospital's or the admin's kit checks that the server answers over mutual TLS."""
    kit = Path(kit)
    if not (kit / "startup").is_dir():
        raise FedxrError(f"{kit}: not an NVFlare startup kit (no startup/ folder); pass a participant's folder from "
                         "provisioning, e.g. workspace/PROJECT/prod_00/hospital-a")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Its own session, so that on a timeout the dry run it started (a server, a client) goes too.
    proc = subprocess.Popen([nvflare_cli(), "preflight-check", "-p", str(kit)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.communicate()
        stop_processes(kit, grace_s=2)
        return Preflight(kit, False, [f"nvflare preflight-check did not finish within {timeout_s} s"], "")
    overall = re.search(r"^overall:\s*(\w+)", output, re.MULTILINE)
    ok = proc.returncode == 0 and (overall is None or overall.group(1) == "pass")
    problems = _problems(output) or ([] if ok else [output.strip().splitlines()[-1] if output.strip() else
                                                   f"exit status {proc.returncode}"])
    return Preflight(kit, ok, problems, output)


def processes_using(path: Path, programs: tuple[str, ...] = ()) -> list:
    """Processes whose command line or working folder lies under ``path`` (what POC mode started); with
    ``programs``, only those with an argument that starts with one of them (not a user's shell or log viewer)."""
    import psutil

    key = str(path.resolve())
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            tokens = [t for arg in (proc.info["cmdline"] or []) for t in arg.split("=")] + [proc.info["cwd"] or ""]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        # A program is named by an argument that starts with it (`-m nvflare.…`, `…/fedxr_client.py` by its file
        # name), not by a path that merely passes through a folder of that name.
        if programs and not any(Path(arg).name.startswith(programs) for arg in proc.info["cmdline"] or []):
            continue
        # Whole path components: a kit named site-1 is not site-10, runs/x/poc is not runs/x/poc_result.
        if proc.pid != os.getpid() and any(t == key or (key + os.sep) in t for t in tokens):
            found.append(proc)
    return found


def stop_processes(path: Path, grace_s: float = 10.0, programs: tuple[str, ...] = ()) -> int:
    """Terminate (then kill) every process still running from ``path`` (``programs``: see
    :func:`processes_using`); returns how many there were."""
    return terminate(processes_using(path, programs), grace_s)


def terminate(procs: list, grace_s: float = 10.0) -> int:
    """Terminate ``procs`` (psutil processes), kill those still there after ``grace_s``; returns how many."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)  # gone before the caller touches what they were writing
    return len(procs)


def start_participant(kit: str | Path, env: dict[str, str] | None = None, log: str | Path | None = None) -> subprocess.Popen:
    """Start a server or hospital the way its operator does: ``startup/start.sh`` from the kit, with ``env``
    added (a hospital's ``FEDXR_SITE_MANIFEST``) and this interpreter's folder first on PATH (the kit's
    scripts call ``python3``). The script starts NVFlare's restart loop in the background and returns."""
    kit = Path(kit).resolve()
    script = kit / "startup" / "start.sh"
    if not script.is_file():
        raise FedxrError(f"{kit}: no startup/start.sh; pass a server's or hospital's kit from provisioning")
    full_env = {**os.environ, **(env or {}),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = open(log, "ab") if log else None  # noqa: SIM115 - the child keeps writing to it
    try:
        return subprocess.Popen(["bash", str(script)], cwd=kit, env=full_env,
                                stdout=out if out is not None else subprocess.DEVNULL, stderr=subprocess.STDOUT)
    finally:
        if out is not None:
            out.close()


def stop_participant(kit: str | Path, grace_s: float = 10.0) -> int:
    """Stop everything started from a kit (NVFlare's restart loop first, so nothing comes back); returns how
    many processes there were."""
    kit = Path(kit).resolve()
    (kit / "shutdown.fl").touch()  # tells the kit's restart loop not to start the participant again
    return stop_processes(kit, grace_s=grace_s)
