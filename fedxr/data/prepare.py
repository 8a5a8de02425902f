"""Recipe-driven data preparation: the phantom set (if asked for) and the site manifests.

Training never prepares data itself; it reads the manifests written here and, when they are missing,
says which command writes them (`fedxr data prepare RECIPE`).
"""

from __future__ import annotations

import json
from pathlib import Path

from fedxr.config import Recipe
from fedxr.data.manifest import SUMMARY_FILE, build_site_manifests, format_summary, summarise, write_manifests
from fedxr.layout import read_sites_summary
from fedxr.data.nih import load_dataset
from fedxr.data.phantom import MARKER_FILE
from fedxr.errors import DataError


#: Sources read from a label file in the generic table form (fedxr.data.labelcsv, fedxr.data.formats).
TABLE_SOURCES = ("csv", "chexpert", "padchest", "vindr", "mimic")


def split_settings(recipe: Recipe) -> dict:
    d = recipe.data
    return {"root": str(Path(d.root).resolve()), "source": d.source, "labels_file": d.labels_file,
            "metadata_file": d.metadata_file, "boxes_file": d.boxes_file, "extra_columns": list(d.extra_columns),
            "uncertain": d.uncertain, "blank": d.blank, "vindr_rule": d.vindr_rule, "sites": d.sites, "scheme": d.scheme, "alpha": d.alpha,
            "column": d.column if d.scheme == "column" else None, "seed": d.seed, "val_fraction": d.val_fraction,
            "test_fraction": d.test_fraction, "min_site_patients": d.min_site_patients,
            "missing_images": d.missing_images}


def ensure_dataset(recipe: Recipe, progress: bool = True) -> tuple[Path, bool]:
    """Generate the phantom data set when the recipe asks for it and it is absent. Returns (root, made)."""
    root = Path(recipe.data.root)
    if recipe.data.source == "phantom" and (root / MARKER_FILE).is_file():
        stale = _stale_phantom(root, recipe)
        if not stale:
            return root, False
        # fedxr made this folder (its marker file says so), so it may replace it; real data is never touched.
        print(f"{root}: phantom data made with other settings ({stale}); generating it again")
        _generate(recipe, root, progress, force=True)
        return root, True
    if recipe.data.source in TABLE_SOURCES:
        labels = root / (recipe.data.labels_file or "labels.csv")
        if not labels.is_file():
            raise DataError(f"{labels}: label file not found; set data.root to the data set's folder and "
                            "data.labels_file to its label file (relative to data.root)")
        return root, False
    if (root / "Data_Entry_2017.csv").is_file() or any(root.glob("Data_Entry_2017*")) or (root / "sample_labels.csv").is_file():
        return root, False
    if recipe.data.source != "phantom":
        raise DataError(f"{root}: no NIH label file; put ChestX-ray14 there (see README, 'Using real NIH data') "
                        "or set data.root=... to where it is")
    _generate(recipe, root, progress)
    return root, True


def _generate(recipe: Recipe, root: Path, progress: bool, force: bool = False) -> None:
    from fedxr.data.phantom import generate_phantom

    ph = recipe.data.phantom
    generate_phantom(root, patients=ph.patients, hospitals=ph.hospitals, size=ph.size, seed=ph.seed,
                     progress=progress, force=force)


def _stale_phantom(root: Path, recipe: Recipe) -> str:
    """What differs between the phantom set in ``root`` and the recipe's (empty: nothing)."""
    from fedxr.data.phantom import GENERATOR

    try:
        made = json.loads((root / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return f"unreadable {MARKER_FILE}"
    if made.get("generator") != GENERATOR:
        return f"generator {made.get('generator')!r}, now {GENERATOR!r}"
    have, want = made.get("settings", {}), recipe.data.phantom.model_dump()
    return ", ".join(f"{k} {have.get(k)} → {v}" for k, v in want.items() if have.get(k) != v)


def ensure_sites(recipe: Recipe, force: bool = False) -> tuple[Path, bool]:
    """Write the site manifests unless ones with the same settings exist. Returns (folder, written)."""
    folder = recipe.layout.sites
    settings = split_settings(recipe)
    if (folder / SUMMARY_FILE).is_file() and not force:
        old = read_sites_summary(folder).get("settings", {})
        if {k: old.get(k) for k in settings} == settings:
            return folder, False
    dataset = load_recipe_dataset(recipe)
    d = recipe.data
    manifests, details = build_site_manifests(
        dataset, d.sites, d.scheme, seed=d.seed, alpha=d.alpha, column=d.column, val_fraction=d.val_fraction,
        test_fraction=d.test_fraction, min_size=d.min_site_patients,
    )
    write_manifests(folder, manifests, {**settings, **details}, force=True)
    print(format_summary(summarise(manifests)))
    return folder, True


def load_recipe_dataset(recipe: Recipe):
    """The recipe's data set as one image table (NIH layout, a labels CSV, or a public data set's label file)."""
    d = recipe.data
    if d.source not in TABLE_SOURCES:
        return load_dataset(d.root, missing=d.missing_images)
    from fedxr.data.labelcsv import dataset_from_table, read_labels_csv

    root = Path(d.root)
    label_file = root / (d.labels_file or "labels.csv")
    if d.source == "csv":
        table = read_labels_csv(label_file, tuple(d.extra_columns))
    else:
        from fedxr.data.formats import read_format

        table = read_format(d.source, label_file, metadata_file=root / d.metadata_file if d.metadata_file else None,
                            uncertain=d.uncertain, blank=d.blank, vindr_rule=d.vindr_rule)
    site_column = d.column if d.scheme == "column" else None
    return dataset_from_table(table, root, label_file, missing=d.missing_images, site_column=site_column,
                              boxes_file=d.boxes_file)


def require_sites(recipe: Recipe, recipe_path: str | Path | None = None) -> Path:
    """The manifest folder, or a DataError naming the command that prepares it."""
    folder = recipe.layout.sites
    if not (folder / SUMMARY_FILE).is_file():
        raise DataError(f"{folder}: no site manifests yet; run `fedxr data prepare {recipe_path or 'RECIPE'}` first")
    return folder
