"""The per-round records sites write in simulation and POC (one JSON line per site and round), and the
round table built from them. Plain Python: the console reads them while a run is still going."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path


#: The records subfolder where each site's outgoing audit (fedxr.privacy.audit) writes ``SITE.jsonl``.
OUTGOING = "outgoing"


def record_file(site: str, rank: int = 0) -> str:
    """A site's records file: ``SITE.jsonl`` from its rank 0 (the process that talks to NVFlare), and
    ``SITE.rankN.jsonl`` from each further DDP rank (each rank appends to its own file)."""
    return f"{site}.jsonl" if rank == 0 else f"{site}.rank{rank}.jsonl"


def read_records(records: Path, every_rank: bool = False) -> list[dict]:
    """Every site's records in a folder; a line being written right now is skipped. By default one record
    per site and round (rank 0's: it holds the site's validation score, steps and timings); with
    ``every_rank`` also those of a site's further DDP ranks."""
    rows = []
    for path in sorted(records.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the site is appending this line as we read
            if every_rank or row.get("rank", 0) == 0:
                rows.append(row)
    return rows


def round_table(rows: list[dict], cross_site: dict | None) -> list[dict]:
    """Per round: each site's validation AUROC of the received global model, the val-size-weighted
    aggregate, the round's wall time (first receive to the next round's first receive, or to the last
    send for the final round) and each site's own training time."""
    by_round: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        if isinstance(r.get("round"), int):
            by_round[r["round"]].append(r)
    rounds = sorted(by_round)
    table = []
    for i, rnd in enumerate(rounds):
        recs = by_round[rnd]
        start = min(r["t_receive"] for r in recs)
        end = min(r["t_receive"] for r in by_round[rounds[i + 1]]) if i + 1 < len(rounds) else max(r["t_trained"] for r in recs)
        for r in recs:  # a site whose validation split has one class only has no AUROC: None, never NaN
            if r["val_auroc"] is not None and math.isnan(r["val_auroc"]):
                r["val_auroc"] = None
        scored = [r for r in recs if r["val_auroc"] is not None]
        weight = sum(r["val_images"] for r in scored)
        agg = sum(r["val_auroc"] * r["val_images"] for r in scored) / weight if weight else None
        wall = end - start
        site_train = max(r["train_s"] + r["validate_s"] for r in recs)
        table.append({
            "round": rnd, "aggregate_val_auroc": agg, "wall_s": round(wall, 3),
            "overhead_share": round(max(0.0, 1 - site_train / wall), 4) if wall > 0 else None,
            "sites": {r["site"]: {"val_auroc": r["val_auroc"], "train_s": round(r["train_s"], 3),
                                  "validate_s": round(r["validate_s"], 3), "steps": r["steps"],
                                  "precision": r.get("precision")} for r in recs},
        })
    if cross_site:
        last = {site: scores.get("global (last)") for site, scores in cross_site["by_data_site"].items()}
        table.append({"round": "final", "note": "last global model, scored by each site after training",
                      "sites": {s: {"val_auroc": v} for s, v in last.items()}})
    return table
