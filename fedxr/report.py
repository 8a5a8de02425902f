"""`RUN/report.md`: one page a clinician's ML team reads after `fedxr run`, with plots beside the numbers.

Sections: data per site, the federated rounds, baselines (central / local training, when run),
teacher on the pooled test set, teacher vs students, exported artifacts, Grad-CAM, the resolved recipe.
Every image and file it links is relative to the run folder and exists (the tests check this).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from fedxr.artifacts import EvalResult, ExportManifest
from fedxr.config import Recipe
from fedxr.data.atomic import write_json_atomic, write_text_atomic
from fedxr.labels import LABELS
from fedxr.layout import RunLayout, read_sites_summary
from fedxr.plots import saved_figure
from fedxr.results import RunResults


def _f(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


def _ci(pair, spec=".3f") -> str:
    return "–" if not pair else f"{format(pair[0], spec)} to {format(pair[1], spec)}"


def _rel(path: str | Path, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve())


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def plot_prevalence(sites: list[dict], path: Path) -> None:
    import numpy as np

    # NaN: no image of the site has a known label for that finding (shown as '?', blank in the colour map).
    grid = np.array([[np.nan if s["prevalence"].get(c) is None else s["prevalence"][c] for c in LABELS] for s in sites])
    with saved_figure(path, dpi=90, figsize=(11, 1.2 + 0.6 * len(sites))) as (fig, ax):
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="magma", aspect="auto", vmin=0)
        ax.set_xticks(range(len(LABELS)), LABELS, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(sites)), [f"{s['site']} ({s['images']} img)" for s in sites], fontsize=8)
        for i in range(len(sites)):
            for j in range(len(LABELS)):
                known = not np.isnan(grid[i, j])
                counts = (sites[i].get("labels") or {}).get(LABELS[j])
                share = (counts["positive"] + counts["negative"]) / sites[i]["images"] if counts else 1.0
                text = f"{grid[i, j]:.2f}" if known else "?"
                if known and share < 1:  # say how many of the site's images this label is known for
                    text += f"\n{100 * share:.0f}% kn."
                ax.text(j, i, text, ha="center", va="center", fontsize=6 if share < 1 else 7,
                        color="white" if not known or grid[i, j] < np.nanmax(grid) / 2 else "black")
        ax.set_title("label prevalence per site among images whose label is known (% kn. = share of the site's "
                     "images with that label known; ? = never labelled there)", fontsize=9)
        fig.colorbar(im, ax=ax)


def _most_common(prevalence: dict) -> str:
    known = {k: v for k, v in prevalence.items() if v is not None}
    return max(known, key=known.__getitem__) if known else "–"


def _data_section(layout: RunLayout, out: list[str]) -> None:
    run = layout.root
    info = read_sites_summary(layout.sites)
    sites = info["sites"]
    out += ["## Data per site", "",
            f"Data set `{info['settings']['root']}`, split `{info['settings']['scheme']}` into {len(sites)} sites "
            "(patient-wise: no patient is in two sites or two splits).", ""]
    values = info["settings"].get("column_values") or {}
    out += _table(["site", "holds", "patients", "images", "train", "val", "test", "no finding", "labels known",
                   "most common finding"],
                  [[s["site"], ", ".join(values.get(s["site"], [])) or "–", s["patients"], s["images"], s["train"],
                    s["val"], s["test"], _f(s.get("no_finding"), ".2f"), 14 - len(s.get("unknown_labels", [])),
                    _most_common(s["prevalence"])] for s in sites])
    never = sorted(set(LABELS).intersection(*[set(s.get("unknown_labels", [])) for s in sites]))
    if never:
        out += ["", f"No site labels {', '.join(never)}: not trained, and reported as such."]
    plot_prevalence(sites, run / "report_prevalence.png")
    out += ["", "![prevalence](report_prevalence.png)", ""]


def _rounds_section(layout: RunLayout, results: RunResults, out: list[str]) -> None:
    run, fed = layout.root, layout.federate
    out += ["## Federated teacher", ""]
    rounds_path = fed / "rounds.json"
    if rounds_path.is_file():
        table = json.loads(rounds_path.read_text())
        sites = sorted({s for r in table for s in r["sites"]})
        rows = [[r["round"], *[_f(r["sites"].get(s, {}).get("val_auroc")) for s in sites], _f(r.get("aggregate_val_auroc")),
                 _f(r.get("wall_s"), ".1f")] for r in table]
        out += ["Validation AUROC of the global model received each round, per site (last row: the final model).", ""]
        out += _table(["round", *sites, "aggregate", "round s"], rows)
        out += ["", f"![rounds]({_rel(fed / 'rounds.png', run)})", ""]
        precisions = sorted({v["precision"] for r in table for v in r["sites"].values() if v.get("precision")})
        if precisions:
            why = _precision_reasons(fed)
            out += [f"Trained in {' and '.join(precisions)}{f' ({why})' if why else ''}.", ""]
    if (fed / "cross_site.png").is_file():
        out += [f"![cross-site]({_rel(fed / 'cross_site.png', run)})", ""]
    if results.teacher is not None:  # the report stage runs after the teacher's
        out += [f"Teacher checkpoint: `{_rel(results.teacher.checkpoint, run)}`", ""]


def _precision_reasons(fed: Path) -> str | None:
    """Why the sites trained in the precision they did, from the round records (each site's reason once)."""
    from fedxr.records import read_records

    records = fed / "records"
    if not records.is_dir():
        return None
    why: dict[str, set[str]] = {}
    for r in read_records(records):
        if r.get("precision_why"):
            why.setdefault(r["precision_why"], set()).add(r["site"])
    if len(why) == 1:
        return next(iter(why))
    return "; ".join(f"{', '.join(sorted(sites))}: {reason}" for reason, sites in why.items()) or None


def _privacy_section(layout: RunLayout, recipe: Recipe, out: list[str]) -> None:
    """What left each site (the sites' outgoing audit) and the differential-privacy ledger."""
    from fedxr.privacy.audit import compact_keys

    run, fed = layout.root, layout.federate
    p = recipe.privacy
    out += ["## Privacy", "",
            f"Differential privacy: {'DP-SGD, target ε = ' + format(p.dp.epsilon, 'g') if p.dp else 'off'}; update "
            f"filter: {p.filter}; homomorphic encryption: {'on' if p.he else 'off'}.", ""]
    outgoing = fed / "outgoing.json"
    out += ["### What left each site", ""]
    if outgoing.is_file():
        rows = json.loads(outgoing.read_text())
        out += ["Every message each site sent the server, as recorded by its last outgoing filter (what went on the "
                "wire): tensors (all of them the model's parameters, or their differences), bytes, and every other "
                "key sent (scores and NVFlare's step count).", ""]
        out += _table(["site", "task", "round", "messages", "payload", "tensors", "bytes", "other keys"],
                      [[r["site"], r["task"], "–" if r["round"] is None else r["round"], r["messages"],
                        ", ".join(r["kinds"]), r["tensors"], f"{r['bytes']:,}", ", ".join(compact_keys(r["keys"])) or "–"]
                       for r in rows]) + [""]
    else:
        out += ["Not recorded in this run (`privacy.audit: false`, or a production run: each site keeps its own "
                "record in its job folder, `outgoing.jsonl`).", ""]
    book_path = fed / "privacy.json"
    if book_path.is_file():
        book = json.loads(book_path.read_text())
        out += ["### Differential privacy spent", "", book["mechanism"] + ".", ""]
        out += _table(["site", "ε per", "target ε", "δ", "noise σ", "ε spent (training)", "ε spent (validation scores)",
                       "within target"],
                      [[name, s.get("unit") or "image", _f(s["target_epsilon"], "g"), _f(s["delta"], ".2g"),
                        _f(s["noise_multiplier"], ".3f"), _f(s["epsilon_spent"], ".3f"),
                        _f(s.get("val_epsilon_spent"), ".3f"), "yes" if s["within_target"] else "**no**"]
                       for name, s in book["sites"].items()]) + [""]
        if (fed / "privacy.png").is_file():
            out += [f"![privacy]({_rel(fed / 'privacy.png', run)})", ""]


def _baselines_section(layout: RunLayout, out: list[str]) -> None:
    run = layout.root
    rows = []
    for tag, folder in layout.baselines().items():
        s = json.loads((folder / "summary.json").read_text())
        rows.append([tag, _f(s.get("best_val_auroc")), f"`{_rel(s['best'], run)}`"])
    out += ["## Baselines", ""]
    if rows:
        out += _table(["training", "best val AUROC", "checkpoint"], rows) + [""]
    else:
        out += ["No central or local baselines in this run (`fedxr train RECIPE --mode central` or "
                "`--mode local --site site-1` add them here).", ""]


def _edge_section(layout: RunLayout, out: list[str]) -> None:
    """``fedxr edge-federate``'s run, where there is one: versions, the updates behind them, the test gain."""
    from fedxr.crossdevice.run import PLOT_FILE, SUMMARY_FILE

    folder = layout.edge_federation
    if not (folder / SUMMARY_FILE).is_file():
        return
    s = json.loads((folder / SUMMARY_FILE).read_text())
    t, u = s["test"], s["updates"]
    out += ["## Devices that learn together (edge federation)", "",
            f"{s['devices']} simulated devices holding {s['site']}'s training films "
            f"({s['population']['films_per_device']['min']}–{s['population']['films_per_device']['max']} each), "
            f"started from `{s['started_from']}`; {len(s['versions'])} model versions in {s['seconds']:.0f} s. Device "
            f"updates: {u['devices']} heard, {u['trained']} trained, {u['dropped']} dropped, {u['stale']} stale, "
            f"{u['ignored_too_old']} turned away as too old; one update {s['update_bytes'] / 1e6:.2f} MB.", ""]
    if (s.get("runtime") or {}).get("devices_train_with") == "executorch":
        out += [f"The devices trained through the student's ExecuTorch training program "
                f"(`{Path(s['runtime']['program']).name}`, {s['runtime']['program_bytes'] / 1e6:.2f} MB), as a phone or "
                "board runs it.", ""]
    if p := s.get("privacy"):
        out += [f"Differential privacy per device: each update clipped to {p['clip']:g} and noised on the device "
                f"(σ = {p['noise_std']:.2f} per coordinate); at most ε = {_f(p['max_epsilon_spent'], '.2f')} spent by "
                f"one device (budget {p['epsilon']:g}, δ = {p['delta']:g}); a film held by "
                f"{p['most_devices_holding_one_film']} devices: ε ≤ {_f(p['film_epsilon_bound'], '.1f')}.", ""]
    out += _table(["version", "val macro AUROC", "trained", "dropped", "stale", "seconds"],
                  [[v["version"], _f(v["val_macro_auroc"]), v["trained"], v["dropped"], v["stale"], _f(v["seconds"], ".0f")]
                   for v in s["versions"]]) + [""]
    if t["gain"] is not None:
        out += [f"Test macro AUROC at {s['site']} ({t['images']} films, 95 % bootstrap intervals): start "
                f"{_f(t['start'])} ({_ci(t['start_ci95'])}), final {_f(t['final'])} ({_ci(t['final_ci95'])}); gain "
                f"{_f(t['gain'], '+.3f')}" + (f" (paired: {_ci(t['gain_ci95'], '+.3f')})" if t["gain_ci95"] else "")
                + ".", ""]
    if (folder / PLOT_FILE).is_file():
        out += [f"![edge federation]({_rel(folder / PLOT_FILE, layout.root)})", ""]


def _evaluate_section(layout: RunLayout, results: RunResults, out: list[str]) -> None:
    run, ev = layout.root, results.evaluate
    if not ev:
        return
    m = EvalResult.read(ev.metrics)
    counted = m.counted if m.counted is not None else list(LABELS)  # metrics.json before `counted` was written
    out += ["## Teacher on the pooled test set", "",
            f"{m.images} test images from every site: macro AUROC **{_f(m.macro_auroc)}** "
            f"(95 % CI {_ci(m.macro_auroc_ci95)}, bootstrap over images), macro AP {_f(m.macro_ap)}. "
            f"The macro averages the {len(counted)} findings with at least {m.min_positives or 1} test positives; "
            "the others are shown as \"too few\"." + (f" {m.note}." if m.note else ""), ""]
    shown = lambda c, v: _f(v) if c in counted else "too few"  # noqa: E731
    at = m.at_thresholds
    out += _table(["finding", "AUROC", "AP", "threshold", "sensitivity", "specificity", "positives"],
                  [[c, shown(c, m.auroc[c]), shown(c, m.ap[c]), _f(at[c]["threshold"]), shown(c, at[c]["sensitivity"]),
                    shown(c, at[c]["specificity"]), at[c]["positives"]] for c in LABELS])
    out += ["", f"![ROC curves]({_rel(Path(ev.metrics).parent / 'roc_curves.png', run)})", ""]
    if ev.distill_report:
        rep = json.loads(Path(ev.distill_report).read_text())
        t = rep["teacher"]
        with_ci = lambda r: f"{_f(r['macro_auroc'])} ({_ci(r.get('macro_auroc_ci95'))})"  # noqa: E731
        paired = lambda v, p: f"{_f(v, '+.3f')} ({_ci(p['ci95'], '+.3f')})" if p else _f(v, "+.3f")  # noqa: E731
        rows = [[f"teacher {t['model_name']}", with_ci(t), f"{t['params'] / 1e6:.2f}M", f"{t['macs'] / 1e6:.1f}", "1.0", "", ""]]
        for name, r in rep["students"].items():
            rows.append([f"{name} (KD)", with_ci(r), f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e6:.1f}",
                         f"{r['mac_ratio']:.1f}×", paired(r.get("auroc_vs_teacher"), r.get("vs_teacher_paired")),
                         paired(r.get("kd_gain"), r.get("kd_gain_paired"))])
            if "no_kd" in r:
                rows.append([f"{name} (no KD, ablation)", with_ci(r["no_kd"]), "", "", "", "", ""])
        out += ["## Teacher vs students", "",
                "Same pooled test set; 95 % intervals from a bootstrap over the test images, paired (the same "
                "resamples for every model) for the differences. Goals: student ≥ teacher − 0.02 macro AUROC "
                "with ≥ 10× fewer MACs; distilled student better than the same student trained without the teacher.", ""]
        out += _table(["model", "macro AUROC (95 % CI)", "params", "MMACs", "MAC ratio", "vs teacher", "KD gain"], rows)
        out += ["", f"![teacher vs students]({_rel(Path(ev.distill_report).parent / 'distill_report.png', run)})", ""]


