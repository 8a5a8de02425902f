"""`fedxr run RECIPE [--from STAGE] [--force]`: every stage a recipe drives, in order.

data → sites → teacher (federated) → distill (federated students) → export (ONNX) → evaluate (pooled
test set: teacher metrics, teacher vs students) → explain (Grad-CAM, pointing game) → edge (the student
fine-tuned across simulated devices; only with ``edge_federation.enabled``) → report.

Each stage records a fingerprint in ``RUN/pipeline.json``: a hash of the recipe settings it reads and of
the runs of the stages it depends on. A stage whose fingerprint is unchanged and whose outputs exist
is skipped (and says so); a rerun stage gets a new run id, so everything downstream of it reruns too.
``--from STAGE`` reruns that stage and all later ones; ``--force`` reruns them all. Every stage's output
is also written to ``RUN/logs/STAGE.log``; a failure names the stage and that log.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fedxr.artifacts import MANIFEST_FILE, ExportManifest
from fedxr.data.atomic import write_json_atomic
from fedxr.errors import FedxrError
from fedxr.layout import RunLayout
from fedxr.results import (DataResult, DistillResult, EdgeResult, EvaluateResult, ExplainResult, ExportResult,
                           ReportResult, RunResults, SitesResult, StageResult, TeacherResult)

if TYPE_CHECKING:  # the recipe schema needs pydantic, which `fedxr --help` in an edge-only install lacks
    from fedxr.config import Recipe


@dataclass
class Stage:
    name: str  # also the RunResults field its result goes to
    title: str
    depends: tuple[str, ...]
    settings: Callable[["Recipe"], object]  # the recipe values this stage reads
    run: Callable[["Context"], StageResult]
    result: type[StageResult]
    enabled: Callable[["Recipe"], bool] = lambda r: True


@dataclass
class Context:
    """What the stages share: the recipe, where it came from, and the earlier stages' results."""

    recipe: "Recipe"
    recipe_path: str
    progress: bool
    results: RunResults
    #: The federated stage that runs starts from round 0, never resuming an interrupted run nor keeping a finished
    #: job's outputs: --restart-stage, a stage rerun by --force or --from, or one whose settings or inputs changed
    #: since the run that was interrupted in it.
    restart: bool = False

    @property
    def layout(self) -> RunLayout:
        return self.recipe.layout

    @property
    def teacher(self) -> str:
        assert self.results.teacher is not None, "the teacher stage runs before every stage that reads its checkpoint"
        return self.results.teacher.checkpoint


# --- the stages -------------------------------------------------------------------------------------

def _data(ctx: Context) -> DataResult:
    from fedxr.data.prepare import ensure_dataset

    root, made = ensure_dataset(ctx.recipe, progress=ctx.progress)
    print(f"{'generated' if made else 'found'}: {root}")
    return DataResult(root=str(root))


def _sites(ctx: Context) -> SitesResult:
    from fedxr.data.prepare import ensure_sites

    folder, written = ensure_sites(ctx.recipe, force=True)
    print(f"wrote {folder}")
    return SitesResult(sites=str(folder))


def _teacher(ctx: Context) -> TeacherResult:
    from fedxr.federated.run import federate, format_summary

    fed = federate(ctx.recipe, env=ctx.recipe.federated.env, recipe_path=ctx.recipe_path, restart=ctx.restart)
    print(format_summary(fed, ctx.recipe))
    return TeacherResult(checkpoint=fed.checkpoint, rounds=fed.rounds)


def _distill(ctx: Context) -> DistillResult:
    from fedxr.distill.run import distill

    return distill(ctx.recipe, ctx.teacher, recipe_path=ctx.recipe_path, progress=ctx.progress, restart=ctx.restart)


def _export(ctx: Context) -> ExportResult:
    from fedxr.export.exporter import export_checkpoint, format_manifest

    ex, recipe = ctx.recipe.export, ctx.recipe
    models = {f"teacher {recipe.model.name}": (ctx.teacher, ctx.layout.export(recipe.model.name))}
    models.update({f"student {n}": (s.kd, ctx.layout.export(n, student=True)) for n, s in ctx.results.students.items()})
    manifests: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for name, (ckpt, out) in models.items():
        print(f"--- {name} → {out} ---")
        manifest = export_checkpoint(ckpt, out, int8=ex.int8, fp16=ex.fp16, opset=ex.opset, data=ctx.layout.sites,
                                     calibration_images=ex.calibration_images, parity_tolerance=ex.parity_tolerance,
                                     operating_point=ex.operating_point, ood_quantile=ex.ood_quantile,
                                     trust_images=ex.trust_images, progress=ctx.progress)
        print(format_manifest(manifest))
        written = ExportManifest.read(out)
        if not written.ok:
            raise FedxrError(f"export checks failed for {name}; see {out / MANIFEST_FILE}")
        manifests[name] = str(out / MANIFEST_FILE)
        sizes[str(out)] = written.recommended_file.size_bytes or 0
    # The smallest exported model (its recommended file) is the one to try on a laptop or a board.
    return ExportResult(manifests=manifests, edge_model=min(sizes, key=sizes.__getitem__))


