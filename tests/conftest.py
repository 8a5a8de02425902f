"""Shared fixtures. Real NIH metadata and images come from ../shared/data/nih (beside the project);
plain helpers are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CONSOLE_PASSWORD, QUICKSTART, SHARED_NIH, V2020, console_overrides, real_rows, write_nih_images


#: Markers whose tests run only when the -m expression names them (deselected, not skipped, otherwise):
#: arm64 — the ARM64 check (root, debootstrap, a kernel-wide binfmt_misc registration, minutes);
#: bench — the slowest benchmarks' smoke runs (1.5-2.5 min each), whose fedxr paths other tests run.
OPT_IN = ("arm64", "bench")


def pytest_collection_modifyitems(config, items):
    """`pytest` (CI, `make test`) leaves the opt-in tests out; `pytest -m arm64` or `pytest -m bench` runs them."""
    named = [m for m in OPT_IN if m in (config.option.markexpr or "")]
    left_out = [item for item in items if any(item.get_closest_marker(m) for m in OPT_IN if m not in named)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]


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


@pytest.fixture(scope="session")
def console_run(tmp_path_factory):
    """A finished tiny run (2 sites, 2 rounds, exported, explained) and a console database with a
    coordinator and a hospital user: what the console tests look at."""
    pytest.importorskip("fastapi", reason="the console extra is not installed: pip install -e '.[console]'")
    from fedxr.cli import main
    from fedxr.console.store import Store

    tmp = tmp_path_factory.mktemp("console")
    overrides = console_overrides(tmp)
    assert main(["run", str(QUICKSTART), *overrides]) == 0
    store = Store(tmp / "console.sqlite")
    store.add_user("carol", "coordinator", CONSOLE_PASSWORD)
    store.add_user("hana", "hospital", CONSOLE_PASSWORD, site="site-1")
    return {"tmp": tmp, "runs": tmp / "runs", "exports": tmp / "export", "db": tmp / "console.sqlite",
            "overrides": overrides}
