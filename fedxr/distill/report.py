"""`distill_report.json` + `distill_report.png`: the teacher against each student on one pooled test set.

Per model: macro and per-class AUROC, parameters, MACs per image at its input size, and the MAC ratio
to the teacher; per student also the no-teacher ablation and what distillation added. The goals the
project set (student ≥ teacher − 0.02 AUROC with ≥ 10× fewer MACs; KD > no-KD) are evaluated and
written down, met or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedxr.defaults import CACHE_DIR
from fedxr.evaluation import BOOTSTRAP_RESAMPLES, PREDICTIONS_FILE
from fedxr.labels import LABELS
from fedxr.plots import saved_figure
from fedxr.data.atomic import write_json_atomic

if TYPE_CHECKING:
    from fedxr.artifacts import EvalResult
    from fedxr.results import DistillResult, StudentResult

AUROC_MARGIN = 0.02
MAC_RATIO_GOAL = 10.0


def _score(ckpt_path: str, sites_dir: Path, out: Path, cache_dir: str, progress: bool,
           result: "EvalResult | None" = None) -> dict:
    """Test metrics (``result``: an `evaluate_checkpoint` result already computed for it) + complexity."""
    from fedxr.evaluation import evaluate_checkpoint
    from fedxr.models.registry import complexity

    if result is None:
        result = evaluate_checkpoint(ckpt_path, sites_dir, split="test", out=out, cache_dir=cache_dir, progress=progress)
    assert result.image_size is not None  # evaluate_checkpoint always records it (only old files lack it)
    params, macs = complexity(result.model_name, result.image_size)
    return {"checkpoint": str(ckpt_path), "model_name": result.model_name, "image_size": result.image_size,
            "macro_auroc": result.macro_auroc, "macro_auroc_ci95": result.macro_auroc_ci95,
            "counted": result.counted, "auroc": result.auroc, "params": params, "macs": macs,
            "test_images": result.images, "predictions": str(result.metrics_file.parent / PREDICTIONS_FILE)}


def paired_differences(first: dict, second: dict, classes: list[str]) -> dict:
    """``first`` − ``second`` macro AUROC on the same bootstrap resamples of the same test images:
    the 95 % interval and the share of resamples in which ``first`` is not better."""
    import numpy as np

    from fedxr.models.metrics import bootstrap_macro_auroc, interval

    a, b = (np.load(m["predictions"]) for m in (first, second))
    if not np.array_equal(a["targets"], b["targets"], equal_nan=True):
        raise ValueError(f"{first['checkpoint']} and {second['checkpoint']} were not scored on the same images")
    samples = bootstrap_macro_auroc([a["probs"], b["probs"]], a["targets"], classes, BOOTSTRAP_RESAMPLES)
    diff = samples[0] - samples[1]
    return {"ci95": interval(diff), "share_not_better": float((diff <= 0).mean())}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def compare_students(recipe, distilled: "DistillResult", teacher_result: "EvalResult | None" = None,
                     progress: bool = True) -> dict:
    """The teacher against each distilled student (and its ablation) on the run's pooled test set, written
    to ``RUN/distill/`` and printed: what `fedxr run` (evaluate stage) and `fedxr distill` both show."""
    report = build_report(distilled.teacher, distilled.students, recipe.layout.sites, recipe.layout.distill,
                          cache_dir=recipe.data.cache_dir, progress=progress, teacher_result=teacher_result)
    print(format_report(report))
    return report


def build_report(teacher_ckpt: str | Path, students: dict[str, "StudentResult"], sites_dir: Path, out: Path,
                 cache_dir: str = CACHE_DIR, progress: bool = True, teacher_result: "EvalResult | None" = None) -> dict:
    """``students``: {name: StudentResult (kd checkpoint, optional no_kd)}. Writes the JSON and PNG into
    ``out``. ``teacher_result``: the teacher's pooled-test `evaluate_checkpoint` result, when already computed."""
    out.mkdir(parents=True, exist_ok=True)
    teacher = _score(str(teacher_ckpt), sites_dir, out / "eval_teacher", cache_dir, progress, teacher_result)
    rows = {}
    for name, ckpts in students.items():
        kd = _score(ckpts.kd, sites_dir, out / f"eval_{name}", cache_dir, progress)
        kd["mac_ratio"] = teacher["macs"] / kd["macs"]
        kd["auroc_vs_teacher"] = _diff(kd["macro_auroc"], teacher["macro_auroc"])
        kd["goal_auroc_within_0.02"] = kd["auroc_vs_teacher"] is not None and kd["auroc_vs_teacher"] >= -AUROC_MARGIN
        kd["goal_10x_fewer_macs"] = kd["mac_ratio"] >= MAC_RATIO_GOAL
        classes = teacher["counted"]
        kd["vs_teacher_paired"] = paired_differences(kd, teacher, classes)
        if ckpts.no_kd:
            ablation = _score(ckpts.no_kd, sites_dir, out / f"eval_{name}_no_kd", cache_dir, progress)
            kd["no_kd"] = ablation
            kd["kd_gain"] = _diff(kd["macro_auroc"], ablation["macro_auroc"])
            kd["kd_gain_paired"] = paired_differences(kd, ablation, classes)
            kd["goal_kd_beats_no_kd"] = kd["kd_gain"] is not None and kd["kd_gain"] > 0
        rows[name] = kd
    report = {"test_set": str(sites_dir), "split": "test (every site's test split, pooled)", "teacher": teacher,
              "students": rows, "goals": {"auroc_margin": AUROC_MARGIN, "mac_ratio": MAC_RATIO_GOAL}}
    write_json_atomic(out / "distill_report.json", report)
    plot_report(report, out / "distill_report.png")
    report["out"] = str(out)
    return report


