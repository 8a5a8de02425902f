"""Shared fixtures. Real NIH metadata and images come from ../shared/data/nih (beside the project);
plain helpers are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import SHARED_NIH, V2020, real_rows, write_nih_images


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
