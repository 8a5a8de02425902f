"""Recipe → NVFlare job, and running it in the simulator, in POC mode or in production.

fedxr builds the job with NVFlare's Job Recipe API (FedAvg / FedProx / SCAFFOLD / FedOpt recipes),
adds server-side TensorBoard tracking and cross-site evaluation (which also scores the last and the
best global model on every site; without it, a final global evaluation does that), ships the resolved
recipe with the job, and leaves aggregation, transport and process management to NVFlare.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedxr.config import Recipe
from fedxr.errors import FedxrError
from fedxr.federated.codec import encode_json, encode_recipe
from fedxr.devices import runs_ddp, site_processes
from fedxr.federated.ranks import launch_command
from fedxr.records import OUTGOING
from fedxr.labels import KEY_METRIC

RECIPE_FILE = "fedxr_recipe.yaml"
CLASSIFIER_CLASS = "fedxr.models.classifier.XRayClassifier"
#: The NVFlare client script; found by path (the job ships the file; it is not imported here).
CLIENT_SCRIPT = Path(__file__).with_name("client.py")


@contextlib.contextmanager
def recipe_blob_is_not_a_secret():
    """NVFlare scans job parameters for high-entropy strings and warns that they may be secrets; the
    only such strings fedxr puts there are the compressed recipe and model description (no secrets:
    settings and a class path), so that warning is silenced here."""
    from nvflare.recipe.secrets import PotentialSecretWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=PotentialSecretWarning)
        yield


def standalone_script(source: Path) -> Path:
    """A copy of a client script outside every ``sys.path`` entry.

    NVFlare places a job's script in the app's ``custom/`` folder at its path relative to the longest
    ``sys.path`` entry that holds it, but launches it as ``custom/<file name>``; when the script sits
    below a ``sys.path`` entry (the project folder under ``python -m`` or pytest, the temp folder
    when a script there is run) the two disagree. The copy's own folder is put on ``sys.path``, so
    it is always the longest match and the script lands at ``custom/<file name>``.
    """
    text = source.read_bytes()
    folder = Path(tempfile.gettempdir()) / "fedxr-job-scripts" / hashlib.sha256(text).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"fedxr_{source.name}"
    if not target.is_file():
        target.write_bytes(text)
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    return target


def job_name(recipe: Recipe, stage: str = "federate") -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"fedxr-{recipe.output.name}-{stage}")


def model_config(recipe: Recipe) -> dict:
    """The recipe's model as a class-path description: NVFlare builds the server's round-0 model from it,
    and every site's client script builds its LightningModule from the same description."""
    return {"class_path": CLASSIFIER_CLASS,
            "args": {"model_name": recipe.model.name, "preprocessing": recipe.preprocessing.as_dict(),
                     "init_seed": recipe.model.seed, **({"norm": recipe.norm} if recipe.norm != "batch" else {})}}


def job_deadline_s(recipe: Recipe) -> int:
    """How long fedxr waits for a POC or production job: the per-site timeout for every round, plus two
    for start-up and the final evaluation."""
    return recipe.federated.timeout_s * (recipe.federated.rounds + 2)


def batchnorm_exclude_pattern(recipe: Recipe) -> str:
    """Regex of every BatchNorm parameter and statistic (FedBN keeps them local to each site)."""
    from fedxr.federated.fedbn import batchnorm_of
    from fedxr.models.classifier import XRayClassifier

    names = list(batchnorm_of(XRayClassifier(recipe.model.name)))
    if not names:
        raise FedxrError(f"federated.fedbn: model {recipe.model.name!r} has no BatchNorm layers to keep local")
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


#: How soon a site asks for its next task in the simulator and POC (seconds; NVFlare's default is 2).
LOCAL_TASK_REQUEST_INTERVAL_S = 0.5


@dataclass(frozen=True)
class ResumeSettings:
    """Where the server keeps its resume point, the job's digest, and the round this run starts at (0: a fresh
    start that keeps points; see fedxr.federated.resume).

    ``on_server`` (production): ``folder`` is relative to the server's workspace root and the server chooses the
    start round itself when the job starts (the submitter cannot read its disk); each site keeps its state under
    its own workspace root (:data:`SITE_STATE_DIR`). ``resubmitted``: the submitter sends the job again after
    losing it, so a point whose rounds all finished is resumed too (to its final evaluation)."""
    folder: Path
    digest: str
    start_round: int = 0
    on_server: bool = False
    resubmitted: bool = False


