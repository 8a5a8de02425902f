"""Images/s from PNG decoding vs from the uint8 cache, at 224 px, on this machine.

    python benchmarks/data_loading.py               # full run (writes results/data_loading.json)
    python benchmarks/data_loading.py --smoke       # seconds; proves the script still works (CI)
    python benchmarks/data_loading.py --images DIR  # your own PNGs instead of the synthetic set

Without --images it writes NIH-like 1024x1024 8-bit PNGs made from the real NIH sample image in
../shared/data/nih (with per-file noise, so compression and decoding cost are realistic), or from a
synthetic gradient where that folder is absent. Both paths end in the same normalised float tensor
the training loader yields, single process, so the numbers compare work per core.
Goal: the cache is at least 10x faster than decoding PNGs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from fedxr.data.cache import build_cache  # noqa: E402
from fedxr.data.datamodule import XRayDataset  # noqa: E402
from fedxr.preprocessing import Preprocessing  # noqa: E402
from fedxr.imaging import load_for_model  # noqa: E402

SHARED_IMAGE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nih" / "00000001_000.png"


def make_images(folder: Path, n: int, size: int) -> list[Path]:
    if SHARED_IMAGE.is_file():
        base = np.asarray(Image.open(SHARED_IMAGE).convert("L").resize((size, size), Image.Resampling.BICUBIC), np.int16)
    else:
        base = np.tile(np.linspace(30, 220, size), (size, 1)).astype(np.int16)
    paths = []
    for i in range(n):
        noise = np.random.default_rng(i).normal(0, 3, base.shape).astype(np.int16)
        p = folder / f"{i:08d}_000.png"
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, help="folder of PNGs to read (default: synthetic NIH-like set)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    n, src = (12, 256) if args.smoke else (args.n, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = sorted(args.images.rglob("*.png"))[:n] if args.images else make_images(tmp, n, src)
        n = len(paths)
        to_tensor = XRayDataset(np.zeros((1, args.size, args.size), np.uint8), np.zeros((1, 14)), Preprocessing(args.size), False)

        def from_png(i: int):
            to_tensor.images = load_for_model(paths[i], args.size)[None]
            return to_tensor[0]

        t = time.perf_counter()
        cache = build_cache(paths, args.size, tmp / "cache", workers=1, progress=False)
        build_s = time.perf_counter() - t
        ds = XRayDataset(cache, np.zeros((n, 14)), Preprocessing(args.size), False)
        png_rate = rate(from_png, n)
        cache_rate = max(rate(lambda i: ds[i], n) for _ in range(3))
    speedup = cache_rate / png_rate
    payload = {
        "images": n, "source_size_px": src if not args.images else "as found", "size_px": args.size,
        "png_images_per_s": round(png_rate, 1), "cache_images_per_s": round(cache_rate, 1),
        "speedup": round(speedup, 1), "cache_build_s": round(build_s, 2), "goal_speedup": 10,
    }
    path = write_result("data_loading", payload, smoke=args.smoke)
    print(f"PNG decode+resize: {png_rate:8.1f} img/s\ncache (memmap):    {cache_rate:8.1f} img/s\n"
          f"speedup:           {speedup:8.1f}x (goal >= 10x)\nwrote {path}")


if __name__ == "__main__":
    main()