def plot_report(report: dict, path: Path) -> None:
    import numpy as np

    teacher = report["teacher"]
    models = [("teacher " + teacher["model_name"], teacher)]
    for name, row in report["students"].items():
        models.append((f"{name} (KD)", row))
        if "no_kd" in row:
            models.append((f"{name} (no KD)", row["no_kd"]))
    with saved_figure(path, dpi=100, ncols=2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 1]}) as (fig, (ax, ax2)):
        width = 0.8 / len(models)
        x = np.arange(len(LABELS))
        for i, (label, m) in enumerate(models):
            vals = [m["auroc"][c] if m["auroc"][c] is not None else np.nan for c in LABELS]
            ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=f"{label}: macro {_f(m['macro_auroc'], '.3f')}")
        ax.set_xticks(x, LABELS, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.axhline(0.5, c="grey", lw=0.7, ls=":")
        ax.set_ylabel("test AUROC")
        ax.set_title("per-class AUROC, pooled test set")
        ax.legend(fontsize=8)
        for label, m in models:
            if m["macro_auroc"] is None:
                continue
            ax2.scatter(m["macs"] / 1e6, m["macro_auroc"], s=40)
            ax2.annotate(label, (m["macs"] / 1e6, m["macro_auroc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax2.set_xscale("log")
        ax2.set_xlabel("MMACs per image (log)")
        ax2.set_ylabel("macro AUROC")
        if teacher["macro_auroc"] is not None:
            ax2.axhline(teacher["macro_auroc"] - AUROC_MARGIN, c="red", lw=0.7, ls="--", label="teacher − 0.02")
            ax2.legend(fontsize=7)
        ax2.set_title("accuracy vs compute")


def _f(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _ci(pair) -> str:
    return "n/a" if not pair else f"{pair[0]:+.3f} to {pair[1]:+.3f}"


def format_report(report: dict) -> str:
    t = report["teacher"]
    lines = [f"{'model':<34}{'macro AUROC':>12}{'params':>10}{'MMACs':>10}{'MAC ratio':>10}",
             f"{'teacher ' + t['model_name']:<34}{_f(t['macro_auroc']):>12}{t['params'] / 1e6:>9.2f}M{t['macs'] / 1e6:>10.1f}{'1.0':>10}"]
    for name, r in report["students"].items():
        lines.append(f"{name + ' (KD)':<34}{_f(r['macro_auroc']):>12}{r['params'] / 1e6:>9.2f}M{r['macs'] / 1e6:>10.1f}"
                     f"{r['mac_ratio']:>9.1f}×   vs teacher {_f(r['auroc_vs_teacher'], '+.4f')} "
                     f"(95 % CI {_ci(r['vs_teacher_paired']['ci95'])})")
        if "no_kd" in r:
            lines.append(f"{name + ' (no KD)':<34}{_f(r['no_kd']['macro_auroc']):>12}   KD gain {_f(r['kd_gain'], '+.4f')} "
                         f"(95 % CI {_ci(r['kd_gain_paired']['ci95'])}; not positive in "
                         f"{r['kd_gain_paired']['share_not_better']:.1%} of resamples)")
    lines.append(f"wrote {report['out']}/distill_report.json and distill_report.png")
    return "\n".join(lines)
