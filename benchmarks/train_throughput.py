"""Training throughput (images/s) of a teacher and a student at 224 px: cache vs PNG, plain vs in NVFlare.

    python benchmarks/train_throughput.py              # CPU here; on a GPU adds bf16 + channels_last
    python benchmarks/train_throughput.py --smoke      # seconds; proves the script works (CI)
    python benchmarks/train_throughput.py --models densenet121 --batch-sizes 64 128 256 --compile

The real training path is measured: SiteDataModule (cache, augmentation, DataLoader workers) feeding
XRayClassifier in a Lightning Trainer. Steps after a warm-up are timed with a callback; images/s is
batch size × timed steps / elapsed. With --loader-only the same loader is iterated without a model,
which tells whether the data path could keep the accelerator busy. With the default settings it also
measures (for each model, at the last batch size) training that decodes the PNG files every step instead
of reading the cache, and the same training inside NVFlare rounds (simulator, one site): images/s over
each round's wall time, so the overhead % is everything a round costs beyond the plain Lightning loop
(validation of the received model, transport, aggregation, persisting).
With --site-ddp N (on a GPU machine by default N = the GPUs present) the NVFlare run is repeated with the
site training under torchrun with Lightning DDP on N devices (NCCL on GPUs, gloo on CPU).
Goal on one H100: DenseNet-121 at 224 px >= 2,500 img/s including data loading.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

from fedxr.config import load_recipe  # noqa: E402
from fedxr.data.prepare import ensure_dataset, ensure_sites  # noqa: E402
from fedxr.data.manifest import site_manifest_paths  # noqa: E402
from fedxr.training import make_classifier, make_datamodule, make_trainer  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.timed = warmup, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.global_step == self.warmup:
            self.t0 = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.timed += 1
            self.elapsed = time.perf_counter() - self.t0


class PngImages:
    """Array-like over image files that decodes and resizes on every access (no cache)."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from fedxr.imaging import load_for_model

        return load_for_model(self.paths[i], self.size)


