"""Does an exported model say when an image is not for it? The OOD check of `python -m fedxr.export`, measured.

    fedxr run recipes/quickstart.yaml && fedxr run recipes/real_cxr.yaml     # first (or export their checkpoints)
    python benchmarks/ood.py --phantom-model export/quickstart_resnet18 --phantom-sites runs/quickstart/sites \\
        --real-model export/real_cxr_resnet18 --real-sites runs/real_cxr/sites
    python benchmarks/ood.py --smoke                  # a one-epoch tiny phantom model, 40 real images (CI)

For each model, torch-free (fedxr.edge on the exported files, FP32 and the recommended file — INT8 where kept),
against the model's own test images (in distribution):

* the other domain: all real radiographs of ``../shared/data/real-cxr`` for the phantom model, the phantom's test
  images for the real model;
* non-chest inputs: natural photographs (matplotlib's sample photos, 16 crops each), CT and MR slices (pydicom's
  own test files), the model's test radiographs inverted (wrong photometric interpretation) and rotated 90°, and
  blank frames (9 gray levels).

Per set: the share flagged at the threshold the exporter fitted on validation (goal: ≥ 95 % of the other domain,
≤ 5 % of the model's own test images), and the detection AUROC (test images vs the set) of the exported
Mahalanobis score beside JointEnergy (an output-only score; Wang et al. 2021) for comparison. Writes
results/ood.json and ood.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, one_epoch_checkpoints, write_result  # noqa: E402

REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-cxr"


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float | None:
    """Detection AUROC: P(score of an outside image > score of an inside one), fedxr's own rank AUROC."""
    from fedxr.models.metrics import batched_auroc

    if not len(inside) or not len(outside):
        return None
    labels = np.concatenate([np.zeros(len(inside)), np.ones(len(outside))])
    return float(batched_auroc(np.concatenate([inside, outside])[None], labels[None])[0])


def _test_paths(sites: Path, limit: int) -> list[str]:
    from fedxr.data.manifest import read_manifest

    rows = [r[r["split"] == "test"] for r in (read_manifest(p) for p in sorted(Path(sites).glob("site-*.csv")))]
    paths = [p for r in rows for p in r["path"]]
    return paths if len(paths) <= limit else [paths[i] for i in np.linspace(0, len(paths) - 1, limit).astype(int)]


def _real_paths(root: Path, limit: int) -> list[str]:
    import pandas as pd

    paths = [str(root / p) for p in pd.read_csv(root / "labels.csv")["path"]]
    return paths if len(paths) <= limit else [paths[i] for i in np.linspace(0, len(paths) - 1, limit).astype(int)]


def _photos(size: int) -> list[np.ndarray]:
    """16 square crops of each of matplotlib's sample photographs, gray, at the model's size."""
    import matplotlib
    from PIL import Image

    from fedxr.imaging import resize_square

    out, rng = [], np.random.default_rng(0)
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        img = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name).convert("L"))
        h, w = img.shape
        for _ in range(16):
            side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            out.append(resize_square(np.ascontiguousarray(img[y:y + side, x:x + side]), size))
    return out


def _ct_mr(model) -> list[np.ndarray]:
    """pydicom's own CT and MR test files, read as fedxr reads any DICOM."""
    from pydicom.data import get_testdata_file

    files = [get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "MR_small_RLE.dcm")]
    return [model.preprocess(f) for f in files if f]


def _load(model, paths: list[str]) -> list[np.ndarray]:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    with ThreadPoolExecutor() as pool:
        return list(tqdm(pool.map(model.preprocess, paths), total=len(paths), desc="decoding", leave=False))


