"""`fedxr distill`: compress the frozen global teacher into each of the recipe's students.

Federated (default): one NVFlare job per student, on the same engine and site data as the teacher.
The server's round-0 model is a :class:`DistillClassifier` state (student initialisation + the teacher's
weights) written to a file that NVFlare bundles into the job, so the teacher reaches every site
through NVFlare itself, in simulation, POC and production alike. The teacher's tensors are excluded
from aggregation: they are sent once and stay frozen at each site; only the student is averaged.

Central: one site (or a single-hospital user) distils on its own data with the same module.

With ``distill.ablation_no_teacher`` each student is also trained the same way without the teacher
(same rounds, data and settings), which is what the report compares against.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fedxr.artifacts import FederateSummary
from fedxr.config import Recipe
from fedxr.energy import tracked
from fedxr.errors import FedxrError
from fedxr.layout import RunLayout, chosen_checkpoint
from fedxr.models.checkpoint import load_checkpoint, require_trained_batchnorm
from fedxr.models.registry import UnknownModelError, get_spec
from fedxr.results import DistillResult, StudentResult
from fedxr.data.atomic import write_json_atomic

#: Regex of the teacher's tensors in a DistillClassifier state_dict (kept out of aggregation).
TEACHER_VARS = r"^teacher\."
DISTILL_CLASS = "fedxr.distill.module.DistillClassifier"
#: Recorded as the checkpoints' ``source`` (the distilled student and its ablation alike).
SOURCE = "distill"


def check_teacher(path: str | Path | None) -> dict:
    """Load the teacher checkpoint, or fail with what to do — before any job starts."""
    if not path:
        raise FedxrError("no teacher checkpoint: run `fedxr federate RECIPE` first or pass --teacher CKPT")
    ckpt = load_checkpoint(path)  # missing file, unreadable file and a foreign label set are errors here
    require_trained_batchnorm(ckpt, path)
    try:
        get_spec(ckpt["model_name"])
    except UnknownModelError as exc:
        raise FedxrError(f"{path}: teacher model {exc}") from None
    return ckpt


def default_teacher(recipe: Recipe) -> Path:
    """The run's federated teacher (best global model, else the last)."""
    try:
        return chosen_checkpoint(recipe.layout.federate)
    except FedxrError:
        raise FedxrError(f"no teacher checkpoint in {recipe.layout.federate}: run `fedxr federate RECIPE` first "
                         "or pass --teacher CKPT") from None


def student_recipe(recipe: Recipe, student: str) -> Recipe:
    """The recipe a student trains with: the student model, the distill section's rounds and epochs,
    FedAvg (the students are averaged; with the teacher's ``federated.fedbn`` each site keeps its student's BatchNorm
    too), final global evaluation instead of cross-site."""
    d = recipe.distill
    return recipe.changed(
        f"student {student}",
        # mixup for the KD student and its no-teacher ablation alike
        # A student starts fresh and trains every weight: the teacher's init_from, trainable and norm are about the
        # teacher's architecture and its fine-tuning.
        model={"name": student, "mixup": d.mixup, "lr": d.lr or recipe.model.lr, "init_from": None,
               "trainable": "all", "norm": "auto"},
        data={"image_size": d.image_size or recipe.data.image_size},
        # FedBN carries over: with one teacher per site, each site's student keeps its BatchNorm too.
        federated={"rounds": d.rounds, "local_epochs": d.local_epochs, "algorithm": "fedavg", "cross_site_eval": False})


def distill_arguments(recipe: Recipe, teacher: dict) -> dict:
    """DistillClassifier's teacher and loss arguments (everything but the student's own); the teacher's
    preprocessing is read from its checkpoint."""
    d = recipe.distill
    return {"teacher_name": teacher["model_name"], "teacher_preprocessing": teacher["preprocessing"].as_dict(),
            "alpha": d.alpha, "temperature": d.temperature}


def student_model(srecipe: Recipe, teacher: dict) -> dict:
    """The federated job's model description: the student's (as for any fedxr model) plus its teacher."""
    from fedxr.federated.job import model_config

    return {"class_path": DISTILL_CLASS, "args": {**model_config(srecipe)["args"], **distill_arguments(srecipe, teacher)}}