def measure(recipe, manifests, model: str, batch: int, steps: int, warmup: int, from_png: bool = False) -> dict:
    recipe = recipe.changed(f"{model} batch {batch}", data={"batch_size": batch}, model={"name": model})
    dm = make_datamodule(recipe, manifests, progress=False)
    module = make_classifier(recipe, dm)
    if from_png:
        from fedxr.data.datamodule import XRayDataset

        train = dm.rows[dm.rows["split"] == "train"]
        cached = dm.datasets["train"]
        dm.datasets["train"] = XRayDataset(PngImages(train["path"].tolist(), dm.preprocessing.size), cached.labels,
                                           dm.preprocessing, augment=True)
    timer = StepTimer(warmup)
    trainer = make_trainer(recipe, Path(tempfile.mkdtemp()), callbacks=[timer], max_epochs=-1, max_steps=warmup + steps,
                           progress=False, logger=False, enable_model_summary=False, limit_val_batches=0,
                           num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    rate = batch * timer.timed / timer.elapsed if timer.timed else float("nan")
    return {"model": model, "batch_size": batch, "precision": recipe.model.precision, "data": "png" if from_png else "cache",
            "channels_last": recipe.model.channels_last, "compile": recipe.model.compile,
            "timed_steps": timer.timed, "images_per_s": round(rate, 2)}


def loader_rate(recipe, manifests, batch: int, batches: int) -> float:
    """Images/s of the training loader alone, iterated over epochs the way the trainer does (one DataLoader,
    persistent workers), including the batch augmentation where training runs it (on the GPU if there is one)."""
    recipe = recipe.model_copy(deep=True)
    recipe.data.batch_size = batch
    dm = make_datamodule(recipe, manifests, progress=False)
    dm.setup("fit")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = dm.train_dataloader()
    it, n, t = iter(loader), 0, None
    for i in range(batches + 2):
        try:
            batch_ = next(it)
        except StopIteration:
            it = iter(loader)
            batch_ = next(it)
        x, _ = dm.on_after_batch_transfer(tuple(b.to(device, non_blocking=True) for b in batch_), 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == 1:
            t = time.perf_counter()
        elif i > 1:
            n += len(x)
    return n / (time.perf_counter() - t)


def model_rate(recipe, manifests, model: str, batch: int, steps: int, compiled: bool = False) -> float:
    """Images/s of the training step alone (forward, backward, optimiser; the recipe's precision and memory
    format) on one batch kept on the device: the ceiling the data path has to keep up with."""
    recipe = recipe.changed(f"{model} model only", data={"batch_size": batch}, model={"name": model, "compile": compiled})
    dm = make_datamodule(recipe, manifests, progress=False)
    module = make_classifier(recipe, dm)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device).train()
    x = torch.randn(batch, 1, dm.preprocessing.size, dm.preprocessing.size, device=device)
    y = (torch.rand(batch, 14, device=device) < 0.1).float()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if "bf16" in recipe.model.precision else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(module(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def in_nvflare(recipe, model: str, batch: int, rounds: int, ddp_devices: int = 0) -> dict:
    """Train the same model on the same site inside NVFlare rounds (simulator); images/s per round.
    With ``ddp_devices`` the site trains with Lightning DDP under torchrun on that many devices."""
    import json

    from fedxr.federated.run import federate

    r = recipe.model_copy(deep=True)
    r.model.name, r.data.batch_size = model, batch
    r.federated.rounds, r.federated.local_epochs, r.federated.cross_site_eval = rounds, 1, False
    r.output.name = f"fl_{model}{'_ddp' if ddp_devices else ''}"
    if ddp_devices:
        r.model.devices, r.model.strategy = ddp_devices, "ddp"
    from fedxr.data.prepare import ensure_sites

    ensure_sites(r)
    summary = federate(r, "sim", restart=True)  # a measurement: never a kept earlier run
    table = [x for x in json.loads(Path(summary.rounds).read_text()) if isinstance(x["round"], int)]
    per_round = []
    for row in table[1:]:  # round 0 includes the site's start-up (cache open, model build)
        site = next(iter(row["sites"].values()))
        images = site["steps"] * batch
        per_round.append({"round": row["round"], "images": images, "wall_s": row["wall_s"], "train_s": site["train_s"],
                          "images_per_s_round": round(images / row["wall_s"], 2),
                          "images_per_s_training": round(images / site["train_s"], 2)})
    return {"model": model, "batch_size": batch, "rounds": per_round, "site_processes": max(1, ddp_devices),
            "strategy": r.model.strategy,
            "images_per_s": round(sum(x["images"] for x in per_round) / sum(x["wall_s"] for x in per_round), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--models", nargs="+", default=["densenet121", "mobilenetv3_small_100"])
    ap.add_argument("--batch-sizes", nargs="+", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--compile", action="store_true", help="also measure with torch.compile (GPU)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--no-comparisons", action="store_true", help="skip the PNG and NVFlare comparisons")
    ap.add_argument("--site-ddp", type=int, default=None,
                    help="also train inside NVFlare with DDP under torchrun on N devices per site "
                         "(default: every GPU present; none on CPU)")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    size = 32 if args.smoke else 224
    models = ["tiny_cnn"] if args.smoke else args.models
    batches = args.batch_sizes or ([4] if args.smoke else [128, 256] if gpu else [16])
    steps = args.steps or (2 if args.smoke else 30 if gpu else 6)
    workers = args.workers if args.workers is not None else (0 if args.smoke else min(16, __import__("os").cpu_count() or 2))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        patients = 24 if args.smoke else (4000 if gpu else 120)
        recipe = load_recipe(QUICKSTART, [
            f"data.root={tmp / 'phantom'}", f"data.phantom.patients={patients}", f"data.phantom.size={max(size, 48)}",
            f"data.image_size={size}", "data.sites=1", "data.scheme=iid", "federated.min_clients=1",
            f"data.num_workers={workers}", f"data.cache_dir={tmp / 'cache'}", f"output.runs_dir={tmp / 'runs'}",
            "data.val_fraction=0.1", "data.test_fraction=0.0",
            f"model.precision={'bf16-mixed' if gpu else '32-true'}", f"model.channels_last={str(gpu).lower()}"])
        ensure_dataset(recipe, progress=False)
        sites, _ = ensure_sites(recipe)
        manifests = list(site_manifest_paths(sites).values())
        results = []
        for model in models:
            for batch in batches:
                for compiled in ([False, True] if args.compile and gpu else [False]):
                    r = recipe.model_copy(deep=True)
                    r.model.compile = compiled
                    res = measure(r, manifests, model, batch, steps, warmup=1 if args.smoke else 3)
                    results.append(res)
                    print(f"{model:<24} batch {batch:>4} {res['precision']:<10} compile={compiled!s:<5} "
                          f"{res['images_per_s']:>9.1f} img/s", flush=True)
        loader = round(loader_rate(recipe, manifests, batches[-1], 3 if args.smoke else 40), 1)
        print(f"data loader alone: {loader:.1f} img/s ({workers} workers, batch {batches[-1]}, augmentation included)")
        model_only = []
        for model in models:
            for compiled in ([False, True] if args.compile and gpu else [False]):
                rate_ = round(model_rate(recipe, manifests, model, batches[-1], steps, compiled), 1)
                model_only.append({"model": model, "batch_size": batches[-1], "compile": compiled, "images_per_s": rate_})
                print(f"{model:<24} batch {batches[-1]:>4} model alone (no loader) compile={compiled!s:<5} "
                      f"{rate_:>9.1f} img/s", flush=True)
        png, federated = [], []
        if not args.no_comparisons:
            for model in models:
                plain = next(r for r in results if r["model"] == model and r["batch_size"] == batches[-1] and not r["compile"])
                res = measure(recipe, manifests, model, batches[-1], steps, warmup=1 if args.smoke else 3, from_png=True)
                res["cache_speedup"] = round(plain["images_per_s"] / res["images_per_s"], 2)
                png.append(res)
                print(f"{model:<24} batch {batches[-1]:>4} from PNG  {res['images_per_s']:>9.1f} img/s "
                      f"(cache is {res['cache_speedup']}x)", flush=True)
                fl = in_nvflare(recipe, model, batches[-1], rounds=2 if args.smoke else 3)
                fl["plain_images_per_s"] = plain["images_per_s"]
                fl["overhead_pct"] = round(100 * (1 - fl["images_per_s"] / plain["images_per_s"]), 1)
                federated.append(fl)
                print(f"{model:<24} batch {batches[-1]:>4} in NVFlare {fl['images_per_s']:>9.1f} img/s "
                      f"(overhead {fl['overhead_pct']} % vs plain Lightning)", flush=True)
                ddp = args.site_ddp if args.site_ddp is not None else (torch.cuda.device_count() if gpu else 0)
                if ddp:
                    fl = in_nvflare(recipe, model, batches[-1], rounds=2 if args.smoke else 3, ddp_devices=ddp)
                    fl["plain_images_per_s"] = plain["images_per_s"]
                    federated.append(fl)
                    print(f"{model:<24} batch {batches[-1]:>4} in NVFlare, DDP on {ddp} device(s) under torchrun: "
                          f"{fl['images_per_s']:>9.1f} img/s", flush=True)
    payload = {"image_size": size, "workers": workers, "results": results, "loader_images_per_s": loader,
               "model_only": model_only,
               "from_png": png, "in_nvflare": federated,
               "goal": "DenseNet-121 >= 2500 img/s at 224 px on one H100, data loading included"}
    # GPU figures are kept beside the CPU ones, not over them.
    name = "train_throughput_gpu" if gpu else "train_throughput"
    print(f"wrote {write_result(name, payload, smoke=args.smoke)}")


if __name__ == "__main__":
    main()