def _scores(model, grays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(Mahalanobis score from the file, JointEnergy from its logits) per image."""
    from fedxr.trust.ood import joint_energy

    maha, energy = [], []
    for i in range(0, len(grays), 64):
        logits, ood = model.run(model.preprocessing.batch(grays[i:i + 64]))
        maha.append(ood)
        energy.append(joint_energy(logits))
    return np.concatenate(maha), np.concatenate(energy)


def measure(folder: Path, own_sites: Path, other_paths: list[str] | None, other_name: str, limit: int) -> dict:
    """Every set against the model's own test images, for the FP32 file and the recommended one."""
    import json

    from fedxr.edge import load_model

    manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted({next(f["file"] for f in manifest["files"] if f["format"] == "onnx-fp32"), manifest["recommended"]})
    first = load_model(folder / files[0])
    inside = _load(first, _test_paths(own_sites, limit))
    sets = {"own test images": inside}
    if other_paths:
        sets[other_name] = _load(first, other_paths)
    sets.update({"natural photographs": _photos(first.size), "CT and MR slices": _ct_mr(first),
                 "inverted radiographs": [255 - g for g in inside[:200]],
                 "rotated 90°": [np.ascontiguousarray(np.rot90(g)) for g in inside[:200]],
                 "blank frames": [np.full((first.size, first.size), v, np.uint8) for v in range(0, 256, 32)]})
    out = {"model": str(folder), "trained_on": first.provenance, "threshold": first.ood["threshold"],
           "quantile": first.ood["quantile"], "files": {}}
    for name in files:
        model = load_model(folder / name)
        scored = {k: _scores(model, v) for k, v in sets.items()}
        base_m, base_e = scored["own test images"]
        rows = {}
        for k, (m, e) in scored.items():
            # What predict reports: the score above the threshold, or a blank frame.
            flagged = np.array([s > model.ood["threshold"] or float(g.std()) < 2.0 for s, g in zip(m, sets[k])])
            rows[k] = {"images": len(m), "flagged": round(float(flagged.mean()), 4),
                       "mahalanobis_auroc": None if k == "own test images" else _auroc(base_m, m),
                       "joint_energy_auroc": None if k == "own test images" else _auroc(base_e, e),
                       "median_score": round(float(np.median(m)), 4)}
        out["files"][name] = {"format": next(f["format"] for f in manifest["files"] if f["file"] == name), "sets": rows,
                              "scores": {k: v[0].tolist() for k, v in scored.items()}}
    return out


def plot(results: dict, path: Path) -> None:
    from fedxr.plots import saved_figure

    models = [r for r in results.values() if r]
    with saved_figure(path, dpi=90, nrows=1, ncols=len(models), figsize=(7 * len(models), 4.5)) as (fig, axes):
        for ax, r in zip(np.atleast_1d(axes), models):
            fp32 = next(v for v in r["files"].values() if v["format"] == "onnx-fp32")
            top = max(max(s) for s in fp32["scores"].values())
            bins = np.geomspace(0.1, max(top, 1.0) * 1.1, 60)
            for name, s in fp32["scores"].items():
                ax.hist(np.clip(s, 0.1, None), bins=bins, histtype="step", lw=1.5, density=True, label=name)
            ax.axvline(r["threshold"], c="k", ls="--", label="threshold (validation)")
            ax.set_xscale("log")
            ax.set_xlabel("OOD score (1 = edge of validation images)")
            ax.set_title(r["trained_on"][:70], fontsize=8)
            ax.legend(fontsize=7)


def format_table(results: dict) -> str:
    lines = []
    for key, r in results.items():
        if not r:
            continue
        for name, f in r["files"].items():
            lines += [f"{key} model, {name} ({f['format']}), threshold {r['threshold']:.3f}:",
                      f"  {'set':<24}{'images':>7}{'flagged':>9}{'AUROC maha':>12}{'AUROC energy':>14}"]
            for k, v in f["sets"].items():
                fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
                lines.append(f"  {k:<24}{v['images']:>7}{v['flagged']:>9.1%}{fmt(v['mahalanobis_auroc']):>12}"
                             f"{fmt(v['joint_energy_auroc']):>14}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phantom-model", type=Path, help="export folder of a phantom-trained model")
    ap.add_argument("--phantom-sites", type=Path, help="its run's sites folder (its test images)")
    ap.add_argument("--real-model", type=Path, help="export folder of a model trained on real radiographs")
    ap.add_argument("--real-sites", type=Path)
    ap.add_argument("--real-root", type=Path, default=REAL_ROOT)
    ap.add_argument("--limit", type=int, default=10_000, help="images per set at most")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    results: dict = {"phantom": None, "real": None}
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from fedxr.export.exporter import export_checkpoint

            work = Path(tmp)
            ckpts, sites = one_epoch_checkpoints(work, {"teacher": ("tiny_cnn", 32)}, patients=60)
            export_checkpoint(ckpts["teacher"], work / "export", int8="off", data=sites, calibration_images=16,
                              progress=False)
            args.phantom_model, args.phantom_sites, args.limit = work / "export", sites, 40
        if args.phantom_model:
            real = _real_paths(args.real_root, args.limit) if (args.real_root / "labels.csv").is_file() else None
            results["phantom"] = measure(args.phantom_model, args.phantom_sites, real, "real radiographs", args.limit)
        if args.real_model:
            phantom = _test_paths(args.phantom_sites, args.limit) if args.phantom_sites else None
            results["real"] = measure(args.real_model, args.real_sites, phantom, "phantom images", args.limit)
        print(format_table(results))
        png = RESULTS / ("ood.smoke.png" if args.smoke else "ood.png")
        plot(results, png)
        slim = {k: (None if v is None else {**v, "files": {n: {kk: vv for kk, vv in f.items() if kk != "scores"}
                                                             for n, f in v["files"].items()}}) for k, v in results.items()}
        path = write_result("ood", {"results": slim, "plot": str(png.relative_to(RESULTS.parent.parent))}, smoke=args.smoke)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
