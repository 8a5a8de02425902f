"""What a model was trained on, recorded in every checkpoint, ONNX file and export manifest.

A model trained on fedxr's synthetic phantom must never be mistaken for one trained on radiographs, and a
model trained where nobody labelled Emphysema must say it cannot find it. Torch-free: the edge runtime and
the console read the same record.
"""

from __future__ import annotations

from typing import Any, Mapping

from fedxr.labels import LABELS

#: Shown wherever a synthetic-data model's predictions are shown.
SYNTHETIC_WARNING = "trained on synthetic data — not for diagnosis"


def trained_on(resolved_recipe: Mapping[str, Any]) -> dict:
    """The data record of a run, from its resolved recipe and (when written) its sites summary."""
    from fedxr.layout import SITES_SUMMARY_FILE, RunLayout, read_sites_summary

    data = resolved_recipe.get("data") or {}
    source = data.get("source", "unknown")
    record: dict[str, Any] = {"data_source": source, "synthetic": source == "phantom", "root": data.get("root"),
                              "labels": list(LABELS)}
    layout = RunLayout.of_resolved(resolved_recipe)
    if layout is None or not (layout.sites / SITES_SUMMARY_FILE).is_file():
        return record
    try:
        summary = read_sites_summary(layout.sites)
    except Exception:  # a record is informative, never a reason for a save to fail
        return record
    holds = summary.get("settings", {}).get("column_values") or {}
    sites = {}
    known: set[str] = set()
    for s in summary.get("sites", []):
        sites[s["site"]] = {"images": s["images"], "train": s["train"], "holds": holds.get(s["site"], []),
                            "sources": s.get("sources", [])}
        counts = s.get("labels") or {}
        known |= {lab for lab, c in counts.items() if c["positive"] + c["negative"] > 0} if counts else set(LABELS)
    record["sites"] = sites
    record["images"] = sum(s["images"] for s in sites.values())
    record["trained_labels"] = [lab for lab in LABELS if lab in known]
    record["untrained_labels"] = [lab for lab in LABELS if lab not in known]
    return record


def describe(record: Mapping[str, Any] | None) -> str:
    """One line for people: what the model was trained on (and the synthetic-data warning)."""
    if not record:
        return "training data not recorded (a model exported by an older fedxr)"
    sites = record.get("sites") or {}
    where = ", ".join(f"{name}{' (' + ', '.join(v['holds']) + ')' if v.get('holds') else ''} {v['images']}"
                      for name, v in sites.items())
    text = f"trained on {record.get('data_source')} data" + (f": {record.get('images')} images at {where}" if sites else "")
    if record.get("untrained_labels"):
        text += f"; never labelled, so not trained: {', '.join(record['untrained_labels'])}"
    if record.get("synthetic"):
        text += f" — {SYNTHETIC_WARNING.upper()}"
    return text