def _within_site_section(layout: RunLayout, results: RunResults, out: list[str]) -> None:
    ev = results.evaluate
    if not ev or not ev.per_site or not Path(ev.per_site).is_file():
        return
    rep = json.loads(Path(ev.per_site).read_text())
    holds = read_sites_summary(layout.sites)["settings"].get("column_values") or {}

    def cell(s: dict) -> str:
        parts = []
        if s.get("macro_auroc") is not None:
            parts.append(f"{_f(s['macro_auroc'])} ({_ci(s['macro_auroc_ci95'])}), {len(s['counted'])} label(s)")
        for c, v in s.get("sensitivity_only", {}).items():
            text = f"{c} sensitivity {_f(v['sensitivity'], '.2f')} ({v['positives']} pos., {v['negatives']} neg.)"
            if "at_specificity" in v:
                a = v["at_specificity"]
                text += f", {_f(a['sensitivity'], '.2f')} at {a['validation_specificity']:.0%} val. specificity"
            parts.append(text)
        return "; ".join(parts) or "too few"

    def abnormal(s: dict) -> str:
        a = s.get("abnormal_auroc")
        return f"{_f(a['auroc'])} ({_ci(a['ci95'])})" if a else "–"

    models = list(rep["models"])
    rows = []
    for site, per_model in rep["sites"].items():
        name = f"{site} ({', '.join(holds[site])})" if holds.get(site) else site
        if "skipped" in per_model:
            rows.append([name, "skipped", *[""] * (2 * len(models) - 1)])
            continue
        rows.append([name, *[cell(per_model[m]) for m in models], *[abnormal(per_model[m]) for m in models]])
    rows.append(["pooled (not within-site)", *[cell(rep["pooled"][m]) for m in models],
                 *[abnormal(rep["pooled"][m]) for m in models]])
    out += ["## Within-site test figures (primary)", "",
            "Each model on each site's own test split: macro AUROC over the labels that site knows with at least "
            "10 test positives and 10 negatives (95 % bootstrap interval over images); where a site's test split has "
            "(nearly) one class only, the sensitivity at the threshold chosen on validation; and normal vs abnormal (No Finding, "
            "scored by the most confident finding). A pooled AUROC across hospitals with different case mix can "
            "reward recognising the hospital: it is shown last, for reference.", ""]
    out += _table(["site", *[f"{m}: macro AUROC" for m in models], *[f"{m}: normal vs abnormal" for m in models]], rows)
    out += [""]
    if rep.get("per_site_models"):
        out += [f"FedBN: {', '.join(rep['per_site_models'])} scored at each site with that site's own model (the shared "
                "layers with the site's own BatchNorm, kept where its own validation was best); pooled, their "
                "predictions together.", ""]


