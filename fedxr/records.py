"""The per-round records sites write in simulation and POC (one JSON line per site and round), and the
round table built from them. Plain Python: the console reads them while a run is still going.

Each line carries ``sha``, a digest of the rest of the line: a line altered after it was written (a flipped
bit, a hand edit) or cut in the middle of a file is an error naming the file and line, never a round table
built from wrong numbers. Only the last line of a file may be incomplete (a site is appending it as we read);
it is skipped. A folder fedxr starts for a run (:func:`start_records`) holds a marker that makes the digest
mandatory, so stripping it does not pass either; files elsewhere written before the digest existed are read as
they are. The sites' outgoing audit (fedxr.privacy.audit) writes and reads its lines the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedxr.errors import FedxrError


#: The records subfolder where each site's outgoing audit (fedxr.privacy.audit) writes ``SITE.jsonl``.
OUTGOING = "outgoing"
#: A file in a records folder that says every line in it carries its digest.
DIGESTS_REQUIRED = ".digests-required"


def record_file(site: str, rank: int = 0) -> str:
    """A site's records file: ``SITE.jsonl`` from its rank 0 (the process that talks to NVFlare), and
    ``SITE.rankN.jsonl`` from each further DDP rank (each rank appends to its own file)."""
    return f"{site}.jsonl" if rank == 0 else f"{site}.rank{rank}.jsonl"


class RecordsError(FedxrError):
    """A records line that was altered or cut after it was written."""


def _digest(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16]


def start_records(folder: Path) -> None:
    """A fresh records folder whose every line (its outgoing-audit subfolder's too) must carry its digest."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DIGESTS_REQUIRED).touch()


def append_line(path: Path, row: dict[str, Any]) -> None:
    """Append one record (with its digest) and put it on disk before returning: a crash right after loses
    nothing that was reported as written."""
    row = json.loads(json.dumps(row))  # the digest is of the row as a reader will parse it (keys become strings)
    with open(path, "a") as fh:
        fh.write(json.dumps({**row, "sha": _digest(row)}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete record of one file, each checked against its digest (RecordsError names the line). A line
    cut in the middle of a file (its writer killed, then more lines appended) is an error too: that record is
    lost, and what was built from the file would be missing it."""
    required = any((folder / DIGESTS_REQUIRED).is_file() for folder in (path.parent, path.parent.parent))
    text = path.read_text()
    lines = text.splitlines()
    rows: list[tuple[int, Any, dict[str, Any]]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) and not text.endswith("\n"):
                continue  # the last line, still being appended as we read
            raise RecordsError(f"{path}, line {i}: not a complete record (the file was cut or altered after it was "
                               "written); rerun the stage that wrote it") from None
        if not isinstance(row, dict):
            raise RecordsError(f"{path}, line {i}: not a record object; rerun the stage that wrote it")
        sha = row.pop("sha", None)
        if sha is not None and sha != _digest(row):
            raise RecordsError(f"{path}, line {i}: changed since it was written (its digest differs); rerun the "
                               "stage that wrote it")
        rows.append((i, sha, row))
    # Lines without a digest are read only from a file written before digests existed (none of its lines has one).
    if required or any(sha for _, sha, _ in rows):
        bare = next((i for i, sha, _ in rows if sha is None), None)
        if bare is not None:
            raise RecordsError(f"{path}, line {bare}: has no digest, which every line here must have (changed since "
                               "it was written); rerun the stage that wrote it")
    return [row for _, _, row in rows]


def keep_rounds_before(records: Path, first: int) -> None:
    """Cut a run's records (and its outgoing audit's) back to the rounds before ``first``: a resumed federation
    writes the rest again. Each file is rewritten atomically, its lines with their digests."""
    from fedxr.data.atomic import write_text_atomic

    for path in sorted(records.glob("*.jsonl")) + sorted((records / OUTGOING).glob("*.jsonl")):
        rows = [row for row in read_lines(path) if isinstance(row.get("round"), int) and row["round"] < first]
        write_text_atomic(path, "".join(json.dumps({**row, "sha": _digest(row)}) + "\n" for row in rows))


def read_records(records: Path, every_rank: bool = False) -> list[dict]:
    """Every site's records in a folder; a line being written right now is skipped. By default one record
    per site and round (rank 0's: it holds the site's validation score, steps and timings); with
    ``every_rank`` also those of a site's further DDP ranks."""
    rows = []
    for path in sorted(records.glob("*.jsonl")):
        rows += [row for row in read_lines(path) if every_rank or row.get("rank", 0) == 0]
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
