"""`fedxr run RECIPE [--from STAGE] [--force]`: every stage a recipe drives, in order.

data → sites → teacher (federated) → distill (federated students) → export (ONNX) → evaluate (pooled
test set: teacher metrics, teacher vs students) → explain (Grad-CAM, pointing game) → report.

Each stage records a fingerprint in ``RUN/pipeline.json``: a hash of the recipe settings it reads and of
the runs of the stages it depends on. A stage whose fingerprint is unchanged and whose outputs exist
is skipped (and says so); a rerun stage gets a new run id, so everything downstream of it reruns too.
``--from STAGE`` reruns that stage and all later ones; ``--force`` reruns them all. Every stage's output
is also written to ``RUN/logs/STAGE.log``; a failure names the stage and that log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedxr.config import Recipe
from fedxr.errors import FedxrError

STATE_FILE = "pipeline.json"


@dataclass
class Stage:
    name: str
    title: str
    depends: tuple[str, ...]
    settings: Callable[[Recipe], object]  # the recipe values this stage reads
    run: Callable[["Context"], dict]  # returns its results, incl. "outputs": [paths]
    enabled: Callable[[Recipe], bool] = lambda r: True


class Context:
    """What the stages share: the recipe, where it came from, and earlier stages' results."""

    def __init__(self, recipe: Recipe, recipe_path: str | Path, progress: bool):
        self.recipe, self.recipe_path, self.progress = recipe, str(recipe_path), progress
        self.results: dict[str, dict] = {}

    @property
    def sites(self) -> Path:
        return self.recipe.run_dir / "sites"

    def teacher(self) -> str:
        return self.results["teacher"]["checkpoint"]

    def students(self) -> dict[str, dict]:
        return self.results.get("distill", {}).get("students", {})


# --- the stages -------------------------------------------------------------------------------------

def _data(ctx: Context) -> dict:
    from fedxr.data.prepare import ensure_dataset

    root, made = ensure_dataset(ctx.recipe, progress=ctx.progress)
    print(f"{'generated' if made else 'found'}: {root}")
    return {"root": str(root), "outputs": [str(root)]}


def _sites(ctx: Context) -> dict:
    from fedxr.data.prepare import ensure_sites

    folder, written = ensure_sites(ctx.recipe, force=True)
    print(f"wrote {folder}")
    return {"sites": str(folder), "outputs": [str(folder / "sites.json")]}


def _teacher(ctx: Context) -> dict:
    from fedxr.federated.run import federate, format_summary

    fed = federate(ctx.recipe, env=ctx.recipe.federated.env, recipe_path=ctx.recipe_path)
    print(format_summary(fed, ctx.recipe))
    ckpt = fed["checkpoints"].get("global_best") or fed["checkpoints"]["global_last"]
    return {"checkpoint": ckpt, "summary": fed.get("rounds"), "outputs": [ckpt]}


def _distill(ctx: Context) -> dict:
    from fedxr.distill.run import distill, student_checkpoint

    res = distill(ctx.recipe, ctx.teacher(), recipe_path=ctx.recipe_path, progress=ctx.progress)
    students = {name: {"kd": student_checkpoint(e["kd"]),
                       "no_kd": student_checkpoint(e["no_kd"]) if "no_kd" in e else None}
                for name, e in res["students"].items()}
    for name, paths in students.items():
        print(f"student {name}: {paths['kd']}" + (f"   (no-KD ablation: {paths['no_kd']})" if paths["no_kd"] else ""))
    return {"students": students, "outputs": [p["kd"] for p in students.values()]}


def _export(ctx: Context) -> dict:
    from fedxr.export.exporter import export_checkpoint, format_manifest

    ex, recipe = ctx.recipe.export, ctx.recipe
    # Folder per model: RUN-NAME_TEACHER for the teacher, RUN-NAME_student_NAME for each student.
    models = {f"teacher {recipe.model.name}": (ctx.teacher(), f"{recipe.output.name}_{recipe.model.name}")}
    models.update({f"student {n}": (p["kd"], f"{recipe.output.name}_student_{n}") for n, p in ctx.students().items()})
    manifests = {}
    for name, (ckpt, folder) in models.items():
        out = Path(ex.out) / folder
        print(f"--- {name} → {out} ---")
        manifest = export_checkpoint(ckpt, out, int8=ex.int8, fp16=ex.fp16, opset=ex.opset, data=ctx.sites,
                                     calibration_images=ex.calibration_images, parity_tolerance=ex.parity_tolerance)
        print(format_manifest(manifest))
        if not manifest["ok"]:
            raise FedxrError(f"export checks failed for {name}; see {manifest['out']}/manifest.json")
        manifests[name] = str(Path(manifest["out"]) / "manifest.json")
    # The smallest exported model is the one to try on a laptop or a board.
    edge = Path(manifests[list(models)[-1]]).parent
    return {"manifests": manifests, "edge_model": str(edge), "outputs": list(manifests.values())}


def _evaluate(ctx: Context) -> dict:
    from fedxr.evaluation import evaluate_checkpoint, format_result

    recipe = ctx.recipe
    result = evaluate_checkpoint(ctx.teacher(), ctx.sites, split="test", out=recipe.run_dir / "evaluate",
                                 cache_dir=recipe.data.cache_dir, progress=ctx.progress)
    print(format_result(result))
    out = {"metrics": str(Path(result["out"]) / "metrics.json"), "outputs": [str(Path(result["out"]) / "metrics.json")]}
    if ctx.students():
        from fedxr.distill.report import build_report, format_report

        report = build_report(ctx.teacher(), ctx.students(), ctx.sites, recipe.run_dir / "distill",
                              cache_dir=recipe.data.cache_dir, progress=ctx.progress, teacher_result=result)
        print(format_report(report))
        out["distill_report"] = str(recipe.run_dir / "distill" / "distill_report.json")
        out["outputs"].append(out["distill_report"])
    return out