def _evaluate(ctx: Context) -> EvaluateResult:
    from fedxr.evaluation import evaluate_checkpoint, format_result

    recipe = ctx.recipe
    result = evaluate_checkpoint(ctx.teacher, ctx.layout.sites, split="test", out=ctx.layout.evaluate,
                                 cache_dir=recipe.data.cache_dir, progress=ctx.progress)
    print(format_result(result))
    metrics = str(result.metrics_file)
    per_site = _evaluate_sites(ctx)
    if not ctx.results.students:
        return EvaluateResult(metrics=metrics, per_site=per_site)
    from fedxr.distill.report import compare_students

    assert ctx.results.distill is not None  # students come from the distill stage's result
    report = compare_students(recipe, ctx.results.distill, teacher_result=result, progress=ctx.progress)
    return EvaluateResult(metrics=metrics, distill_report=str(Path(report["out"]) / "distill_report.json"),
                          per_site=per_site)


def _evaluate_sites(ctx: Context) -> str:
    """Teacher and students on each site's own test split (within-site: the primary figures)."""
    from fedxr.evaluation import SiteModels, evaluate_sites, format_sites
    from fedxr.federated.fedbn import site_models

    # FedBN: a model is scored at each site with that site's own model (the global one has pooled BatchNorm).
    def per_site(checkpoint: str) -> SiteModels:
        own = site_models(checkpoint)
        return {**own, "*": checkpoint} if own else checkpoint

    models: dict[str, SiteModels] = {"teacher": per_site(ctx.teacher)}
    for name, s in ctx.results.students.items():
        models[f"student {name}"] = per_site(s.kd)
        if s.no_kd:
            models[f"student {name} (no teacher)"] = per_site(s.no_kd)
    result = evaluate_sites(models, ctx.layout.sites, out=ctx.layout.evaluate, cache_dir=ctx.recipe.data.cache_dir,
                            progress=ctx.progress)
    print(format_sites(result))
    return str(Path(result["out"]) / "per_site.json")


def _explain(ctx: Context) -> ExplainResult:
    from fedxr.explain import explain, format_explain

    e = ctx.recipe.explain
    ckpts = [ctx.teacher, *[s.kd for s in ctx.results.students.values()]]
    report = explain(ckpts, ctx.layout.sites, ctx.layout.explain, n=e.images, max_boxes=e.max_boxes,
                     val_boxes=e.val_boxes, seed=ctx.recipe.data.seed)
    print(format_explain(report))
    out = Path(report["out"])
    return ExplainResult(grid=str(out / "gradcam_grid.png"), pointing_game=str(out / "pointing_game.json"))


def _edge(ctx: Context) -> EdgeResult:
    from fedxr.crossdevice.run import SUMMARY_FILE, default_start, edge_federate, format_summary

    # The devices start from edge_federation.init_from, else the run's first student distilled with the teacher
    # (the distill stage's, which this stage depends on; under FedBN the devices' site's own).
    students = ctx.results.students
    first = students[ctx.recipe.distill.students[0]].kd if students and ctx.recipe.distill.students else None
    start = ctx.recipe.edge_federation.init_from or default_start(ctx.recipe, first)
    summary = edge_federate(ctx.recipe, init_from=start, progress=ctx.progress)
    print(format_summary(summary))
    return EdgeResult(summary=str(ctx.layout.edge_federation / SUMMARY_FILE), final=summary["final"])


def _report(ctx: Context) -> ReportResult:
    from fedxr.report import write_report

    return ReportResult(report=str(write_report(ctx.recipe, ctx.results)))


def _data_settings(r: "Recipe"):
    return {"source": r.data.source, "root": str(Path(r.data.root).resolve()), "phantom": r.data.phantom.model_dump()}


