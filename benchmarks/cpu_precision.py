"""Training speed on this CPU in FP32 and in bf16 autocast, and how many threads each simulator site should get.

    python benchmarks/cpu_precision.py            # ~3 min on 2 cores: results/cpu_precision.json
    python benchmarks/cpu_precision.py --smoke    # seconds; proves the script works (CI)

1. Precision: the quickstart's teacher (ResNet-18) and student (ResNet-18 at 1/4 width) at 96 px, batch 32,
   one training step = forward, masked BCE, backward, AdamW — in FP32 and under bf16 autocast, interleaved in one
   process so that the machine's load falls on both alike. It records the CPU's bf16 flags and what
   ``model.precision: auto`` resolves to here (fedxr/precision.py): auto picks bf16 only where the CPU has AMX or
   AVX512-BF16, and this measurement is why.
2. Threads: the simulator runs every site as its own process at once. With S sites on C cores, each site gets
   max(1, C // S) threads (fedxr/federated/job.py). Measured here: S processes training side by side at
   1, 2, ... threads each, images/s of all of them together: oversubscribing the cores costs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import torch  # noqa: E402


def build(name: str) -> torch.nn.Module:
    from fedxr.models.registry import build_model

    return build_model(name).to(memory_format=torch.channels_last)


def images_per_s(model: torch.nn.Module, size: int, batch: int, bf16: bool, steps: int, warmup: int = 2,
                 ready=None) -> float | tuple[float, float, int]:
    """Images/s of ``steps`` training steps after ``warmup``; with ``ready`` (a barrier shared by processes
    training side by side) it waits there after the warm-up and returns (start, end, images) instead."""
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    # fedxr's models take one (grey) channel
    x = torch.randn(batch, 1, size, size, generator=g).to(memory_format=torch.channels_last)
    y = (torch.rand(batch, 14, generator=g) > 0.8).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if ready is not None:
        ready.wait()  # every process times the same window: all of them training at once
        start = time.time()
        for _ in range(steps):
            step()
        return start, time.time(), steps * batch
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)


def _site(args: tuple) -> tuple[float, float, int]:
    name, size, batch, threads, steps, bf16, ready = args
    torch.set_num_threads(threads)
    return images_per_s(build(name), size, batch, bf16, steps, ready=ready)


def sites_side_by_side(name: str, size: int, batch: int, sites: int, threads: int, steps: int, bf16: bool) -> float:
    """Images/s of ``sites`` processes training at once, ``threads`` each (what the simulator does): all images
    over the span from the first start to the last end, the processes released together after their warm-up."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(sites) as pool:
        ready = manager.Barrier(sites)
        runs = pool.map(_site, [(name, size, batch, threads, steps, bf16, ready)] * sites)
    return sum(n for _, _, n in runs) / (max(end for _, end, _ in runs) - min(start for start, _, _ in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sites", type=int, default=3, help="simulator sites for the thread measurement")
    args = ap.parse_args()
    from fedxr.precision import cpu_bf16_flags, resolve_precision

    size, batch, steps, repeats = (32, 4, 2, 1) if args.smoke else (args.size, args.batch, 10, 2)
    models = ["tiny_cnn"] if args.smoke else ["resnet18", "resnet18_quarter"]
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    rows = []
    for name in models:
        model = build(name)
        fp32, bf16 = [], []
        for _ in range(repeats):  # interleaved: the machine's load falls on both alike
            fp32.append(images_per_s(model, size, batch, False, steps))
            bf16.append(images_per_s(model, size, batch, True, steps))
        row = {"model": name, "fp32_images_per_s": round(max(fp32), 1), "bf16_images_per_s": round(max(bf16), 1),
               "bf16_speedup": round(max(bf16) / max(fp32), 2)}
        rows.append(row)
        print(f"{name:<18} FP32 {row['fp32_images_per_s']:>7.1f} img/s   bf16 {row['bf16_images_per_s']:>7.1f} img/s"
              f"   ×{row['bf16_speedup']}", flush=True)
    precision, why = resolve_precision("auto", "cpu")
    threads = []
    sites = 2 if args.smoke else args.sites
    for per_site in sorted({1, max(1, cores // sites), cores}):
        ips = sites_side_by_side(models[-1], size, batch, sites, per_site, steps, precision == "bf16-mixed")
        threads.append({"sites": sites, "threads_per_site": per_site, "images_per_s": round(ips, 1)})
        print(f"{sites} sites × {per_site} thread(s) on {cores} cores: {ips:.1f} img/s together", flush=True)
    path = write_result("cpu_precision", {
        "smoke": args.smoke, "input_size": size, "batch": batch, "threads": cores, "cpu_bf16_flags": list(cpu_bf16_flags()),
        "auto_resolves_to": precision, "auto_why": why, "rows": rows, "site_threads": threads,
        "fedxr_rule": "each simulator site gets max(1, cores // sites) threads"}, smoke=args.smoke)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
