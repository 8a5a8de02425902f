"""Images/s from PNG decoding vs from the uint8 cache, and the training loader at ChestX-ray14 size.

    python benchmarks/data_loading.py                  # PNG vs cache, 200 images (writes results/data_loading.json)
    python benchmarks/data_loading.py --images 112120  # ChestX-ray14 size (writes results/data_loading_nih.json)
    python benchmarks/data_loading.py --smoke          # seconds; proves both modes still work (CI)
    python benchmarks/data_loading.py --png-dir DIR    # your own PNGs instead of the synthetic set

PNG vs cache: NIH-like 1024x1024 8-bit PNGs made from the real NIH sample image in ../shared/data/nih (with
per-file noise, so compression and decoding cost are realistic), or from a synthetic gradient where that
folder is absent. Both paths end in the same normalised float tensor the training loader yields, single
process, so the numbers compare work per core. Goal: the cache is at least 10x faster than decoding PNGs.

--images N: the cache of N images at --size px is fabricated directly (N NIH-like images as PNG files do not
fit on this machine's disk: 112,120 at 1024 px are ~50 GB), then read through fedxr's own training loader
(SiteDataModule's DataLoader: shuffled, the nih14 recipe's batch size and workers) for --batches batches:
images/s of uint8 batches handed to the training process, the same with the batch augmentation done on this
machine's CPU (on a GPU machine it runs on the GPU), and the memory of the main process and the workers as the
read goes on (their anonymous memory must stay flat: the cache is a memmap, its pages belong to the page cache). The
build time at that size is extrapolated from building the cache of --build-sample 1024-px PNGs with the
recipe's workers. Goal: >= 3,000 img/s from the cache with the recipe's workers on two cores.
"""

from __future__ import annotations

import argparse
import os
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


def fabricate_cache(path: Path, n: int, size: int, progress: bool) -> np.ndarray:
    """An (n, size, size) uint8 .npy cache, in the format build_cache writes, filled with NIH-like images
    (the real NIH sample, or a gradient, shifted and with noise per image) without any PNG files."""
    from tqdm.auto import tqdm

    if SHARED_IMAGE.is_file():
        base = np.asarray(Image.open(SHARED_IMAGE).convert("L").resize((size, size), Image.Resampling.BICUBIC), np.int16)
    else:
        base = np.tile(np.linspace(30, 220, size), (size, 1)).astype(np.int16)
    rng = np.random.default_rng(0)
    variants = np.stack([np.clip(np.roll(base, (k % 7) - 3, axis=k % 2) + rng.normal(0, 3, base.shape), 0, 255)
                         for k in range(64)]).astype(np.uint8)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size))
    chunk = 1024
    for start in tqdm(range(0, n, chunk), desc="fabricating the cache", unit="chunk", disable=not progress):
        stop = min(n, start + chunk)
        out[start:stop] = variants[np.arange(start, stop) % len(variants)]
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next((int(line.split()[1]) for line in fh if line.startswith(key + ":")), 0)


def memory_mb(proc) -> dict:
    """Memory of a process and its children (the loader's workers), in MB: resident in all, and split into
    anonymous memory (the processes' own: what must stay flat) and file-backed pages (the memmapped cache,
    which belong to the kernel's page cache: shared between the workers and reclaimable)."""
    procs = [proc] + proc.children(recursive=True)
    anon = file_backed = 0
    for p in procs:
        try:
            anon += _status_kb(p.pid, "RssAnon")
            file_backed += _status_kb(p.pid, "RssFile")
        except (OSError, ValueError):  # a worker that just exited, or no /proc (not Linux)
            continue
    return {"anonymous_mb": round(anon / 1024, 1), "file_backed_mb": round(file_backed / 1024, 1),
            "processes": len(procs)}


