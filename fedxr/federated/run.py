"""`fedxr federate`: run the federated job in the simulator, in POC mode or in production, or export it."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, overload

from fedxr.artifacts import ExportedJob, FederateSummary
from fedxr.config import Recipe
from fedxr.data.atomic import write_json_atomic
from fedxr.data.manifest import site_manifest_paths
from fedxr.energy import tracked
from fedxr.data.prepare import require_sites
from fedxr.errors import FedxrError
from fedxr.federated import outputs
from fedxr.federated.deploy import ADMIN_CONFIG, admin_username, preflight, stop_processes
from fedxr.records import read_records, start_records
from fedxr.federated.job import ResumeSettings, build_job, job_deadline_s, job_name, recipe_blob_is_not_a_secret
from fedxr.federated.fedbn import SUMMARY_FILE as FEDBN_SUMMARY
from fedxr.federated.resume import (RESUME_DIR, finished, job_digest, mark_done, next_round, prune_from, read_point,
                                    resumable)
from fedxr.federated.resume import discard as discard_resume
from fedxr.records import keep_rounds_before
from fedxr.federated.site import SITES_DIR_ENV


#: NVFlare's workspaces in a stage folder: the simulator's, and POC mode's.
SIM_WORKSPACE, POC_WORKSPACE = "nvflare", "poc"


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _site_names(sites_dir: Path, recipe: Recipe) -> list[str]:
    names = list(site_manifest_paths(sites_dir))
    if recipe.federated.min_clients > len(names):
        raise FedxrError(f"federated.min_clients ({recipe.federated.min_clients}) is more than the {len(names)} sites in {sites_dir}")
    return names


def _run_sim(job, recipe: Recipe, folder: Path, names: list[str], stage: str) -> Path:
    from nvflare.recipe import SimEnv

    workspace = folder / SIM_WORKSPACE
    shutil.rmtree(workspace / job_name(recipe, stage), ignore_errors=True)
    env = SimEnv(clients=names, num_threads=len(names), workspace_root=str(workspace))
    try:
        with recipe_blob_is_not_a_secret():
            result = job.run(env).get_result()
    except RuntimeError as exc:
        _check_quorum(workspace / job_name(recipe, stage))  # the clearer reason, when it is that
        raise FedxrError(f"the federated simulation failed: {exc}") from None
    return Path(result) / "server" / "simulate_job"


def _run_poc(job, recipe: Recipe, folder: Path, names: list[str], sites_dir: Path,
             resubmission: Callable[[], Any] | None = None) -> tuple[Path, Path]:
    """Provision a POC project (mutual TLS) into the run folder, start server and sites on localhost,
    submit, wait, keep the result, and stop every process it started — on failure and Ctrl-C too.

    While it waits it watches the job (:mod:`fedxr.federated.watch`): a job that a restarted server or site lost
    is submitted again, as ``resubmission()`` builds it (resuming from the last completed round)."""
    from fedxr.federated import watch

    workspace = (folder / POC_WORKSPACE).resolve()
    stop_processes(workspace)
    shutil.rmtree(workspace, ignore_errors=True)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    results = folder / "poc_result"
    shutil.rmtree(results, ignore_errors=True)
    # Each POC site reads its own <site>.csv from this folder (a site fact given through the environment).
    with _env(NVFLARE_POC_WORKSPACE=str(workspace), **{SITES_DIR_ENV: str(sites_dir.resolve())}):
        env = watch.resubmitting_poc_env(num_clients=len(names), clients=names, use_he=recipe.privacy.he)
        require_every_site(job, names)
        cells_before = watch.running_admin_cells()
        try:
            with recipe_blob_is_not_a_secret():
                run = job.run(env)

            def submit_again():
                assert resubmission is not None  # a loss is watched for only when there is one
                again = resubmission()
                require_every_site(again, names)
                with recipe_blob_is_not_a_secret():
                    return again.run(env)

            run, result, status = _wait_resubmitting(
                run, recipe, watch.JobWatch(watch.admin_kit(workspace, env.username), names),
                submit_again if resubmission is not None else None, f"{folder.name}: POC", workspace,
                on_lost=lambda job_id: watch.stop_job_processes(workspace, job_id))
            if not result or not Path(result).exists():
                _check_quorum(workspace)
                raise FedxrError(f"POC job {run.get_job_id()} did not finish (status {status}); logs: {workspace}")
            shutil.copytree(result, results)
        finally:
            try:
                with contextlib.suppress(Exception):
                    env.stop(clean_up=False)
                stop_processes(workspace)
            finally:  # even on a second Ctrl-C: a session left running would keep this process from exiting
                watch.stop_admin_cells_since(cells_before)
    server = next((p.parent for p in results.rglob("FL_global_model.pt")), None)
    if server is None:
        raise FedxrError(f"POC result {results} holds no global model; logs: {workspace}")
    return server.parent, workspace


def _wait_resubmitting(run, recipe: Recipe, watcher, submit_again: Callable[[], Any] | None, label: str, logs: Path,
                       on_lost: Callable[[str], Any] | None = None) -> tuple[Any, str | None, str | None]:
    """Wait for ``run`` (an NVFlare run) to end; each time ``watcher`` (:class:`fedxr.federated.watch.JobWatch`)
    finds its job lost, abort what is left of it, ``on_lost(job_id)`` (stop its leftover processes where they can be
    reached), wait for its sites to be back and ``submit_again()`` (a new run, resuming from the last completed
    round), at most ``MAX_RESUBMISSIONS`` times. Without ``submit_again`` (a federation that cannot resume) only a
    restarted server counts as a loss, and it fails the stage at once instead of waiting out its deadline.
    Returns (the last run, its result folder or None, its status)."""
    from fedxr.federated import watch

    for resubmitted in range(watch.MAX_RESUBMISSIONS + 1):
        try:
            result, status, why = _wait_for_result(run, job_deadline_s(recipe), watcher,
                                                   server_only=submit_again is None)
        finally:
            watcher.close()
        if why is None:
            return run, result, status
        job_id = run.get_job_id()
        watcher.abort(job_id)  # whatever is left of it, also when fedxr gives up
        if submit_again is None:
            watcher.close()
            raise FedxrError(f"{label} job {job_id} was lost ({why}); this federation cannot resume "
                             f"({resumable(recipe)}): run the stage again; logs: {logs}")
        if resubmitted == watch.MAX_RESUBMISSIONS:
            watcher.close()
            raise FedxrError(f"{label} job {job_id} was lost ({why}) after {resubmitted} resubmissions; "
                             f"fedxr gives up: see the logs under {logs}")
        print(f"{label} job {job_id} was lost ({why}); submitting it again from its last completed round", flush=True)
        if on_lost is not None:
            on_lost(job_id)
        wait_s = recipe.federated.timeout_s
        if not watcher.wait_ended(job_id, wait_s):
            watcher.abort(job_id)
            watcher.close()
            raise FedxrError(f"{label} job {job_id} was lost ({why}) and still runs on the server {wait_s} s after it "
                             "was aborted: fedxr does not submit it again beside it (both would write the same resume "
                             f"state); abort it from an admin console and run the stage again; logs: {logs}")
        if missing := watcher.wait_for_sites(job_id, wait_s):
            print(f"{label}: site(s) {', '.join(missing)} did not reconnect within {wait_s} s; submitting again "
                  "anyway", flush=True)
        watcher.close()
        run = submit_again()
    raise AssertionError("unreachable")


def require_every_site(job, names: list[str]) -> None:
    """Make every POC site mandatory for the job (through the recipe's private ``_job.job``). All POC sites run
    on this machine: without this NVFlare schedules the job once min_clients sites have connected and leaves a
    site that connects a moment later out of the whole run."""
    job._job.job.mandatory_clients = list(names)


def _wait_for_result(run, deadline_s: float, watcher, server_only: bool = False, every_s: float | None = None
                     ) -> tuple[str | None, str | None, str | None]:
    """(the job's result folder, its status, None) once it ends or ``deadline_s`` passes; or (None, status, why) as
    soon as ``watcher.lost`` (:class:`fedxr.federated.watch.JobWatch`; ``server_only``: a restarted server only)
    finds the job lost (the job can no longer finish). The status is asked every few seconds:
    NVFlare's own wait gives up at the first failed admin connection, which a server busy receiving large
    updates (HE ciphertexts) or restarting can cause while the job runs on."""
    from fedxr.federated.watch import UNFINISHED, WATCH_EVERY_S

    job_id = run.get_job_id()
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        status = watcher.status(job_id)  # None: the server could not be asked; ask again
        if status is not None and not status.startswith(UNFINISHED):
            break
        why = watcher.lost(job_id, server_only) if status is not None else None
        if why is not None:
            return None, status, why
        time.sleep(every_s or WATCH_EVERY_S)
    # NVFlare's own call, which downloads the result (and stops the POC environment the first time it is called).
    return run.get_result(timeout=1.0, clean_up=False), run.get_status(), None




def check_admin_kit(startup_kit: str | Path | None) -> Path:
    """The admin startup kit folder, or a FedxrError that says what to pass — before anything is submitted."""
    if not startup_kit:
        raise FedxrError("--env prod needs --startup-kit DIR (the admin's startup kit from provisioning)")
    kit = Path(startup_kit)
    if (kit / ADMIN_CONFIG).is_file():
        return kit
    found = sorted(str(p.parent.parent) for p in kit.glob(f"**/{ADMIN_CONFIG}")) if kit.is_dir() else []
    hint = (f"; the admin kit(s) under it: {', '.join(found)}" if found else
            "; provision the project (`nvflare provision -p deploy/project.yml`) and pass the admin's folder "
            "(e.g. workspace/fedxr/prod_00/admin@hospital.org)")
    raise FedxrError(f"--startup-kit {kit}: not an NVFlare admin startup kit (no {ADMIN_CONFIG}){hint}")


def _submit_prod(job, startup_kit: Path):
    from nvflare.recipe import ProdEnv

    try:
        with recipe_blob_is_not_a_secret():
            return job.run(ProdEnv(startup_kit_location=str(startup_kit), username=admin_username(startup_kit)))
    except RuntimeError as exc:  # NVFlare reports a failed login or submission this way
        # NVFlare's own check of the kit then says why (server down, certificates, names). Only now: its
        # console check ends every admin console running from the same kit.
        check = preflight(startup_kit)
        raise FedxrError(f"could not submit the job with the startup kit {startup_kit}: {exc}\n{check.summary()}") from None


def _run_prod(job, recipe: Recipe, startup_kit: Path, resubmission: Callable[[], Any] | None = None
              ) -> tuple[Path, Path]:
    """Submit to a running production federation with the admin's kit; wait; return the result's server run.

    While it waits it watches the job as POC does (:mod:`fedxr.federated.watch`): a job that a restarted server or
    site lost is submitted again, as ``resubmission()`` builds it; the server then resumes it from its own resume
    point (the submitter cannot read the server's disk)."""
    from fedxr.federated import watch

    cells_before = watch.running_admin_cells()
    try:
        run = _submit_prod(job, startup_kit)
        run, result, status = _wait_resubmitting(
            run, recipe, watch.JobWatch(startup_kit, None),
            (lambda: _submit_prod(resubmission(), startup_kit)) if resubmission is not None else None,
            "production", startup_kit)
    finally:  # a session NVFlare left open after a failed call would keep this process from exiting
        watch.stop_admin_cells_since(cells_before)
    if not result:
        raise FedxrError(f"production job {run.get_job_id()} did not finish (status {status})")
    _check_quorum(Path(result))
    model = next(Path(result).rglob("FL_global_model.pt"), None)
    if model is None:
        raise FedxrError(f"production job {run.get_job_id()}: its result {result} holds no global model; see the "
                         "server's log in that folder")
    return model.parent.parent, Path(result)


def _check_quorum(workspace: Path) -> None:
    """A round that fewer than min_clients sites answered stops the federation on the server
    (fedxr.federated.controller); the job may still end with an earlier round's model, so say so here."""
    from fedxr.federated.controller import QUORUM_LOST

    from fedxr.privacy.dp import BudgetExceeded

    logs = sorted(Path(workspace).rglob("log.txt"))
    for log in logs:
        for line in log.read_text(errors="ignore").splitlines():
            if QUORUM_LOST in line and "round " in line:
                reason = line[line.index("round "):]
                # A site that stopped because its privacy budget is spent says so in its own log: name it here.
                marker = f"{BudgetExceeded.__name__}: "
                spent = sorted({ln[ln.index(marker) + len(marker):] for other in logs
                                for ln in other.read_text(errors="ignore").splitlines() if marker in ln})
                why = "; ".join(spent)
                raise FedxrError(f"the federation stopped: {reason} (server log: {log})" + (f". {why}" if why else ""))


def _check_sites_trained(records: Path, recipe: Recipe, workspace: Path) -> None:
    """Resilient aggregation leaves failed sites out; if every site failed in some round, the "global
    model" is not a trained model, so the run fails here, pointing at the site logs."""
    done = {r["round"] for r in read_records(records) if isinstance(r.get("round"), int)}
    missing = [r for r in range(recipe.federated.rounds) if r not in done]
    if missing:
        raise FedxrError(
            f"no site completed round(s) {', '.join(map(str, missing))} of the federated run; the sites' errors "
            f"are in their logs under {workspace} (e.g. site-1/log.txt)")


def _initial_model(recipe: Recipe, path: Path) -> Path:
    """The round-0 model file for ``model.init_from``: the recipe's model built as the server builds it,
    with the checkpoint's weights (NVFlare bundles the file into the job)."""
    import torch

    from fedxr.federated.job import model_config
    from fedxr.models.classifier import XRayClassifier, load_initial_weights

    assert recipe.model.init_from, "called for a recipe with model.init_from"
    module = load_initial_weights(XRayClassifier(**model_config(recipe)["args"]), recipe.model.init_from)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return path


@overload
def federate(recipe: Recipe, env: str = ..., startup_kit: str | Path | None = ..., export_job: None = ...,
             extra_args: str = ..., recipe_path: str | None = ..., stage: str = ..., source: str = ...,
             **job_options: Any) -> FederateSummary: ...


@overload
def federate(recipe: Recipe, env: str = ..., startup_kit: str | Path | None = ..., *, export_job: str | Path,
             extra_args: str = ..., recipe_path: str | None = ..., stage: str = ..., source: str = ...,
             **job_options: Any) -> ExportedJob: ...


def federate(recipe: Recipe, env: str = "sim", startup_kit: str | Path | None = None,
             export_job: str | Path | None = None, extra_args: str = "", recipe_path: str | None = None,
             stage: str = "federate", source: str = "federate", restart: bool = False,
             **job_options) -> FederateSummary | ExportedJob:
    """Build the NVFlare job from the recipe and run (or export) it; returns the outputs summary.

    ``stage`` names the run sub-folder and the job (the teacher is ``federate``; other users of the
    engine, such as distillation, run their own); ``source`` is recorded in the checkpoints;
    ``job_options`` go to :func:`build_job` (the model description, initial weights, exclusions).
    In simulation and POC a run of the same job that was interrupted is resumed from its last completed round
    (:mod:`fedxr.federated.resume`); ``restart`` throws that away and starts from round 0.
    """
    folder = recipe.layout.stage(stage)
    records = folder / "records"
    if recipe.model.init_from and "model" not in job_options and "initial_ckpt" not in job_options:
        job_options["initial_ckpt"] = _initial_model(recipe, folder / "initial_model.pt")
    job_options = dict(extra_args=extra_args, stage=stage, **job_options)
    if env not in ("sim", "poc") or export_job:
        discard_resume(folder / RESUME_DIR, [])  # this stage's outputs are being replaced: no finished-job marker
    if export_job:
        # Submitted by hand later: after a server restart, the same job submitted again resumes from the server's
        # last point (unless its rounds had all finished: then it trains anew).
        job = build_job(recipe, folder, "prod", resume=_prod_resume_settings(recipe, folder, stage, restart, extra_args,
                                                                             job_options), **job_options)
        with recipe_blob_is_not_a_secret():
            job.export(str(export_job))
        return ExportedJob(exported=str(Path(export_job) / job_name(recipe, stage)))
    if env in ("sim", "poc"):
        sites_dir = require_sites(recipe, recipe_path)
        names = _site_names(sites_dir, recipe)
        from fedxr.privacy.dp import delta_problems

        if problems := delta_problems(recipe, sites_dir):
            raise FedxrError("; ".join(problems))
    elif env == "prod":
        admin_kit = check_admin_kit(startup_kit)
    resume = None
    if env in ("sim", "poc"):
        # An interrupted run's simulator or POC processes live on when `fedxr run` is killed outright (NVFlare
        # starts them in sessions of their own) and would go on writing this stage's records and resume point.
        if stopped := (stop_processes(folder / SIM_WORKSPACE, programs=("nvflare.", "fedxr")) if env == "sim" else
                       stop_processes(folder / POC_WORKSPACE)):  # POC: every process there is fedxr's
            print(f"{folder.name}: stopped {stopped} process(es) an interrupted run left behind", flush=True)
        resume, done = _prepare_resume(recipe, folder, records, sites_dir, names, restart, extra_args, job_options,
                                       env)
        if done is not None:
            return done
    else:
        _start_records(records, None)
    t0 = time.perf_counter()
    # On one machine the tracker (machine mode) covers the server and every site process.
    energy = tracked(folder, stage, recipe.energy_country if env in ("sim", "poc") else None)
    collected: Path | None = records  # the sites' round records (None: in production they stay at the sites)
    if env == "sim":
        job = build_job(recipe, folder, "sim", sites_dir=sites_dir, records=records, **job_options)
        with energy:
            server_dir = _run_sim(job, recipe, folder, names, stage)
        workspace = server_dir.parent.parent
    elif env == "poc":
        job = build_job(recipe, folder, "poc", records=records, **job_options)

        def resubmission():
            """The job again, resuming from the round its lost run completed last (NVFlare keeps no job across
            a coordinator's restart: fedxr.federated.watch)."""
            nonlocal resume
            again = dict(job_options)
            resume, _ = _prepare_resume(recipe, folder, records, sites_dir, names, False, extra_args, again, env)
            return build_job(recipe, folder, "poc", records=records, **again)

        with energy:
            # A stage that cannot resume (DP, HE: fedxr.federated.resume.resumable) is not submitted again: it would
            # start from round 0 (DP spending its budget twice). A restarted server fails it at once, with the reason.
            server_dir, workspace = _run_poc(job, recipe, folder, names, sites_dir,
                                             resubmission if resume is not None else None)
    elif env == "prod":
        prod_resume = _prod_resume_settings(recipe, folder, stage, restart, extra_args, job_options)
        job = build_job(recipe, folder, "prod", resume=prod_resume, **job_options)

        def prod_resubmission():
            """The job again after a loss; its server resumes it from its own last point."""
            assert prod_resume is not None
            return build_job(recipe, folder, "prod", resume=replace(prod_resume, resubmitted=True), **job_options)

        server_dir, workspace = _run_prod(job, recipe, admin_kit, prod_resubmission if prod_resume else None)
        collected = None
    else:
        raise FedxrError(f"unknown --env {env!r}; use sim, poc or prod")
    _check_quorum(workspace)
    if collected is not None:
        _check_sites_trained(collected, recipe, workspace)
    summary = outputs.collect(recipe, server_dir, folder, collected, workspace, source=source, env=env)
    if recipe.federated.fedbn:
        _fedbn_outputs(recipe, collected, summary, recipe.layout.fedbn_sites(stage))
    else:
        shutil.rmtree(recipe.layout.fedbn_sites(stage), ignore_errors=True)  # an earlier FedBN run's site models
    resumed_from = (resume.start_round or None) if resume is not None else _resumed_on_server(workspace) if env == "prod" else None
    summary = replace(summary, wall_s=round(time.perf_counter() - t0, 1), resumed_from=resumed_from)
    write_json_atomic(folder / FederateSummary.FILE, summary.to_json())
    if resume is not None:  # the stage finished: its resume state (a site's optimizer among it) is not needed
        discard_resume(resume.folder, [records / n for n in names])
        mark_done(resume.folder, resume.digest, folder / FederateSummary.FILE)
    return summary


def _prod_resume_settings(recipe: Recipe, folder: Path, stage: str, restart: bool, extra_args: str,
                          job_options: dict) -> ResumeSettings | None:
    """Production: the server keeps the resume point under its own workspace root and chooses the start round when
    the job starts (fedxr.federated.controller); the job's digest cannot cover the sites' data (the submitter does
    not see it). ``restart`` (``--restart-stage``) gives the job a digest of its own, so nothing kept is resumed."""
    import uuid

    from fedxr.federated.job import SERVER_RESUME_DIR, model_config

    why_not = resumable(recipe)
    if why_not:
        print(f"{folder.name}: this federation cannot be resumed if it is interrupted ({why_not})", flush=True)
        return None
    inputs = [p for p in (job_options.get("initial_ckpt"),) if p]
    digest = job_digest(recipe.to_yaml(), job_options.get("model") or model_config(recipe), None, inputs,
                        extra=f"{job_options.get('exclude_vars')}|{extra_args}|prod" + (f"|{uuid.uuid4()}" if restart else ""))
    return ResumeSettings(Path(SERVER_RESUME_DIR) / job_name(recipe, stage), digest, on_server=True)


def _resumed_on_server(result: Path) -> int | None:
    """The round a production server resumed its job at, from the job's server log in its downloaded result."""
    import re

    from fedxr.federated.controller import RESUMING

    for log in sorted(Path(result).rglob("log.txt")):
        if found := re.search(rf"{RESUMING} (\d+) of", log.read_text(errors="ignore")):
            return int(found.group(1))
    return None


def _start_records(records: Path, resume: ResumeSettings | None) -> None:
    """The stage's records folder for a run from round 0 (emptied) or resumed (kept as cut back)."""
    if resume is None or not resume.start_round:
        shutil.rmtree(records, ignore_errors=True)
    start_records(records)


def _prepare_resume(recipe: Recipe, folder: Path, records: Path, sites_dir: Path, names: list[str], restart: bool,
                    extra_args: str, job_options: dict, env: str
                    ) -> tuple[ResumeSettings | None, FederateSummary | None]:
    """:func:`_resume_settings`, then the stage's folders and ``job_options`` made ready for that start: the
    resume point, the sites' states and the round records cut back to the starting round (or emptied)."""
    resume, done = _resume_settings(recipe, folder, records, sites_dir, names, restart, extra_args, job_options, env)
    if done is not None:
        return None, done
    job_options["extra_args"] = extra_args
    if resume is not None and resume.start_round:
        prune_from(resume.folder, [records / n for n in names], resume.start_round)
        job_options["extra_args"] = " ".join(filter(None, [extra_args, f"--resume-round {resume.start_round}"]))
        keep_rounds_before(records, resume.start_round)
    job_options["resume"] = resume
    _start_records(records, resume)
    return resume, None


def _finished_summary(point: Path, digest: str, fedbn_summary: Path | None) -> FederateSummary | None:
    """The outputs of a finished run of this very job (the distillation stage's students done before it was
    interrupted, a `fedxr federate` run twice), when they are all still there."""
    from fedxr.artifacts import ArtifactError

    path = finished(point, digest)
    if path is None:
        return None
    try:
        summary = FederateSummary.read(path)
    except ArtifactError:
        return None
    outputs = [summary.checkpoint, *summary.checkpoints.values(), summary.rounds, summary.cross_site, summary.outgoing,
               summary.privacy, fedbn_summary]
    if not all(Path(p).is_file() for p in outputs if p):
        return None
    print(f"{path.parent.name}: this job already finished (same recipe, model and data): its outputs are kept; "
          "--restart-stage trains it again", flush=True)
    return summary


def _resume_settings(recipe: Recipe, folder: Path, records: Path, sites_dir: Path, names: list[str], restart: bool,
                     extra_args: str, job_options: dict, env: str = "sim"
                     ) -> tuple[ResumeSettings | None, FederateSummary | None]:
    """Whether this run resumes an interrupted one of the same job (and from which round), said on the console
    (None: the job cannot resume at all); and the summary of a finished run of this same job, which is then kept."""
    from fedxr.federated.job import model_config

    works = [records / n for n in names]
    point = folder / RESUME_DIR
    why_not = resumable(recipe)
    if why_not:
        print(f"{folder.name}: this federation cannot be resumed if it is interrupted ({why_not})", flush=True)
        discard_resume(point, works)
        return None, None
    inputs = [p for p in (job_options.get("initial_ckpt"),) if p] + [
        Path(word) for word in extra_args.split() if word.startswith("/") and Path(word).exists()]
    digest = job_digest(recipe.to_yaml(), job_options.get("model") or model_config(recipe), sites_dir, inputs,
                        extra=f"{job_options.get('exclude_vars')}|{extra_args}|{env}")
    fedbn_summary = recipe.layout.fedbn_sites(folder.name) / FEDBN_SUMMARY if recipe.federated.fedbn else None
    if not restart and (done := _finished_summary(point, digest, fedbn_summary)) is not None:
        return None, done
    start, why = (0, "--restart-stage") if restart else next_round(point, digest, recipe.federated.rounds, works)
    if start:
        print(f"{folder.name}: resuming from round {start} of {recipe.federated.rounds} ({why}; "
              "--restart-stage starts it from round 0)", flush=True)
    else:
        if read_point(point) is not None:
            print(f"{folder.name}: starting from round 0 ({why})", flush=True)
        discard_resume(point, works)  # and any site state of an earlier run: this one keeps its own
    return ResumeSettings(point.resolve(), digest, start), None


def _fedbn_outputs(recipe: Recipe, records: Path | None, summary: FederateSummary, folder: Path) -> None:
    """FedBN: the sites' own models beside the run, and pooled BatchNorm in the global checkpoints — or, in
    production (the site models stay at the sites), a warning that the global model has no BatchNorm of its own."""
    from fedxr.federated import fedbn

    gathered = fedbn.gather(recipe, records, summary.checkpoints, folder) if records else {}
    if gathered:
        print(f"FedBN: each site's own model (best on its own validation) in {folder}; the global "
              "checkpoints carry BatchNorm pooled from them", flush=True)
    else:
        fedbn.mark_untrained(summary.checkpoints)
        print("FedBN: the global model holds untrained BatchNorm (each site kept its own): score and deploy each "
              f"site's model, kept at the site as {fedbn.PERSONAL_FILE} in its run folder", flush=True)


def format_summary(summary: FederateSummary | ExportedJob, recipe: Recipe) -> str:
    """What a user wants to see after a federated run: the round table and where everything is."""
    if isinstance(summary, ExportedJob):
        return (f"wrote the NVFlare job to {summary.exported}/\n"
                f"submit it from an admin console: nvflare job submit -j {summary.exported}  "
                "(or: fedxr federate RECIPE --env prod --startup-kit ADMIN_KIT)")
    import json

    lines = [f"federated run ({summary.env}) finished in {summary.wall_s} s"]
    if summary.rounds:
        for r in json.loads(Path(summary.rounds).read_text()):
            sites = ", ".join(f"{s} {v['val_auroc']:.3f}" for s, v in sorted(r["sites"].items()) if v.get("val_auroc") is not None)
            agg = f"  aggregate {r['aggregate_val_auroc']:.3f}" if r.get("aggregate_val_auroc") is not None else ""
            wall = f"  ({r['wall_s']:.1f} s)" if "wall_s" in r else ""
            lines.append(f"  round {r['round']!s:>5}: {sites}{agg}{wall}")
    for name, path in summary.checkpoints.items():
        lines.append(f"  {name:<12} {path}")
    for key, value in (("rounds", summary.rounds), ("cross_site", summary.cross_site),
                       ("tensorboard", summary.tensorboard), ("workspace", summary.workspace)):
        if value:
            lines.append(f"  {key:<12} {value}")
    lines.append(f"next: fedxr evaluate {summary.checkpoint} --data {recipe.layout.sites} --split test")
    return "\n".join(lines)