def _export_section(layout: RunLayout, results: RunResults, out: list[str]) -> None:
    run, ex = layout.root, results.export
    if not ex:
        return
    rows = []
    for name, path in ex.manifests.items():
        m = ExportManifest.read(path)
        for f in m.files:
            file = Path(path).parent / f.file
            shown = f"`{_rel(file, run)}`" if file.is_file() else f"{f.file} (not kept)"
            rows.append([name, shown, f.format, _f(f.size_bytes / 1e6 if f.size_bytes is not None else None, ".2f") + " MB",
                         _f(f.latency_ms_b1_p50, ".2f"), _f(f.val_auroc), "yes" if f.kept else "no",
                         "★" if m.recommended == f.file else ""])
    out += ["## Exported models", "", "Latency: median batch-1 CPU ms (onnxruntime, this machine). ★: the file the "
            "manifest recommends.", ""]
    out += _table(["model", "file", "format", "size", "ms", "val AUROC", "kept", ""], rows)
    out += ["", f"Try it: `python -m fedxr.edge predict {ex.edge_model} IMAGE.png` (PNG, JPEG or DICOM).", ""]
    _trust_section(run, ex.manifests, out)


def _trust_section(run: Path, manifests: dict[str, str], out: list[str]) -> None:
    """Per exported model: calibration before/after, reliable findings, the OOD check, its model card."""
    rows, plots = [], []
    for name, path in manifests.items():
        m = ExportManifest.read(path)
        trust = m.trust
        if not trust:
            continue
        ece = trust["ece"].get("test") or trust["ece"]["val"]
        ood = trust["ood"]
        card = Path(path).parent / m.extra.get("model_card", "MODEL_CARD.md")
        rows.append([name, f"{_f(ece['macro_before'])} → {_f(ece['macro_after'])}",
                     f"{sum(p['reliable'] for p in trust['operating_points'])} of {len(trust['operating_points'])}",
                     f"{_f(ood['threshold'])} ({ood['quantile']:.0%} of validation)",
                     _f(ood.get("test_flagged"), ".1%"), f"`{_rel(card, run)}`"])
        plot = Path(path).parent / "reliability.png"
        if plot.is_file():
            plots.append(f"![calibration of {name}]({_rel(plot, run)})")
    if not rows:
        return
    out += ["## Calibration, operating points and the out-of-distribution check", "",
            "Fitted on validation at export (Platt scaling per finding; thresholds for "
            "the recipe's `export.operating_point`; an OOD score in the exported graph); test figures reported only.", ""]
    out += _table(["model", "macro ECE on test, before → after", "reliable findings", "OOD threshold",
                   "test images flagged", "model card"], rows)
    out += ["", *plots, ""]


