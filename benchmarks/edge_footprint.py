"""Edge footprint and folder throughput of `pip install fedxr` (the edge runtime alone), on this machine.

    python benchmarks/edge_footprint.py          # quickstart and NIH-recipe teachers and students, FP32 and INT8
    python benchmarks/edge_footprint.py --smoke  # tiny_cnn at 32 px, this interpreter, a few small images (CI)

For each model file, measured in a fresh venv holding only `pip install fedxr` (no extras):
- installed size of that environment (and its largest packages);
- cold start: wall time of `python -m fedxr.edge predict MODEL ONE.png --json`, from process start to the
  prediction written and the process gone (median of ``--repeats``), with its peak RSS (the process's own
  ``ru_maxrss``, from ``wait4``);
- a folder of ``--images`` 1024×1024 PNGs (a real NIH radiograph upscaled, with detector-like noise so the
  files compress like real ones) and the same images as 12-bit DICOMs: images/s over the whole command
  (process start included), images/s once started (the one-image cold start taken off), and peak RSS. Decoding runs in parallel with inference (`--workers`, default one
  per core).
Models: each trained for one epoch on a small phantom set at its recipe's input size (footprint and speed do not
depend on the weights). Goals (issue 19): student cold start <= 0.25 s and peak RSS <= 100 MB at 224 px; a
folder of 1024-px PNGs at >= 160 img/s on 2 cores, and the same mechanism for DICOM folders.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import one_epoch_checkpoints, write_result  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NIH_PNG = (REPO / ".." / "shared" / "data" / "nih" / "00000001_000.png").resolve()
#: role → (registry model, recipe input size): the quickstart's pair, and the NIH recipes' teacher and
#: student plus the quickstart student at the NIH size (the 224-px goal).
MODELS = {
    "quickstart teacher": ("resnet18", 96), "quickstart student": ("resnet18_quarter", 96),
    "NIH teacher": ("densenet121", 224), "NIH student": ("mobilenetv3_small_100", 224),
    "quickstart student @224": ("resnet18_quarter", 224),
}
SMOKE_MODELS = {"teacher": ("tiny_cnn", 32), "student": ("tiny_cnn", 32)}
GOALS = {"student_cold_start_s": 0.25, "student_peak_rss_mb": 100, "folder_png_img_per_s": 160}


#: Runs a command and reports its wall time and peak RSS. A child's ru_maxrss starts at its parent's RSS at
#: fork (this benchmark holds torch: ~1 GB), so the command is started from this small launcher instead.
LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(json.dumps({"wall": time.perf_counter() - start, "code": code,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds (process start to exit) and peak RSS in MB of ``cmd``."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SystemExit(f"launcher failed for {' '.join(cmd)}:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {result['code']}):\n{proc.stderr[-2000:]}")
    return result["wall"], result["maxrss_mb"]


def edge_venv(work: Path) -> tuple[Path, dict]:
    """A fresh venv with `pip install fedxr` (no extras); its installed size and largest packages."""
    venv = work / "edge-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(REPO)], check=True, timeout=1800)
    site = next((venv / "lib").glob("python*/site-packages"))
    sizes = {p.name: _du(p) for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")}
    largest = dict(sorted(((k, round(v / 1e6, 1)) for k, v in sizes.items()), key=lambda kv: -kv[1])[:6])
    return py, {"venv_mb": round(_du(venv) / 1e6, 1), "site_packages_mb": round(_du(site) / 1e6, 1),
                "largest_packages_mb": largest, "torch_installed": (site / "torch").exists()}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def folders(work: Path, count: int, size: int) -> tuple[Path, Path, Path]:
    """One PNG, a folder of ``count`` PNGs and the same as 12-bit DICOMs, ``size`` × ``size`` px."""
    from fedxr.data.dicom import write_dicom

    png_dir, dcm_dir = work / "png", work / "dicom"
    png_dir.mkdir(parents=True, exist_ok=True)
    dcm_dir.mkdir(parents=True, exist_ok=True)
    if NIH_PNG.is_file():
        base = np.asarray(Image.open(NIH_PNG).convert("L").resize((size, size), Image.Resampling.BICUBIC), np.float32)
    else:  # no shared folder: a smooth synthetic chest-like gradient
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = 255 * (0.3 + 0.5 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 6))
    rng = np.random.default_rng(0)
    for i in range(count):
        gray = np.clip(np.roll(base, 7 * i, axis=1) + rng.normal(0, 1.5, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(gray).save(png_dir / f"{i:04d}.png")
        write_dicom(dcm_dir / f"{i:04d}.dcm", gray.astype(np.uint16) * 16, window=(2048, 4096))
    return png_dir / "0000.png", png_dir, dcm_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--images", type=int, default=200, help="images per folder")
    ap.add_argument("--repeats", type=int, default=5, help="cold starts per model file (median)")
    ap.add_argument("--workers", type=int, help="decoding threads for folders (default: one per core)")
    args = ap.parse_args()
    models = SMOKE_MODELS if args.smoke else MODELS
    count, side, repeats = (6, 256, 1) if args.smoke else (args.images, 1024, args.repeats)
    from fedxr.export.exporter import export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.smoke:  # this interpreter: installing a venv is the packaging test's job
            py, env = Path(sys.executable), {"venv_mb": None, "note": "smoke: this interpreter, size not measured"}
        else:
            print("pip install fedxr into a fresh venv ...", flush=True)
            py, env = edge_venv(tmp)
            print(f"edge-only environment: {env}", flush=True)
        one, png_dir, dcm_dir = folders(tmp / "inputs", count, side)
        checkpoints, sites = one_epoch_checkpoints(tmp / "train", models, patients=40 if args.smoke else 120)
        workers = ["--workers", str(args.workers)] if args.workers else []
        rows = []
        for role, (name, size) in models.items():
            out = tmp / "export" / role.replace(" ", "_").replace("@", "")
            manifest = export_checkpoint(checkpoints[role], out, int8="on", data=sites, calibration_images=100)
            for f in manifest["files"]:
                model = str(out / f["file"])
                starts = [run_measured([str(py), "-m", "fedxr.edge", "predict", model, str(one), "--json"])
                          for _ in range(repeats)]
                cold = statistics.median(s[0] for s in starts)
                rss_one = max(s[1] for s in starts)
                png_wall, png_rss = run_measured([str(py), "-m", "fedxr.edge", "predict", model, str(png_dir), "--csv", *workers])
                dcm_wall, dcm_rss = run_measured([str(py), "-m", "fedxr.edge", "predict", model, str(dcm_dir), "--csv", *workers])
                row = {"role": role, "model": name, "input_px": size, "format": f["format"],
                       "size_mb": round(f["size_bytes"] / 1e6, 2), "cold_start_s": round(cold, 3),
                       "peak_rss_one_mb": round(rss_one, 1), "folder_images": count, "folder_px": side,
                       "png_folder_img_per_s": round(count / png_wall, 1), "png_folder_peak_rss_mb": round(png_rss, 1),
                       # the rate once running: the one-image cold start taken off the folder's wall time
                       "png_folder_img_per_s_after_start": round(count / max(png_wall - cold, 1e-3), 1),
                       "dicom_folder_img_per_s": round(count / dcm_wall, 1), "dicom_folder_peak_rss_mb": round(dcm_rss, 1),
                       "dicom_folder_img_per_s_after_start": round(count / max(dcm_wall - cold, 1e-3), 1)}
                rows.append(row)
                print(f"{role:<24}{f['format']:<15}{row['size_mb']:>6.1f} MB  cold {row['cold_start_s']:.3f} s  "
                      f"RSS {row['peak_rss_one_mb']:.0f} MB | {count} PNGs {row['png_folder_img_per_s']:.0f} img/s "
                      f"({row['png_folder_img_per_s_after_start']:.0f} after start) RSS {row['png_folder_peak_rss_mb']:.0f} MB"
                      f" | DICOMs {row['dicom_folder_img_per_s']:.0f} img/s "
                      f"({row['dicom_folder_img_per_s_after_start']:.0f} after start) "
                      f"RSS {row['dicom_folder_peak_rss_mb']:.0f} MB", flush=True)
    result = {"environment": env, "cpu_count": os.cpu_count(), "workers": args.workers or os.cpu_count(),
              "rows": rows, "goals": GOALS}
    print(f"wrote {write_result('edge_footprint', result, smoke=args.smoke)}")


if __name__ == "__main__":
    main()
