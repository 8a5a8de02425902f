"""Site manifests: one CSV per site listing its images with their split and labels.

A manifest is what a site's training reads. ``fedxr data split`` writes ``site-1.csv … site-K.csv``
and ``sites.json`` (the settings and a summary) into one folder. In simulation the folder holds every
site; in POC/production each hospital keeps only its own manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedxr.data import sites as S
from fedxr.data.atomic import atomic_dir
from fedxr.data.nih import NIHDataset
from fedxr.edge.model import sha256_of
from fedxr.errors import DataError
from fedxr.labels import LABELS, NO_FINDING
from fedxr.layout import SITES_SUMMARY_FILE as SUMMARY_FILE

MANIFEST_COLUMNS = ("image", "path", "patient_id", "split", "findings")
SPLITS = ("train", "val", "test")


def patient_table(table: pd.DataFrame, column: str | None = None) -> pd.DataFrame:
    """One row per patient: ``patient_id``, label columns (positive in any image), ``n_images``,
    and ``column`` (the patient's most frequent value, ties broken alphabetically) when given."""
    grouped = table.groupby("patient_id", sort=True)
    out = grouped[list(LABELS)].max()
    out["n_images"] = grouped.size()
    if column:
        if column not in table.columns:
            raise DataError(
                f"column {column!r} not found; available columns: {', '.join(c for c in table.columns if c not in LABELS)}. "
                f"Name the column that holds each patient's site (--column / data.column), or split without one "
                f"(--scheme iid / data.scheme: iid: random patient-wise sites)"
            )
        mode = (
            table.assign(_v=table[column].astype(str))
            .groupby(["patient_id", "_v"]).size().reset_index(name="n")
            .sort_values(["patient_id", "n", "_v"], ascending=[True, False, True])
            .drop_duplicates("patient_id").set_index("patient_id")["_v"]
        )
        out[column] = mode
    return out.reset_index()


def assign_sites(
    table: pd.DataFrame, num_sites: int, scheme: str, seed: int, alpha: float = 0.5,
    column: str | None = None, min_size: int = 1,
) -> tuple[dict[int, int], dict]:
    """Map each patient id to a site index with the named scheme; also return scheme details."""
    if scheme not in S.SCHEMES:
        raise DataError(f"unknown split scheme {scheme!r}; choose one of {', '.join(S.SCHEMES)}")
    patients = patient_table(table, column if scheme == "column" else None)
    ids = patients["patient_id"].to_numpy()
    details: dict = {}
    if scheme == "iid":
        assign = S.partition_iid(ids, num_sites, seed, min_size)
    elif scheme == "quantity":
        assign = S.partition_quantity(ids, num_sites, seed, alpha, min_size)
    elif scheme == "dirichlet":
        # An unknown label (NaN) counts as not positive when drawing label-skewed sites.
        assign = S.partition_dirichlet(ids, np.nan_to_num(patients[list(LABELS)].to_numpy(dtype=float)), num_sites,
                                       seed, alpha, min_size)
    else:
        if not column:
            raise DataError("scheme 'column' needs --column NAME (e.g. --column hospital)")
        assign, groups = S.partition_column(ids, patients[column].to_numpy(), num_sites, min_size)
        details["column_values"] = {name: g for name, g in zip(S.site_names(num_sites), groups)}
    return dict(zip(ids.tolist(), assign.tolist())), details


def assign_splits(site_table: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """train/val/test per row of one site, patient-wise. The official NIH test list wins when present;
    the remaining (train_val) patients are split into train and val by ``val_fraction``."""
    pids = site_table["patient_id"].to_numpy()
    uniq = np.unique(pids)
    if "official_split" in site_table and (site_table["official_split"] != "").any():
        test_pat = set(site_table.loc[site_table["official_split"] == "test", "patient_id"])
        rest = np.array([p for p in uniq if p not in test_pat])
        rest_split = S.split_patients(rest, val_fraction, 0.0, seed) if len(rest) else np.array([])
        lookup = {p: "test" for p in test_pat} | dict(zip(rest.tolist(), rest_split.tolist()))
    else:
        lookup = dict(zip(uniq.tolist(), S.split_patients(uniq, val_fraction, test_fraction, seed).tolist()))
    return np.array([lookup[p] for p in pids], dtype=object)


def build_site_manifests(
    dataset: NIHDataset, num_sites: int, scheme: str, seed: int = 0, alpha: float = 0.5,
    column: str | None = None, val_fraction: float = 0.15, test_fraction: float = 0.2, min_size: int = 1,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Partition a data set into ``num_sites`` manifests (patient-disjoint across sites and splits)."""
    table = dataset.table
    if len(table) == 0:
        raise DataError(f"{dataset.root}: the data set has no images to split")
    site_of, details = assign_sites(table, num_sites, scheme, seed, alpha, column, min_size)
    site_idx = table["patient_id"].map(site_of).to_numpy()
    manifests: dict[str, pd.DataFrame] = {}
    for i, name in enumerate(S.site_names(num_sites)):
        rows = table[site_idx == i].copy()
        if rows.empty:
            raise DataError(f"{name} would be empty; use fewer sites or another scheme")
        rows["split"] = assign_splits(rows, val_fraction, test_fraction, seed + 1000 * (i + 1))
        keep = (list(MANIFEST_COLUMNS) + [c for c in ("view", "sex", "age", "source", "site", column) if c and c in rows]
                + list(LABELS) + ([NO_FINDING] if NO_FINDING in rows else []))
        manifests[name] = rows[list(dict.fromkeys(keep))].sort_values("image").reset_index(drop=True)
    all_rows = pd.concat(manifests.values())
    S.assert_patient_disjoint(
        all_rows["patient_id"].tolist(),
        [f"{s}/{sp}" for s, sp in zip(np.repeat(list(manifests), [len(m) for m in manifests.values()]), all_rows["split"])],
        "site/split",
    )
    return manifests, details


def label_counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per label: known positives, known negatives and unknown images (NaN = the source never labelled it)."""
    out = {}
    for lab in LABELS:
        v = frame[lab].to_numpy(dtype=float)
        out[lab] = {"positive": int((v == 1).sum()), "negative": int((v == 0).sum()), "unknown": int(np.isnan(v).sum())}
    return out


def summarise(manifests: dict[str, pd.DataFrame]) -> list[dict]:
    """Per site: patients, images per split, label prevalence (fraction of the images whose label is known, over
    all splits; None where no image's label is known), and per label the known positives / negatives / unknown."""
    rows = []
    for name, m in manifests.items():
        row = {"site": name, "patients": int(m["patient_id"].nunique()), "images": len(m)}
        for sp in SPLITS:
            row[sp] = int((m["split"] == sp).sum())
        counts = label_counts(m)
        row["prevalence"] = {lab: (round(c["positive"] / (c["positive"] + c["negative"]), 4)
                                   if c["positive"] + c["negative"] else None) for lab, c in counts.items()}
        if NO_FINDING in m:
            row["no_finding"] = round(float((m[NO_FINDING].to_numpy(dtype=float) == 1).mean()), 4)
        else:
            row["no_finding"] = round(float((m[list(LABELS)].sum(axis=1) == 0).mean()), 4)
        row["labels"] = counts
        row["unknown_labels"] = [lab for lab, c in counts.items() if c["unknown"] == len(m)]
        if "source" in m:
            row["sources"] = sorted(m["source"].astype(str).unique().tolist())
        rows.append(row)
    return rows


def write_manifests(out: str | Path, manifests: dict[str, pd.DataFrame], settings: dict, force: bool = False) -> Path:
    """Write ``site-N.csv`` files and ``sites.json`` atomically into ``out``."""
    with atomic_dir(out, replace=force, replace_if=SUMMARY_FILE) as tmp:
        for name, m in manifests.items():
            m.to_csv(tmp / f"{name}.csv", index=False)
        rows = summarise(manifests)
        for row in rows:  # what read_manifest checks each site's file against
            row["sha256"] = sha256_of(tmp / f"{row['site']}.csv")
        summary = {"settings": settings, "sites": rows}
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return Path(out)


def _check_digest(path: Path) -> None:
    """A manifest written by :func:`write_manifests` must be the file written: its SHA-256 is in ``sites.json``
    beside it. (A manifest with no ``sites.json`` beside it, or one written before the digests, is read as it is.)"""
    summary = path.parent / SUMMARY_FILE
    if not summary.is_file():
        return
    fix = ("write the manifests again: `fedxr data split ROOT --out FOLDER --force` (a hospital), or `fedxr data "
           "prepare RECIPE --force` / `fedxr run RECIPE --from sites` (a recipe's run)")
    try:
        rows = json.loads(summary.read_text()).get("sites", [])
    except (OSError, ValueError, AttributeError):
        raise DataError(f"{summary}: unreadable, so {path.name} cannot be checked against it; {fix}") from None
    expected = next((r.get("sha256") for r in rows if isinstance(r, dict) and r.get("site") == path.stem), None)
    if expected and sha256_of(path) != expected:
        raise DataError(f"{path}: not the site manifest that was written (its SHA-256 differs from {summary}); {fix}")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read one site manifest, checking its digest (where ``sites.json`` lists one) and its columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: site manifest not found; create manifests with `fedxr data split ROOT --out DIR`")
    _check_digest(path)
    frame = pd.read_csv(path, dtype={"image": str, "path": str, "split": str, "findings": str}, keep_default_na=False)
    missing = [c for c in (*MANIFEST_COLUMNS, *LABELS) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: not a fedxr site manifest (missing column(s) {', '.join(missing)})")
    if frame.empty:
        raise DataError(f"{path}: the site manifest has no rows; this site has no data")
    for column in (*LABELS, NO_FINDING):
        if column in frame:
            frame[column] = _label_column(frame[column], path, column)
    return frame


def _label_column(raw: pd.Series, path: Path, column: str) -> pd.Series:
    """A manifest's label column as float: 1 / 0, blank = unknown (NaN). Anything else names its line."""
    text = raw.astype(str).str.strip()
    values = pd.to_numeric(text.replace("", "nan"), errors="coerce")
    bad = ~(values.isin([0.0, 1.0]) | (text == ""))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}, line {i + 2}, column {column!r}: label {text.iat[i]!r} is not 1, 0 or blank (unknown)")
    return values.astype(float)


def site_manifest_paths(folder: str | Path) -> dict[str, Path]:
    """``{site name: manifest path}`` for a folder written by :func:`write_manifests`."""
    folder = Path(folder)
    paths = {p.stem: p for p in sorted(folder.glob("site-*.csv"))}
    if not paths:
        raise DataError(f"{folder}: no site manifests (site-*.csv); run `fedxr data split ROOT --out {folder}`")
    return paths


def format_summary(rows: list[dict]) -> str:
    """A plain-text table of per-site sizes and label prevalence (percent)."""
    short = [lab[:5] for lab in LABELS]
    head = f"{'site':<8}{'pat':>6}{'img':>7}{'train':>7}{'val':>6}{'test':>6}{'NoF%':>6} " + " ".join(f"{s:>5}" for s in short)
    lines = [head, "-" * len(head)]
    for r in rows:
        prev = " ".join(f"{100 * r['prevalence'][lab]:5.1f}" if r["prevalence"][lab] is not None else "    ?"
                        for lab in LABELS)
        lines.append(
            f"{r['site']:<8}{r['patients']:>6}{r['images']:>7}{r['train']:>7}{r['val']:>6}{r['test']:>6}"
            f"{100 * r['no_finding']:6.1f} {prev}"
        )
    return "\n".join(lines)