def _training_settings(r: "Recipe", *sections) -> list:
    """A training stage's settings: its recipe sections and the precision it resolves to on this machine
    (``model.precision: auto`` trains bf16 on one CPU and FP32 on another: a run moved there reruns)."""
    from fedxr.precision import recipe_precision

    return [s.model_dump() for s in sections] + [recipe_precision(r)[0]]


def _file_identity(path: str | None) -> object:
    """A checkpoint named by path, as a stage's setting: its size and modification time, so that a retrained file
    under the same name (an earlier edge federation's final.ckpt, say) reruns the stage."""
    if not path or not Path(path).is_file():
        return path
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def _split_settings(r: "Recipe"):
    from fedxr.data.prepare import split_settings

    return split_settings(r)


STAGES: list[Stage] = [
    Stage("data", "data", (), _data_settings, _data, DataResult),
    Stage("sites", "sites (patient-wise site manifests)", ("data",), _split_settings, _sites, SitesResult),
    Stage("teacher", "teacher (federated)", ("sites",),
          lambda r: _training_settings(r, r.data, r.model, r.federated), _teacher, TeacherResult),
    Stage("distill", "distill (federated students)", ("teacher",),
          lambda r: _training_settings(r, r.distill, r.data, r.model, r.federated),
          _distill, DistillResult, enabled=lambda r: bool(r.distill.students)),
    Stage("export", "export (ONNX FP32 + INT8, verified)", ("teacher", "distill"), lambda r: r.export.model_dump(),
          _export, ExportResult),
    Stage("evaluate", "evaluate (pooled test set)", ("teacher", "distill"), lambda r: r.data.cache_dir, _evaluate,
          EvaluateResult),
    Stage("explain", "explain (Grad-CAM, pointing game)", ("teacher", "distill"), lambda r: r.explain.model_dump(),
          _explain, ExplainResult, enabled=lambda r: r.explain.enabled),
    Stage("edge", "edge (the student fine-tuned across simulated devices, NVFlare edge)", ("distill",),
          lambda r: _training_settings(r, r.edge_federation, r.data) + [_file_identity(r.edge_federation.init_from)],
          _edge, EdgeResult,
          enabled=lambda r: r.edge_federation.enabled),
    Stage("report", "report", ("sites", "teacher", "distill", "export", "evaluate", "explain", "edge"),
          lambda r: r.resolved(), _report, ReportResult),
]
STAGE_NAMES = [s.name for s in STAGES]


# --- running them ------------------------------------------------------------------------------------

class _Tee:
    """Writes to the terminal and to a stage's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    # A logging handler made during a stage keeps this object after the stage's log is closed: then only the terminal.
    def write(self, text):
        if not self.log.closed:
            self.log.write(text)
        return self.stream.write(text)

    def flush(self):
        if not self.log.closed:
            self.log.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _logged(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield log
        finally:
            sys.stdout, sys.stderr = out, err


#: The fingerprint of the stage's latest attempt, kept in RUN/pipeline.json from the moment it starts.
ATTEMPT = "attempt"


def fingerprint(stage: Stage, recipe: "Recipe", state: dict) -> str:
    upstream = {d: state.get(d, {}).get("run_id") for d in stage.depends}
    blob = json.dumps({"settings": stage.settings(recipe), "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _previous_result(stage: Stage, prev: dict) -> StageResult | None:
    """The stage's stored result when all its outputs still exist (None: it must run)."""
    stored = prev.get("result") or prev.get("results")  # "results": what fedxr 0.1 wrote
    result = stage.result.from_json(stored) if isinstance(stored, dict) else None
    if result is None or not result.outputs() or not all(Path(p).exists() for p in result.outputs()):
        return None
    return result


def run_pipeline(recipe: "Recipe", recipe_path: str | Path, force: bool = False, start: str | None = None,
                 progress: bool = True, restart_stage: bool = False) -> dict:
    """Run (or skip) every stage; returns {"stages": {name: "ran"|"skipped"|"disabled"}, "results": RunResults}.

    A federated stage (teacher, distill) that an earlier run left part-way resumes from its last completed round
    (fedxr.federated.resume) unless ``restart_stage``, ``force`` or ``start`` says to rerun it."""
    if start is not None and start not in STAGE_NAMES:
        raise FedxrError(f"--from {start!r} is not a stage; the stages are: {', '.join(STAGE_NAMES)}")
    layout = recipe.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    state_path = layout.pipeline_state
    state = _load_state(state_path)
    rerun_from = 0 if force else (STAGE_NAMES.index(start) if start else len(STAGE_NAMES))
    ctx = Context(recipe, str(recipe_path), progress, RunResults())
    with _run_status(layout.run_status) as mark:
        status = _run_stages(ctx, state, state_path, rerun_from, mark, restart_stage)
    return status