#: Production: where the server keeps a job's resume point, and each site its state after every round, relative to
#: the participant's workspace root (its startup kit folder, which a restart keeps), per job name.
SERVER_RESUME_DIR, SITE_STATE_DIR = "fedxr_resume", "fedxr_state"


def build_job(recipe: Recipe, folder: Path, env: str, sites_dir: Path | None = None,
              records: Path | None = None, train_script: Path | None = None, extra_args: str = "",
              stage: str = "federate", model: dict | None = None, exclude_vars: str | None = None,
              initial_ckpt: Path | None = None, resume: ResumeSettings | None = None):
    """An NVFlare recipe object for this fedxr recipe. ``folder`` receives the shipped recipe file.

    ``model`` replaces the recipe's model description (server and sites build it), ``initial_ckpt`` (a local file) is bundled
    into the job and loaded by the server as the round-0 weights, ``exclude_vars`` keeps matching
    tensors out of aggregation (they are sent once, in round 0, and then stay at each site), ``resume`` makes the
    server keep a resume point after every round and, with a start round, start from it (FedAvg and FedProx).
    """
    fed = recipe.federated
    model = model or model_config(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECIPE_FILE).write_text(recipe.to_yaml())
    # The resolved recipe travels inside the job's client arguments (compressed, base64), so every site
    # trains with exactly the settings the server was built from, whatever the deployment layout.
    args = [f"--recipe-b64 {encode_recipe(recipe)}", f"--model-b64 {encode_json(model)}"]
    if env == "sim" and sites_dir is not None:
        args.append(f"--sites-dir {Path(sites_dir).resolve()}")
    if env in ("sim", "poc") and records is not None:
        args.append(f"--records {Path(records).resolve()}")
    if resume is not None and resume.on_server:
        args.append(f"--keep-state {SITE_STATE_DIR}/{job_name(recipe, stage)} --job-digest {resume.digest}")
    processes = site_processes(recipe.model.devices)
    if env in ("sim", "poc"):
        # All sites (and each site's DDP workers) share this machine's cores: give each process its share
        # instead of oversubscribing.
        args.append(f"--threads {max(1, (os.cpu_count() or 1) // max(1, recipe.data.sites * processes))}")
    python = sys.executable if env in ("sim", "poc") else "python3"
    common: dict[str, Any] = dict(
        # Each site trains in its own process, so a crashing site is reported as a failed task
        # instead of taking the site's FLARE client (and, through it, the job) down.
        launch_external_process=True,
        command=launch_command(python, processes, ddp=runs_ddp(recipe.model.devices, recipe.model.strategy)),
        name=job_name(recipe, stage), min_clients=fed.min_clients, num_rounds=fed.rounds,
        train_script=str(train_script or standalone_script(CLIENT_SCRIPT)),
        train_args=" ".join(args + ([extra_args] if extra_args else [])),
        model=model,
    )
    if initial_ckpt is not None:
        # A relative path makes NVFlare bundle the file into the server app (it travels with the job
        # to a production server too); an absolute one would have to exist on the server already.
        common["initial_ckpt"] = os.path.relpath(Path(initial_ckpt).resolve())
    if fed.fedbn and fed.algorithm not in ("fedavg", "fedprox"):
        raise FedxrError(f"federated.fedbn works with fedavg or fedprox, not {fed.algorithm}")
    selection = dict(key_metric=KEY_METRIC, key_metric_mode="max")
    exclude = "|".join(f"(?:{p})" for p in (batchnorm_exclude_pattern(recipe) if fed.fedbn else None, exclude_vars) if p)
    if exclude:
        # The global model then lacks the excluded tensors after round 0: sites load it non-strictly
        # and keep their own copies of those tensors.
        common["train_args"] += " --keep-excluded"
    if recipe.privacy.filter != "none":
        # NVFlare's privacy filters act on weight differences: each site sends what it changed, not its weights.
        from nvflare.client.config import TransferType

        common["params_transfer_type"] = TransferType.DIFF
    with recipe_blob_is_not_a_secret():
        job = (_make_he_job(common) if recipe.privacy.he else
               _make_job(fed, common, selection, exclude, recipe.data.sites, resume))
    add_privacy_filters(job, recipe, Path(records) / OUTGOING if records is not None else None)
    if env in ("sim", "poc"):
        # Every participant on this machine: a site that sent its result asks for the next task after 0.5 s,
        # not NVFlare's 2 s (each round, and the final evaluation, waited up to 2 s for nothing: ~5 s of a
        # 2-round toy federation's ~38). Production keeps NVFlare's default for sites across the internet.
        job.add_server_config({"server": {"task_request_interval": LOCAL_TASK_REQUEST_INTERVAL_S}})
    # fedxr is installed at every participant (the server aggregates with it, the sites train with it), so
    # NVFlare must not copy its modules into the job's custom/ folder: a partial copy there (custom/fedxr/
    # federated/aggregator.py, no __init__.py) becomes a namespace package that shadows an editable install.
    job._job.set_app_packages(["fedxr"])
    return job