def _explain(ctx: Context) -> dict:
    from fedxr.explain import explain, format_explain

    e = ctx.recipe.explain
    ckpts = [ctx.teacher(), *[p["kd"] for p in ctx.students().values()]]
    report = explain(ckpts, ctx.sites, ctx.recipe.run_dir / "explain", n=e.images, max_boxes=e.max_boxes,
                     seed=ctx.recipe.data.seed)
    print(format_explain(report))
    out = Path(report["out"])
    return {"grid": str(out / "gradcam_grid.png"), "pointing_game": str(out / "pointing_game.json"),
            "outputs": [str(out / "gradcam_grid.png")]}


def _report(ctx: Context) -> dict:
    from fedxr.report import write_report

    path = write_report(ctx.recipe, ctx.results)
    return {"report": str(path), "outputs": [str(path)]}


def _data_settings(r: Recipe):
    return {"source": r.data.source, "root": str(Path(r.data.root).resolve()), "phantom": r.data.phantom.model_dump()}


def _split_settings(r: Recipe):
    from fedxr.data.prepare import split_settings

    return split_settings(r)


STAGES: list[Stage] = [
    Stage("data", "data", (), _data_settings, _data),
    Stage("sites", "sites (patient-wise site manifests)", ("data",), _split_settings, _sites),
    Stage("teacher", "teacher (federated)", ("sites",),
          lambda r: [r.data.model_dump(), r.model.model_dump(), r.federated.model_dump()], _teacher),
    Stage("distill", "distill (federated students)", ("teacher",),
          lambda r: [r.distill.model_dump(), r.data.model_dump(), r.model.model_dump(), r.federated.model_dump()],
          _distill, enabled=lambda r: bool(r.distill.students)),
    Stage("export", "export (ONNX FP32 + INT8, verified)", ("teacher", "distill"), lambda r: r.export.model_dump(), _export),
    Stage("evaluate", "evaluate (pooled test set)", ("teacher", "distill"), lambda r: r.data.cache_dir, _evaluate),
    Stage("explain", "explain (Grad-CAM, pointing game)", ("teacher", "distill"), lambda r: r.explain.model_dump(),
          _explain, enabled=lambda r: r.explain.enabled),
    Stage("report", "report", ("sites", "teacher", "distill", "export", "evaluate", "explain"),
          lambda r: r.resolved(), _report),
]
STAGE_NAMES = [s.name for s in STAGES]


# --- running them ------------------------------------------------------------------------------------

class _Tee:
    """Writes to the terminal and to a stage's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.log.write(text)
        return self.stream.write(text)

    def flush(self):
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


def fingerprint(stage: Stage, recipe: Recipe, state: dict) -> str:
    upstream = {d: state.get(d, {}).get("run_id") for d in stage.depends}
    blob = json.dumps({"settings": stage.settings(recipe), "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def run_pipeline(recipe: Recipe, recipe_path: str | Path, force: bool = False, start: str | None = None,
                 progress: bool = True) -> dict:
    """Run (or skip) every stage; returns {"stages": {name: "ran"|"skipped"|"disabled"}, "results": ...}."""
    if start is not None and start not in STAGE_NAMES:
        raise FedxrError(f"--from {start!r} is not a stage; the stages are: {', '.join(STAGE_NAMES)}")
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / STATE_FILE
    state = _load_state(state_path)
    rerun_from = 0 if force else (STAGE_NAMES.index(start) if start else len(STAGE_NAMES))
    ctx = Context(recipe, recipe_path, progress)
    status: dict[str, str] = {}
    t_all = time.perf_counter()
    for i, stage in enumerate(STAGES):
        if not stage.enabled(recipe):
            print(f"\n=== stage: {stage.name} — disabled by the recipe ===", flush=True)
            state[stage.name] = {"run_id": "disabled", "fingerprint": None, "results": {}}
            status[stage.name] = "disabled"
            continue
        fp = fingerprint(stage, recipe, state)
        prev = state.get(stage.name, {})
        outputs_exist = bool(prev.get("results", {}).get("outputs")) and all(
            Path(p).exists() for p in prev["results"]["outputs"])
        if i < rerun_from and prev.get("fingerprint") == fp and outputs_exist:
            print(f"\n=== stage: {stage.name} — up to date, skipped (settings and inputs unchanged) ===", flush=True)
            ctx.results[stage.name] = prev["results"]
            status[stage.name] = "skipped"
            continue
        log_path = run_dir / "logs" / f"{stage.name}.log"
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
        results["seconds"] = seconds
        ctx.results[stage.name] = results
        state[stage.name] = {"fingerprint": fp, "run_id": f"{time.time():.6f}", "results": results}
        _save_state(state_path, state)
        status[stage.name] = "ran"
        print(f"--- {stage.name} done in {seconds:.0f} s", flush=True)
    total = time.perf_counter() - t_all
    print(f"\nfinished in {total:.0f} s: " + ", ".join(f"{k} {v}" for k, v in status.items()))
    if "report" in ctx.results:
        print(f"report:   {ctx.results['report']['report']}")
    if "export" in ctx.results:
        print(f"try it:   python -m fedxr.edge predict {ctx.results['export']['edge_model']} "
              "../shared/data/nih/00000001_000.png  (any PNG, JPEG or DICOM)")
    return {"stages": status, "results": ctx.results, "seconds": total}


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(path)
