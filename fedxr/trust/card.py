"""MODEL_CARD.md: what an exported model is for, what it was trained on, how well it does and where it fails.

Written by the exporter from the checkpoint, the trust fit (:mod:`fedxr.trust.fit`) and the export manifest.
Torch-free, like :mod:`fedxr.edge`, which prints the card's summary (``python -m fedxr.edge info``).
"""

from __future__ import annotations

from pathlib import Path

from fedxr.artifacts import ExportManifest
from fedxr.data.atomic import write_text_atomic
from fedxr.data.provenance import SYNTHETIC_WARNING, describe

CARD_FILE = "MODEL_CARD.md"
#: The card's summary (what `fedxr.edge info` prints) ends where this heading starts.
DETAILS_HEADING = "## Performance"

_PHANTOM = ("fedxr's phantom is a procedural image generator: smooth lung fields, ribs and a heart outline with "
            "drawn signs (blobs, bands, lines) for each finding. A model trained on it has never seen a radiograph; "
            "its figures measure the software, not a clinical ability.")


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(v) -> str:
    return "–" if not v else f"{v[0]:.3f}–{v[1]:.3f}"


def _rate(v) -> str:
    return "–" if v is None else f"{v:.1%}"


def _point(p: dict) -> str:
    if not p["reliable"]:
        return f"not reliable in this model: {p['why']}"
    s, sp = p["sensitivity"], p["specificity"]
    return (f"threshold {p['threshold']:.3f}: sensitivity {s[0]:.2f} ({s[1]:.2f}–{s[2]:.2f}), "
            f"specificity {sp[0]:.2f} ({sp[1]:.2f}–{sp[2]:.2f}) on validation")


def render(model_name: str, student: bool, trained_on: dict | None, trust: dict, manifest: ExportManifest) -> str:
    report, ood, points = trust["report"], trust["ood"], trust["operating_points"]
    synthetic = bool(trained_on and trained_on.get("synthetic"))
    lines = []
    if synthetic:
        lines += [f"> **{SYNTHETIC_WARNING.upper()}.** {_PHANTOM}", ""]
    lines += [f"# Model card: {model_name} ({'student, distilled' if student else 'teacher'})", "",
              f"- **Training data:** {describe(trained_on)}",
              f"- **Recommended file:** `{manifest.recommended}` (target {manifest.target}, "
              f"input {manifest.input_size} px gray)",
              f"- **Intended use:** {'software testing and demonstration only' if synthetic else 'a second reader that flags frontal (PA/AP) adult or pediatric chest radiographs for a clinician to review, at sites like those it was trained on'}.",
              "- **Not intended for:** diagnosis without a clinician; lateral views, CT, MR or anything not a frontal "
              "chest radiograph (the out-of-distribution check below flags them); findings marked *not reliable*; "
              "populations or scanners unlike the training sites without a local validation first.",
              f"- **Out-of-distribution check:** {ood['method']}; an image is flagged above distance "
              f"{ood['threshold']:.3f} (the {ood['quantile']:.0%} quantile of validation images): flags "
              f"{_rate(ood['val_flagged'])} of validation and {_rate(ood['test_flagged'])} of test images.",
              f"- **Calibration:** Platt scaling per finding on validation; macro ECE on test "
              f"{_f((report['ece'].get('test') or {}).get('macro_before'))} → "
              f"{_f((report['ece'].get('test') or {}).get('macro_after'))} "
              f"(validation {_f(report['ece']['val']['macro_before'])} → {_f(report['ece']['val']['macro_after'])}).",
              f"- **Operating points:** {report['rule']} on validation; "
              f"{sum(p['reliable'] for p in points)} of {len(points)} findings reliable.", ""]
    lines += [DETAILS_HEADING, "",
              "Within-site figures are the primary ones: a pooled AUROC across hospitals with different case mix can "
              "reward recognising the hospital rather than the finding. Test split, 95 % bootstrap intervals; "
              "macro over findings with ≥ 10 known test positives and negatives.", "",
              "| site | test images | macro AUROC | 95 % CI | findings scored | normal vs abnormal AUROC |",
              "|---|---:|---:|---|---|---:|"]
    test = report.get("test") or {}
    for name, s in [*test.get("per_site", {}).items(), *([("pooled (all sites)", test["pooled"])] if test.get("pooled") else [])]:
        ab = s.get("abnormal_auroc") or {}
        lines.append(f"| {name} | {s['images']} | {_f(s.get('macro_auroc'))} | {_ci(s.get('macro_auroc_ci95'))} | "
                     f"{', '.join(s['counted']) or '–'} | {_f(ab.get('auroc'))} |")
    if not test:
        lines.append("| – | 0 | – | – | no test split | – |")
    lines += ["", "## Findings and operating points", "",
              "| finding | operating point (validation) | AUROC 95 % CI | ECE test before → after |", "|---|---|---|---|"]
    ece_t = (report["ece"].get("test") or report["ece"]["val"])["per_finding"]
    for p in points:
        c = p["label"]
        lines.append(f"| {c} | {_point(p)} | {_ci(report['auroc_ci95'].get(c))} ({report['auroc_ci95_source'][c]}) | "
                     f"{_f(ece_t[c]['before'])} → {_f(ece_t[c]['after'])} |")
    limits = [f"{p['label']}: {p['why']}" for p in points if not p["reliable"]]
    weak = [name for name, s in test.get("per_site", {}).items()
            if s.get("macro_auroc_ci95") and s["macro_auroc_ci95"][0] <= 0.5]
    lines += ["", "## Known limits", ""]
    lines += [f"- Not reliable — {x}" for x in limits] or ["- Every finding has a usable operating point."]
    if weak:
        lines.append(f"- Sites where the model is no better than chance on their own test split: {', '.join(weak)}.")
    per_site_ood = ood.get("test_flagged_per_site") or {}
    if per_site_ood:
        lines.append("- Test images flagged out-of-distribution per site: "
                     + ", ".join(f"{k} {_rate(v)}" for k, v in per_site_ood.items()) + ".")
    if synthetic:
        lines.append(f"- {_PHANTOM}")
    lines += ["- Figures come from one training run (one seed); intervals cover the test images, not the training.",
              "", "Plots beside this card: `reliability.png` (calibration before/after, test), `ood_scores.png`.", ""]
    return "\n".join(lines)


def write_card(folder: Path, text: str) -> Path:
    path = Path(folder) / CARD_FILE
    write_text_atomic(path, text)
    return path


def summary(folder: str | Path) -> str | None:
    """The card's first part (banner, training data, use, checks), or None when the folder has no card."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    return path.read_text().split(DETAILS_HEADING)[0].rstrip()