def add_privacy_filters(job, recipe: Recipe, audit_folder: Path | None) -> None:
    """The sites' outgoing filters, in the order they run: the recipe's privacy filter on training results,
    then the audit of what leaves (last, so it records what actually goes to the server)."""
    from nvflare.apis.dxo import DataKind

    kind = recipe.privacy.filter
    if kind != "none":
        if kind == "percentile":
            from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy

            # Share only the changes above the 10th percentile of |change per step|, each capped at 0.01
            # (Shokri & Shmatikov, CCS '15; NVFlare's defaults).
            flt = PercentilePrivacy(percentile=10, gamma=0.01, data_kinds=[DataKind.WEIGHT_DIFF])
        else:
            from nvflare.app_common.filters.svt_privacy import SVTPrivacy

            # The sparse vector technique with NVFlare's defaults: 10 % of the changes, chosen and released
            # with Laplace noise.
            flt = SVTPrivacy(data_kinds=[DataKind.WEIGHT_DIFF])
        job.add_client_output_filter(flt, tasks=["train"])
    if recipe.privacy.audit:
        from nvflare.app_common.app_constant import AppConstants

        from fedxr.privacy.audit import OutgoingAudit

        folder = str(audit_folder.resolve()) if audit_folder else ""
        # One task per entry (NVFlare picks a task's own filters before any "*" entry, and refuses task sets that
        # partly overlap, e.g. the HE recipe's): the audit on every task a site answers — training, validation
        # of a model, and its own model for cross-site scoring — after the filters already there.
        for task in (AppConstants.TASK_TRAIN, AppConstants.TASK_VALIDATION, AppConstants.TASK_SUBMIT_MODEL):
            job.add_client_output_filter(OutgoingAudit(folder), tasks=[task])


def _resilient(recipe_cls: Any) -> Any:  # an NVFlare recipe class (NVFlare has no type information)
    """The NVFlare recipe class with its FedAvg controller in resilient mode: a site whose task fails, or
    that has not answered within ``site_timeout_s``, is left out of that round's aggregate instead of
    stopping (or stalling) the federation."""

    class Resilient(recipe_cls):
        min_clients: int  # set by the NVFlare recipe's __init__

        def __init__(self, *args, clients_per_round: int | None = None, site_timeout_s: int = 0,
                     resume: ResumeSettings | None = None, **kwargs):
            self._clients_per_round = clients_per_round
            self._site_timeout_s = site_timeout_s
            self._resume = resume
            if resume is not None and not resume.on_server:
                # The rounds left: NVFlare's FedAvg runs start_round … start_round + num_rounds - 1 (a production
                # server works them out itself when the job starts).
                kwargs["num_rounds"] = kwargs["num_rounds"] - resume.start_round
            super().__init__(*args, **kwargs)

        def _get_controller_kwargs(self):
            return {**super()._get_controller_kwargs(), "ignore_result_error": True}

        def _create_controller(self, persistor_id, model_params, model_aggregator):
            # NVFlare's FedAvg asks `min_clients` randomly sampled sites per round; fedxr asks every
            # site (all hospitals train every round) and keeps min_clients as the quorum to start.
            quorum = self.min_clients
            self.min_clients = self._clients_per_round or quorum
            try:
                controller = super()._create_controller(persistor_id, model_params, model_aggregator)
            finally:
                self.min_clients = quorum
            from fedxr.federated.controller import with_site_deadline

            resume = self._resume
            controller = with_site_deadline(controller, self._site_timeout_s, quorum,
                                            resume_dir=str(resume.folder) if resume else "",
                                            job_digest=resume.digest if resume else "",
                                            resume_at_start=bool(resume and resume.on_server),
                                            resume_finished=bool(resume and resume.resubmitted))
            if resume is not None and not resume.on_server:
                controller.start_round = resume.start_round
            return controller

    Resilient.__name__ = f"Resilient{recipe_cls.__name__}"
    return Resilient


