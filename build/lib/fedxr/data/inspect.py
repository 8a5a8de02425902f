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


def inspect_path(path: str | Path) -> dict:
    """Statistics for a data folder, a label CSV or a bounding-box CSV (as a JSON-ready dict)."""
    path = Path(path)
    if path.is_file() and _is_bbox_file(path):
        return {"path": str(path), "kind": "bbox_list", **_box_stats(read_bbox_list(path))}
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


def format_stats(stats: dict) -> str:
    lines = [f"{stats['path']}"]
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