def nih_scale(args) -> None:
    """The cache and the training loader at ChestX-ray14 size (see the module docstring)."""
    import psutil
    import torch

    from fedxr.config import load_recipe
    from fedxr.data.datamodule import make_loader

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "nih14_densenet121_fedavg.yaml")
    batch, workers = recipe.data.batch_size, recipe.data.num_workers
    n, size = args.images, args.size
    me = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Build rate of the real cache (PNG decode + resize, the recipe's workers), on a sample.
        (tmp / "png").mkdir()
        sample = make_images(tmp / "png", args.build_sample, 256 if args.smoke else 1024)
        t = time.perf_counter()
        build_cache(sample, size, tmp / "sample_cache", workers=workers, progress=False)
        build_rate = len(sample) / (time.perf_counter() - t)
        t = time.perf_counter()
        cache = fabricate_cache(tmp / "nih.npy", n, size, progress=not args.smoke)
        fabricate_s = time.perf_counter() - t
        disk_gb = (tmp / "nih.npy").stat().st_size / 1e9
        labels = np.zeros((n, 14), np.float32)
        dataset = XRayDataset(cache, labels, Preprocessing(size), augment=True)
        loader = make_loader(dataset, batch, shuffle=True, num_workers=workers)
        it, seen, samples = iter(loader), 0, []

        def next_batch():
            nonlocal it
            try:
                return next(it)
            except StopIteration:  # a new epoch, as the trainer starts one (persistent workers)
                it = iter(loader)
                return next(it)

        t0 = None
        for i in range(args.batches + 2):
            x, _ = next_batch()
            if i == 1:
                before = memory_mb(me)  # the workers are up and have delivered their first batches
                t0 = time.perf_counter()
            elif i > 1:
                seen += len(x)
            if i % max(1, args.batches // 10) == 0:
                samples.append({"batches": i, **memory_mb(me)})
        loader_rate = seen / (time.perf_counter() - t0)
        after = memory_mb(me)
        # The same batches with the augmentation where this machine trains (CPU here; GPU on a GPU machine).
        from fedxr.data.augment import augment_batch

        torch.manual_seed(0)
        t, done = time.perf_counter(), 0
        for _ in range(max(2, args.batches // 4)):
            x, _ = next_batch()
            augment_batch(x, dataset.mean, dataset.std)
            done += len(x)
        augmented_rate = done / (time.perf_counter() - t)
    payload = {
        "images": n, "size_px": size, "batch_size": batch, "workers": workers, "cores": os.cpu_count(),
        "cache_disk_gb": round(disk_gb, 2), "cache_fabricated_s": round(fabricate_s, 1),
        "build_sample_images": len(sample), "build_images_per_s": round(build_rate, 1),
        "build_estimate_min": round(n / build_rate / 60, 1),
        "build_note": "PNG decode + resize of 1024-px NIH-like PNGs with the recipe's workers, measured on the sample; "
                      "the estimate is the sample's rate over all images",
        "loader_images_per_s": round(loader_rate, 1), "loader_batches": args.batches,
        "loader_with_cpu_augmentation_images_per_s": round(augmented_rate, 1),
        "memory_before": before, "memory_after": after, "memory_during": samples,
        "anonymous_memory_growth_mb": round(after["anonymous_mb"] - before["anonymous_mb"], 1),
        "goal_loader_images_per_s": 3000,
    }
    path = write_result("data_loading_nih", payload, smoke=args.smoke)
    print(f"cache: {n:,} images at {size} px = {disk_gb:.2f} GB on disk; build {build_rate:.0f} img/s with {workers} workers "
          f"-> ~{payload['build_estimate_min']} min for all\n"
          f"training loader (batch {batch}, {workers} workers, {os.cpu_count()} cores): {loader_rate:,.0f} img/s "
          f"(goal >= 3,000); with the augmentation on this CPU: {augmented_rate:,.0f} img/s\n"
          f"memory (all {after['processes']} processes) over {args.batches} batches: anonymous {before['anonymous_mb']} -> "
          f"{after['anonymous_mb']} MB; file-backed (the memmapped cache, page cache) {before['file_backed_mb']} -> "
          f"{after['file_backed_mb']} MB\nwrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png-dir", type=Path, help="folder of PNGs to read (default: synthetic NIH-like set)")
    ap.add_argument("--n", type=int, default=200, help="PNG vs cache: how many images")
    ap.add_argument("--images", type=int, help="ChestX-ray14 scale: fabricate a cache of this many images (112120)")
    ap.add_argument("--batches", type=int, default=400, help="with --images: batches to read through the loader")
    ap.add_argument("--build-sample", type=int, default=400, help="with --images: PNGs to build a cache from")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.images:
        if args.smoke:
            args.images, args.batches, args.build_sample = min(args.images, 300), 6, 8
        return nih_scale(args)
    n, src = (12, 256) if args.smoke else (args.n, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = sorted(args.png_dir.rglob("*.png"))[:n] if args.png_dir else make_images(tmp, n, src)
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
        "images": n, "source_size_px": src if not args.png_dir else "as found", "size_px": args.size,
        "png_images_per_s": round(png_rate, 1), "cache_images_per_s": round(cache_rate, 1),
        "speedup": round(speedup, 1), "cache_build_s": round(build_s, 2), "goal_speedup": 10,
    }
    path = write_result("data_loading", payload, smoke=args.smoke)
    print(f"PNG decode+resize: {png_rate:8.1f} img/s\ncache (memmap):    {cache_rate:8.1f} img/s\n"
          f"speedup:           {speedup:8.1f}x (goal >= 10x)\nwrote {path}")


if __name__ == "__main__":
    main()
