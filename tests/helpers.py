"""Helpers shared by the tests (paths, data builders, recipe overrides). Fixtures live in conftest.py."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedxr.data.dicom import write_dicom  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SHARED_NIH = (ROOT / ".." / "shared" / "data" / "nih").resolve()
V2020 = SHARED_NIH / "Data_Entry_2017_v2020.csv.gz"
BBOX = SHARED_NIH / "BBox_List_2017.csv.gz"

needs_shared = pytest.mark.skipif(
    not V2020.is_file(), reason=f"real NIH metadata not found at {SHARED_NIH} (the shared/ folder beside the project)"
)

#: A 40 x 48 horizontal ramp 0..255: every image reader must return it unchanged (up to codec loss).
GRADIENT = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1))


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

def tiny_recipe_overrides(tmp: Path, patients: int = 60, extra: tuple[str, ...] = ()) -> list[str]:
    """Overrides that shrink the quickstart recipe to test size (phantom at 48 px, 32 px training)."""
    return [
        f"data.root={tmp / 'phantom'}", f"data.phantom.patients={patients}", "data.phantom.size=48",
        "data.image_size=32", "data.batch_size=16", "data.num_workers=0", f"data.cache_dir={tmp / 'cache'}",
        "model.name=tiny_cnn", "model.max_epochs=1", f"output.runs_dir={tmp / 'runs'}", "output.name=t",
        *extra,
    ]


#: The password of the console tests' users (test data, not a default: the console has no users until added).
CONSOLE_PASSWORD = "test-password-123"


def console_overrides(tmp: Path, rounds: int = 2, name: str = "t") -> list[str]:
    """A tiny federated run for the console: 2 hospitals, exported and explained, no students."""
    return tiny_recipe_overrides(tmp, patients=60, extra=(
        "data.phantom.hospitals=2", "data.sites=2", "federated.min_clients=2", f"federated.rounds={rounds}",
        "data.batch_size=8", "distill.students=[]", "explain.images=2", "explain.max_boxes=10",
        "export.calibration_images=16", f"export.out={tmp / 'export'}", f"output.name={name}"))


def assert_global_is_step_weighted_mean(recipe, last_round: int, sites=("site-1", "site-2")) -> None:
    """FedAvg checked independently: the server's global model after ``last_round`` equals
    Σ steps_i · θ_i / Σ steps_i of the weights the sites sent that round (saved with ``--save-updates``)."""
    import torch

    records = recipe.layout.federate / "records"
    sent = [torch.load(records / f"{site}_round{last_round}.pt", weights_only=True) for site in sites]
    steps = [s["steps"] for s in sent]
    assert len(set(steps)) == len(steps), steps  # unequal work, so weighting matters
    assert min(steps) > 0, steps
    server = next((recipe.layout.federate / "nvflare").rglob("app_server/FL_global_model.pt"))
    global_state = torch.load(server, weights_only=False)["model"]
    checked = 0
    for key, value in global_state.items():
        if not torch.is_floating_point(sent[0]["state_dict"][key]):
            continue
        expected = sum(n * s["state_dict"][key].double() for n, s in zip(steps, sent)) / sum(steps)
        torch.testing.assert_close(torch.as_tensor(value).double(), expected, rtol=0, atol=1e-6)
        checked += 1
    assert checked >= 10


def phantom_training_image(console_run) -> Path:
    """An image of the kind the console run's model was trained on (its first training image)."""
    from fedxr.data.manifest import read_manifest

    rows = read_manifest(console_run["runs"] / "t" / "sites" / "site-1.csv")
    return Path(rows[rows["split"] == "train"]["path"].iloc[0])


def all_routes(routes):
    """Every route of a FastAPI app, including those of included routers (FastAPI >= 0.16x keeps an included router
    whole, under ``original_router``)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from all_routes(inner.routes) if inner is not None else [route]
