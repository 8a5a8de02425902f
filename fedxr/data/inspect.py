"""`fedxr data inspect`: counts that let a user check a data set against what they expect."""

from __future__ import annotations

import csv
from pathlib import Path

from fedxr.data.nih import _open_text, load_dataset, read_bbox_list
from fedxr.labels import LABELS, NO_FINDING


def _box_stats(boxes) -> dict:
    return {
        "boxes": int(len(boxes)),
        "boxed_images": int(boxes["image"].nunique()),
        "boxes_per_class": {k: int(v) for k, v in boxes["label"].value_counts().sort_index().items()},
    }


def _is_bbox_file(path: Path) -> bool:
    with _open_text(path) as fh:
        header = next(csv.reader([fh.readline()]), [])
    return len(header) > 1 and header[1].strip() == "Finding Label"


def _group_stats(rows) -> dict:
    from fedxr.data.manifest import label_counts

    return {"images": int(len(rows)), "patients": int(rows["patient_id"].nunique()),
            "views": {str(k): int(v) for k, v in rows["view"].value_counts().items() if k},
            "labels": label_counts(rows)}


def inspect_labels_csv(path: Path) -> dict:
    """Per source and site of a labels CSV: images, patients, views, and per label positives / negatives /
    unknown (the source never labelled it)."""
    from fedxr.data.labelcsv import load_labels_dataset

    label_file = path / "labels.csv" if path.is_dir() else path
    ds = load_labels_dataset(path, missing="ignore")
    t = ds.table
    keys = [c for c in ("source", "site") if c in t]
    groups = {" / ".join(map(str, k if isinstance(k, tuple) else (k,))): _group_stats(g)
              for k, g in t.groupby(keys, sort=True)} if keys else {}
    return {"path": str(path), "kind": "labels_csv", "label_file": str(label_file), **_group_stats(t),
            "images_missing": len(ds.missing), "first_missing": ds.missing[:5], "groups": groups,
            "grouped_by": keys}


def inspect_path(path: str | Path) -> dict:
    """Statistics for a data folder, a label CSV or a bounding-box CSV (as a JSON-ready dict)."""
    path = Path(path)
    if path.is_file() and _is_bbox_file(path):
        return {"path": str(path), "kind": "bbox_list", **_box_stats(read_bbox_list(path))}
    from fedxr.data.labelcsv import is_labels_csv

    if is_labels_csv(path):
        return inspect_labels_csv(path)
    ds = load_dataset(path, missing="ignore")
    t = ds.table
    stats = {
        "path": str(path),
        "kind": "dataset",
        "label_file": str(ds.label_file),
        "images": int(len(t)),
        "patients": int(t["patient_id"].nunique()),
        "label_counts": {lab: int(t[lab].sum()) for lab in LABELS},
        "no_finding": int((t[list(LABELS)].sum(axis=1) == 0).sum()),
        "views": {k: int(v) for k, v in t["view"].value_counts().items() if k},
        "images_on_disk": int((t["path"] != "").sum()),
        "images_missing": len(ds.missing),
        "first_missing": ds.missing[:5],
    }
    if "official_split" in t:
        stats["official_split"] = {k: int(v) for k, v in t["official_split"].value_counts().items() if k}
    if ds.boxes is not None:
        stats.update(_box_stats(ds.boxes))
    return stats


def _format_group(name: str, g: dict) -> list[str]:
    known = [f"{lab} {c['positive']}/{c['negative']}/{c['unknown']}" for lab, c in g["labels"].items()
             if c["unknown"] < g["images"]]
    never = [lab for lab, c in g["labels"].items() if c["unknown"] == g["images"]]
    return [f"  {name}: {g['images']:,} images, {g['patients']:,} patients; views "
            + (", ".join(f"{k} {v:,}" for k, v in g["views"].items()) or "–"),
            "    labels (positive/negative/unknown): " + ", ".join(known),
            "    never labelled: " + (", ".join(never) or "–")]


def format_stats(stats: dict) -> str:
    lines = [f"{stats['path']}"]
    if stats["kind"] == "labels_csv":
        lines.append(f"  label file {stats['label_file']}")
        lines += _format_group("all", stats)
        lines += [line for name, g in stats["groups"].items() for line in _format_group(name, g)]
        if stats["images_missing"]:
            lines.append(f"  missing on disk: {stats['images_missing']:,} (first: {', '.join(stats['first_missing'])})")
        return "\n".join(lines)
    if stats["kind"] == "dataset":
        lines += [
            f"  label file      {stats['label_file']}",
            f"  images          {stats['images']:,}",
            f"  patients        {stats['patients']:,}",
            f"  {NO_FINDING:<15} {stats['no_finding']:,}",
            "  findings:",
        ]
        lines += [f"    {lab:<20}{n:>9,}" for lab, n in stats["label_counts"].items()]
        lines.append("  views           " + ", ".join(f"{k} {v:,}" for k, v in stats["views"].items()))
        if "official_split" in stats:
            lines.append("  official split  " + ", ".join(f"{k} {v:,}" for k, v in stats["official_split"].items()))
        lines.append(f"  on disk         {stats['images_on_disk']:,} of {stats['images']:,} listed images")
        if stats["images_missing"]:
            lines.append(f"  missing         {stats['images_missing']:,} (first: {', '.join(stats['first_missing'])})")
    if "boxes" in stats:
        lines.append(f"  boxes           {stats['boxes']:,} on {stats['boxed_images']:,} images")
        lines += [f"    {lab:<20}{n:>9,}" for lab, n in stats["boxes_per_class"].items()]
    return "\n".join(lines)
