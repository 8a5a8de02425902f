"""Shared fixtures. Real NIH metadata and images come from ../shared/data/nih (beside the project)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_NIH = (ROOT / ".." / "shared" / "data" / "nih").resolve()
V2020 = SHARED_NIH / "Data_Entry_2017_v2020.csv.gz"
BBOX = SHARED_NIH / "BBox_List_2017.csv.gz"

needs_shared = pytest.mark.skipif(
    not V2020.is_file(), reason=f"real NIH metadata not found at {SHARED_NIH} (the shared/ folder beside the project)"
)


def real_rows(n: int) -> tuple[str, list[str]]:
    """The real v2020 header line and its first ``n`` data lines."""
    with gzip.open(V2020, "rt") as fh:
        lines = fh.read().splitlines()
    return lines[0], lines[1 : n + 1]


def write_nih_images(root: Path, names: list[str], size: int = 64) -> None:
    """Write one PNG per name under root/images_001/images/, each a real NIH image (resized) plus a
    little name-seeded noise so that no two files are identical."""
    base = np.asarray(Image.open(SHARED_NIH / "00000001_000.png").convert("L").resize((size, size)), dtype=np.int16)
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        noise = np.random.default_rng(i).integers(-8, 9, size=base.shape)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / name)


@pytest.fixture(scope="session")
def mini_nih(tmp_path_factory) -> Path:
    """A small NIH-layout data set: the first 120 real v2020 rows, with a PNG for each on disk."""
    if not V2020.is_file():
        pytest.skip(f"real NIH metadata not found at {SHARED_NIH}")
    root = tmp_path_factory.mktemp("mini_nih")
    header, rows = real_rows(120)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join([header, *rows]) + "\n")
    write_nih_images(root, [r.split(",")[0] for r in rows])
    return root


def tiny_recipe_overrides(tmp: Path, patients: int = 60, extra: tuple[str, ...] = ()) -> list[str]:
    """Overrides that shrink the quickstart recipe to test size (phantom at 48 px, 32 px training)."""
    return [
        f"data.root={tmp / 'phantom'}", f"data.phantom.patients={patients}", "data.phantom.size=48",
        "data.image_size=32", "data.batch_size=16", "data.num_workers=0", f"data.cache_dir={tmp / 'cache'}",
        "model.name=tiny_cnn", "model.max_epochs=1", f"output.runs_dir={tmp / 'runs'}", "output.name=t",
        *extra,
    ]