def _make_he_job(common: dict):
    """FedAvg with homomorphic encryption (NVFlare's HE recipe, TenSEAL CKKS): each site encrypts its weights
    (scaled by its step count) with the federation's public context; the server adds the ciphertexts and
    never holds a site's weights, or the average, in the clear; sites decrypt the global model with the
    secret key their startup kits hold (provisioned by NVFlare's HEBuilder: POC with ``use_he``).
    NVFlare's scatter-and-gather controller runs the rounds (no per-round deadline, no cross-site scoring)."""
    from nvflare.app_opt.pt.recipes.fedavg_he import FedAvgRecipeWithHE
    from nvflare.recipe import add_experiment_tracking

    job = FedAvgRecipeWithHE(**common)
    add_experiment_tracking(job, "tensorboard")
    return job


def _make_job(fed, common: dict, selection: dict, exclude: str | None, sites: int, resume: ResumeSettings | None):
    from nvflare.app_opt.pt.recipes import FedOptRecipe, ScaffoldRecipe
    from nvflare.app_opt.pt.recipes import FedAvgRecipe as _FedAvg
    from nvflare.app_opt.pt.recipes import FedProxRecipe as _FedProx
    from nvflare.recipe import add_cross_site_evaluation, add_experiment_tracking, add_final_global_evaluation

    FedAvgRecipe, FedProxRecipe = _resilient(_FedAvg), _resilient(_FedProx)

    from fedxr.federated.aggregator import SiteOrderedFedAvg

    # Sum the sites' weights in site order, not arrival order: the same job gives the same model.
    every_site = dict(clients_per_round=sites, site_timeout_s=fed.timeout_s,
                      aggregator=SiteOrderedFedAvg(exclude_vars=exclude), resume=resume)
    if fed.algorithm == "fedavg":
        job = FedAvgRecipe(**common, **selection, **every_site, exclude_vars=exclude)
    elif fed.algorithm == "fedprox":
        job = FedProxRecipe(**common, **selection, **every_site, exclude_vars=exclude, fedprox_mu=fed.fedprox_mu)
    elif fed.algorithm == "scaffold":
        job = ScaffoldRecipe(**common)
    elif fed.algorithm == "fedopt":
        # Server-side optimiser on the averaged update (NVFlare's CIFAR-10 FedOpt settings): SGD with
        # momentum, its learning rate annealed over the rounds.
        job = FedOptRecipe(
            **common,
            optimizer_args={"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}},
            lr_scheduler_args={"path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                               "args": {"T_max": "{num_rounds}", "eta_min": 0.9}},
        )
    else:  # the config schema already restricts this
        raise FedxrError(f"unknown federated.algorithm {fed.algorithm!r}")
    add_experiment_tracking(job, "tensorboard")
    if fed.algorithm in ("scaffold", "fedopt"):
        # NVFlare 2.9's SCAFFOLD and FedOpt recipes expose no model persistor to its evaluation
        # helpers, so the job has no cross-site / final global evaluation; `fedxr evaluate` (and the
        # pipeline's evaluate stage) score the global model instead.
        warnings.warn(f"federated.algorithm {fed.algorithm}: NVFlare offers no cross-site evaluation for it; "
                      "the global model is scored by fedxr's evaluate stage", stacklevel=2)
    elif fed.cross_site_eval:
        add_cross_site_evaluation(job, submit_model_timeout=fed.timeout_s, validation_timeout=fed.timeout_s)
    else:
        add_final_global_evaluation(job, validation_timeout=fed.timeout_s)
    return job