def _explain_section(layout: RunLayout, results: RunResults, out: list[str]) -> None:
    run, ex = layout.root, results.explain
    if not ex:
        return
    pg = json.loads(Path(ex.pointing_game).read_text())
    out += ["## Where the models look (Grad-CAM)", "",
            f"Pointing game on {pg['boxes_scored']} ground-truth boxes: how often the heatmap's peak falls inside "
            "the box of the finding it explains. A random heatmap's expected score is the box's share of the image.", ""]
    classes = sorted({c for m in pg["models"].values() for c in m["per_class"]})
    def cam(m: dict) -> str:
        c = m.get("cam_layer")
        return f"`{c['layer']}` {c['cells']}×{c['cells']} ({c['chosen_on']})" if c else "—"

    rows = [[key, cam(m), _f(m["overall"]), _f(m["random_overall"]), _f(m.get("ceiling_overall")),
             f"{_f(m.get('margin_score_overall'))} ({_f(m.get('margin_random_overall'))})",
             f"{_f(m.get('energy_overall'))} ({_f(m['random_overall'])})",
             *[_f(m["per_class"].get(c, {}).get("score"), ".2f") for c in classes]] for key, m in pg["models"].items()]
    out += ["CAM layer: each model's stage whose heatmaps pointed best at the validation boxes (test boxes are "
            "scored only). Ceiling: what a perfect heatmap could score at the CAM's resolution (its peak sits on a cell centre). "
            "Within one cell: the peak at most one CAM cell outside the box (random in brackets). Energy: the share "
            "of the heatmap inside the box (a flat map: the box's share).", ""]
    out += _table(["model", "CAM layer", "overall", "random", "ceiling", "within one cell", "energy in box", *classes],
                  rows)
    out += ["", f"![Grad-CAM]({_rel(ex.grid, run)})", ""]