@contextlib.contextmanager
def _run_status(path: Path):
    """Keep ``run_status.json`` saying what this `fedxr run` is doing, so that a reader (the console) can tell a
    run that is going from one that failed, was stopped, or whose process was killed outright (its pid is gone)."""
    status = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "stage": None}

    def mark(**changes) -> None:
        status.update(changes)
        write_json_atomic(path, status)

    mark()
    try:
        yield mark
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):  # never hide why the run stopped behind a status file it could not write
            mark(state="interrupted", ended=time.time())
        raise
    except BaseException as exc:
        with contextlib.suppress(OSError):
            mark(state="failed", ended=time.time(),
                 error=str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        raise
    mark(state="finished", ended=time.time(), stage=None)


def _run_stages(ctx: Context, state: dict, state_path: Path, rerun_from: int, mark, restart_stage: bool = False) -> dict:
    recipe, layout = ctx.recipe, ctx.recipe.layout
    status: dict[str, str] = {}
    t_all = time.perf_counter()
    for i, stage in enumerate(STAGES):
        if not stage.enabled(recipe):
            print(f"\n=== stage: {stage.name} — disabled by the recipe ===", flush=True)
            state[stage.name] = {"run_id": "disabled", "fingerprint": None, "result": None}
            status[stage.name] = "disabled"
            continue
        fp = fingerprint(stage, recipe, state)
        prev = state.get(stage.name, {})
        previous = _previous_result(stage, prev)
        if i < rerun_from and prev.get("fingerprint") == fp and previous is not None:
            print(f"\n=== stage: {stage.name} — up to date, skipped (settings and inputs unchanged) ===", flush=True)
            setattr(ctx.results, stage.name, previous)
            if prev.get("seconds") is not None:
                ctx.results.seconds[stage.name] = prev["seconds"]
            status[stage.name] = "skipped"
            continue
        log_path = layout.log(stage.name)
        mark(stage=stage.name)
        # A federated stage resumes only what an interrupted `fedxr run` of these very settings and inputs left.
        ctx.restart = restart_stage or i >= rerun_from or prev.get(ATTEMPT) != fp
        state[stage.name] = {**prev, ATTEMPT: fp}
        _save_state(state_path, state)
        print(f"\n=== stage: {stage.title} ===  (log: {log_path})", flush=True)
        t = time.perf_counter()
        with _logged(log_path) as log:
            try:
                results = stage.run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                log.write(traceback.format_exc())
                _save_state(state_path, state)
                message = str(exc) if isinstance(exc, FedxrError) else f"{type(exc).__name__}: {exc}"
                raise FedxrError(f"stage {stage.name!r} failed: {message}\n  log: {log_path}") from exc
        seconds = round(time.perf_counter() - t, 1)
        setattr(ctx.results, stage.name, results)
        ctx.results.seconds[stage.name] = seconds
        state[stage.name] = {"fingerprint": fp, "run_id": f"{time.time():.6f}", "seconds": seconds,
                             "result": results.to_json()}
        _save_state(state_path, state)
        status[stage.name] = "ran"
        print(f"--- {stage.name} done in {seconds:.0f} s", flush=True)
    total = time.perf_counter() - t_all
    print(f"\nfinished in {total:.0f} s: " + ", ".join(f"{k} {v}" for k, v in status.items()))
    if ctx.results.report:
        print(f"report:   {ctx.results.report.report}")
    if ctx.results.export:
        print(f"try it:   python -m fedxr.edge predict {ctx.results.export.edge_model} "
              f"{_example_image(layout) or 'IMAGE.png'}  (any PNG, JPEG or DICOM)")
    return {"stages": status, "results": ctx.results, "seconds": total}


def _example_image(layout: RunLayout) -> str | None:
    """A test image of this run's own data, to show the edge runtime on (exists wherever the run does)."""
    for manifest in sorted(layout.sites.glob("site-*.csv")):
        with open(manifest, newline="") as fh:
            row = next((r for r in csv.DictReader(fh) if r.get("split") == "test"), None)
        if row and Path(row["path"]).is_file():
            return row["path"]
    return None


def _save_state(path: Path, state: dict) -> None:
    write_json_atomic(path, state, default=str)