def initial_model(srecipe: Recipe, teacher: dict, path: Path) -> Path:
    """Round-0 weights of the federated job: a seeded student and the teacher's weights."""
    from fedxr.distill.module import DistillClassifier

    L.seed_everything(srecipe.model.seed, verbose=False)
    module = DistillClassifier(**student_model(srecipe, teacher)["args"])
    module.teacher.load_state_dict(teacher["state_dict"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return path


def distill_federated(recipe: Recipe, teacher_path: Path, teacher: dict, student: str, env: str,
                      recipe_path: str | None = None, startup_kit: str | None = None,
                      restart: bool = False) -> FederateSummary:
    from fedxr.federated.run import federate

    srecipe = student_recipe(recipe, student)
    stage = RunLayout.student_stage(student)
    init = initial_model(srecipe, teacher, srecipe.layout.stage(stage) / "initial_model.pt")
    summary = federate(srecipe, env=env, startup_kit=startup_kit, recipe_path=recipe_path, stage=stage, source=SOURCE,
                       model=student_model(srecipe, teacher), exclude_vars=TEACHER_VARS, initial_ckpt=init,
                       extra_args=site_teachers_argument(teacher_path, env), restart=restart)
    return replace(summary, teacher=str(teacher_path))


def site_teachers_argument(teacher_path: Path, env: str) -> str:
    """A FedBN teacher is one model per site (fedxr.federated.fedbn): in simulation and POC each site distils from
    its own, not from the global model with pooled BatchNorm. In production the sites' models stay at the sites."""
    from fedxr.federated.fedbn import site_models

    models = site_models(teacher_path) if env in ("sim", "poc") else {}
    if not models:
        return ""
    folder = next(iter(models.values())).parent.resolve()
    print(f"FedBN teacher: each site distils from its own model in {folder}", flush=True)
    return f"--site-teachers {folder}"


def distill_central(recipe: Recipe, teacher_path: Path, teacher: dict, student: str, sites_dir: Path,
                    site: str | None, progress: bool = True, with_teacher: bool = True) -> dict:
    """One site distils (``with_teacher``) or trains the same student alone, on its own data."""
    from fedxr.data.manifest import site_manifest_paths
    from fedxr.distill.module import DistillClassifier
    from fedxr.training import BestCheckpoint, make_classifier, make_datamodule, make_trainer

    srecipe = student_recipe(recipe, student)
    paths = site_manifest_paths(sites_dir)
    site = site or next(iter(paths))
    if site not in paths:
        raise FedxrError(f"--site {site!r} is not one of the sites in {sites_dir}: {', '.join(paths)}")
    folder = srecipe.layout.stage(RunLayout.student_stage(student, with_teacher))
    folder.mkdir(parents=True, exist_ok=True)
    L.seed_everything(srecipe.model.seed, workers=True, verbose=False)
    dm = make_datamodule(srecipe, [paths[site]], progress=progress)
    if with_teacher:
        module = make_classifier(srecipe, dm, cls=DistillClassifier, teacher_checkpoint=str(teacher_path),
                                 **distill_arguments(srecipe, teacher))
    else:
        module = make_classifier(srecipe, dm)
    best = BestCheckpoint(folder, srecipe.resolved(), source=SOURCE if with_teacher else "train:no_kd")
    # the federated run's local work in whole epochs (with federated.max_local_steps a large site trains fewer)
    epochs = srecipe.distill.rounds * srecipe.distill.local_epochs
    with tracked(folder, RunLayout.student_stage(student, with_teacher), srecipe.energy_country):
        make_trainer(srecipe, folder, callbacks=[best], max_epochs=epochs, progress=progress).fit(module, datamodule=dm)
    return {"mode": "central", "site": site, "teacher": str(teacher_path), "folder": str(folder),
            "checkpoints": {"best": str(best.best_path), "last": str(best.last_path)},
            "checkpoint": str(chosen_checkpoint(folder))}


def distill(recipe: Recipe, teacher_path: str | Path | None = None, mode: str | None = None, env: str | None = None,
            site: str | None = None, recipe_path: str | None = None, startup_kit: str | None = None,
            progress: bool = True, restart: bool = False) -> DistillResult:
    """Distil every student of the recipe (and the no-teacher ablation). Each student's run summary goes
    to ``RUN/distill/summary.json``; the result names the checkpoints."""
    from fedxr.data.prepare import require_sites
    from fedxr.federated.run import federate

    teacher_path = Path(teacher_path) if teacher_path else default_teacher(recipe)
    teacher = check_teacher(teacher_path)
    mode = mode or recipe.distill.mode
    env = env or recipe.federated.env
    if mode not in ("federated", "central"):
        raise FedxrError(f"unknown --mode {mode!r}; use federated or central")
    sites_dir = require_sites(recipe, recipe_path) if (mode == "central" or env != "prod") else None
    summaries: dict = {"teacher": str(teacher_path), "mode": mode, "students": {}}
    students: dict[str, StudentResult] = {}
    for student in recipe.distill.students:
        print(f"--- distilling {teacher['model_name']} → {student} ({mode}) ---", flush=True)
        # Each run's summary in its JSON form: a federated stage's FederateSummary, or a central run's dict.
        entry: dict[str, dict[str, Any]] = {}
        if mode == "federated":
            entry["kd"] = distill_federated(recipe, teacher_path, teacher, student, env, recipe_path,
                                            startup_kit, restart).to_json()
        else:
            assert sites_dir is not None  # required above for central mode
            entry["kd"] = distill_central(recipe, teacher_path, teacher, student, sites_dir, site, progress)
        if recipe.distill.ablation_no_teacher:
            print(f"--- ablation: {student} without the teacher (same rounds and data) ---", flush=True)
            if mode == "federated":
                entry["no_kd"] = federate(student_recipe(recipe, student), env=env, startup_kit=startup_kit,
                                          recipe_path=recipe_path, stage=RunLayout.student_stage(student, False),
                                          source=SOURCE, restart=restart).to_json()
            else:
                assert sites_dir is not None  # required above for central mode
                entry["no_kd"] = distill_central(recipe, teacher_path, teacher, student, sites_dir, site, progress,
                                                 with_teacher=False)
        summaries["students"][student] = entry
        # Both kinds name the model they stand for under "checkpoint".
        students[student] = StudentResult(kd=entry["kd"]["checkpoint"],
                                          no_kd=entry["no_kd"]["checkpoint"] if "no_kd" in entry else None)
        print(f"student {student}: {students[student].kd}"
              + (f"   (no-KD ablation: {students[student].no_kd})" if students[student].no_kd else ""))
    out = recipe.layout.distill
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", summaries, default=str)
    return DistillResult(teacher=str(teacher_path), students=students)