def _energy_section(layout: RunLayout, recipe: Recipe, results: RunResults, out: list[str]) -> Path | None:
    """The energy table (and RUN/energy.json): each training job, the total, per-site shares, federated
    vs local-only, and edge inference teacher vs student with the distillation break-even."""
    from fedxr import energy

    out += ["## Energy and emissions", ""]
    summary = energy.summarise(layout, recipe.energy_country) if recipe.energy_country else None
    if summary is None:
        out += ["Not tracked: `output.energy` is off for this run (or no training job ran).", ""]
        return None
    teacher = summary["jobs"].get("teacher (federated)", {})
    core_w = teacher["cpu_tdp_w"] / teacher["cpu_count"] if teacher.get("cpu_tdp_w") and teacher.get("cpu_count") else None
    students_wh = sum(v.get("energy_wh", 0.0) for k, v in summary["jobs"].items() if k.startswith("student "))
    if results.export:
        # The export timed batch 1 with onnxruntime's default threads: every core of this machine.
        summary["edge"] = energy.edge_comparison(results.export.manifests, core_w, students_wh or None,
                                                 cores=teacher.get("cpu_count") or 1)
    write_json_atomic(layout.energy, summary)
    methods: dict[str, str] = next((v["methods"] for v in summary["jobs"].values() if "methods" in v), {})
    out += [f"CodeCarbon offline tracker, machine mode (it covers the server and every site process on this machine); "
            f"grid {summary['country']}. How: CPU {methods.get('cpu', '–')}; GPU {methods.get('gpu', '–')}; "
            f"RAM {methods.get('ram', '–')}.", ""]
    rows = [[job, _f(v.get("energy_wh"), ".2f"), _f(v.get("cpu_wh"), ".2f"), _f(v.get("gpu_wh"), ".2f"),
             _f(v.get("ram_wh"), ".2f"), _f(v.get("emissions_g"), ".2f"), _f(v.get("seconds"), ".0f"),
             v.get("error", "")] for job, v in summary["jobs"].items()]
    t = summary["total"]
    rows.append(["**total**", _f(t["energy_wh"], ".2f"), _f(t["cpu_wh"], ".2f"), _f(t["gpu_wh"], ".2f"),
                 _f(t["ram_wh"], ".2f"), _f(t["emissions_g"], ".2f"), _f(t["seconds"], ".0f"), ""])
    out += _table(["training job", "Wh", "CPU Wh", "GPU Wh", "RAM Wh", "g CO2e", "s", "note"], rows) + [""]
    if summary.get("teacher_per_site"):
        out += ["Teacher energy per site, apportioned by each site's training and validation time:", ""]
        out += _table(["site", "share", "Wh"], [[s, f"{v['share']:.0%}", _f(v["energy_wh"], ".2f")]
                                               for s, v in summary["teacher_per_site"].items()]) + [""]
    fvl = summary.get("federated_vs_local")
    if fvl:
        out += [f"Federated teacher {fvl['federated_teacher_wh']:.2f} Wh vs local-only training at "
                f"{len(fvl['sites'])} site(s) for the same epochs {fvl['local_only_sum_wh']:.2f} Wh "
                f"(ratio {fvl['ratio']:.2f}).", ""]
    else:
        out += ["No local-only baselines in this run to compare the federation's energy with "
                "(`fedxr train RECIPE --mode local --site site-1`, for each site, adds them).", ""]
    edge = summary.get("edge")
    if edge:
        rows = [[k, v["file"], _f(v["latency_ms"], ".2f"), _f(v["wh_per_1000"], ".3g"),
                 f"{v['break_even_predictions']:,}" if v.get("break_even_predictions") else ""]
                for k, v in edge["per_1000_predictions"].items()]
        out += [f"Edge inference, per 1,000 predictions ({edge['basis']}); break-even: predictions after which the "
                "student's saving repays the energy of distilling it.", ""]
        out += _table(["model", "file", "batch-1 ms", "Wh per 1,000", "break-even"], rows) + [""]
    return layout.energy


def write_report(recipe: Recipe, results: RunResults) -> Path:
    layout = recipe.layout
    out = [f"# fedxr run report: {recipe.output.name}", "",
           f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Teacher `{recipe.model.name}`, "
           f"{recipe.federated.algorithm}{' + FedBN (one model per site)' if recipe.federated.fedbn else ''} × "
           f"{recipe.federated.rounds} rounds in `{recipe.federated.env}`; students "
           f"{', '.join(f'`{s}`' for s in recipe.distill.students) or 'none'}.", ""]
    from fedxr.data.provenance import describe, trained_on

    out += [f"Data: {describe(trained_on(recipe.resolved()))}.", ""]
    if results.seconds:
        out += ["Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results.seconds.items()), ""]
    _data_section(layout, out)
    _rounds_section(layout, results, out)
    _privacy_section(layout, recipe, out)
    _baselines_section(layout, out)
    _within_site_section(layout, results, out)
    _evaluate_section(layout, results, out)
    _export_section(layout, results, out)
    _explain_section(layout, results, out)
    _edge_section(layout, out)
    _energy_section(layout, recipe, results, out)
    out += ["## Resolved recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    path = layout.report
    write_text_atomic(path, "\n".join(out))
    return path
