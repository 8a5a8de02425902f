"""The console under load, on loopback only: `/try` latency, concurrent predictions, page load times.

    python benchmarks/console_load.py            # after `make demo`: the quickstart student, 1024 x 1024 PNG
    python benchmarks/console_load.py --smoke    # a tiny run made here (CI passes its own: --runs/--exports/--model)

1. Server-side `/try` time (decode + resize + onnxruntime + Grad-CAM overlay) for one 1024 x 1024 PNG, the
   model's onnxruntime and torch limited to one thread: p50/p95 over --repeats calls, with and without the
   heatmap. Goal: p50 <= 100 ms on one core.
2. 20 concurrent clients x 10 predictions each against a live server on 127.0.0.1: errors (goal 0),
   throughput, client-side p50/p95.
3. Page load (server time to the full HTML) of `/` and the run page, p50 over --repeats.
Every request loop is bounded (a fixed count of requests, a timeout on each).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "benchmark-password-1"


def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "n": len(ms)}


def test_png(size: int = 1024) -> bytes:
    """A 1024 x 1024 gray radiograph-like PNG (a real NIH image when the shared folder is there)."""
    real = ROOT.parent / "shared" / "data" / "nih" / "00000001_000.png"
    if real.is_file():
        return real.read_bytes()
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = (120 + 80 * np.sin(6 * xx) * np.cos(4 * yy) + np.random.default_rng(0).normal(0, 12, (size, size)))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tiny_run(work: Path) -> tuple[Path, Path, str]:
    from fedxr.cli import main

    ov = [f"data.root={work / 'phantom'}", "data.phantom.patients=40", "data.phantom.hospitals=2", "data.phantom.size=48",
          "data.image_size=32", "data.sites=2", "data.batch_size=8", "data.num_workers=0",
          f"data.cache_dir={work / 'cache'}", "model.name=tiny_cnn", "model.max_epochs=1", "federated.rounds=1",
          "federated.min_clients=2", "distill.students=[]", "explain.enabled=false", "export.calibration_images=16",
          f"output.runs_dir={work / 'runs'}", "output.name=bench", f"export.out={work / 'export'}"]
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), *ov]) == 0
    return work / "runs", work / "export", "bench_tiny_cnn"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", help="runs folder (default: runs/; --smoke: a tiny run made here)")
    ap.add_argument("--exports", help="exports folder (default: export/; --smoke: the tiny run's)")
    ap.add_argument("--model", help="export folder to predict with (default: quickstart_student_resnet18_quarter)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--per-client", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedxr-console-bench-"))
    if args.smoke and not args.exports:
        runs, exports, model = tiny_run(work)
    else:
        runs, exports = Path(args.runs or ROOT / "runs"), Path(args.exports or ROOT / "export")
        model = args.model or "quickstart_student_resnet18_quarter"
    if args.smoke:
        args.repeats, args.clients, args.per_client = 5, 4, 3
    if not (exports / model / "manifest.json").is_file():
        raise SystemExit(f"no export {exports / model}: run `make demo` first (or pass --exports/--model)")
    run_name = next((p.parent.name for p in sorted(runs.glob("*/pipeline.json"))), None)

    import torch

    torch.set_num_threads(1)
    from fedxr.console import predict as P
    from fedxr.console.data import list_models
    from fedxr.edge import load_model

    P._models[str((exports / model).resolve())] = load_model(exports / model, threads=1)  # one core
    checkpoint = next(m["checkpoint"] for m in list_models(exports) if m["folder"] == model)
    png = test_png()
    server_side = {}
    for label, ckpt in (("predict_and_heatmap", checkpoint), ("predict_only", None)):
        P.predict_upload(png, "x.png", exports / model, ckpt)  # warm-up: model load, first heatmap
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            P.predict_upload(png, "x.png", exports / model, ckpt)
            times.append(1000 * (time.perf_counter() - t))
        server_side[label] = percentiles(times)

    import httpx

    from fedxr.console.app import create_app
    from fedxr.console.store import Store

    Store(work / "c.sqlite").add_user("bench", "coordinator", PASSWORD)
    app = create_app(runs, work / "c.sqlite", exports)
    from fedxr.console.server import background_server

    with background_server(app) as base:
        def session() -> tuple[httpx.Client, str]:
            client = httpx.Client(base_url=base, timeout=60)
            token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
            client.post("/login", data={"name": "bench", "password": PASSWORD, "csrf": token, "next": "/"})
            return client, re.search(r'data-csrf="([^"]+)"', client.get("/try").text).group(1)

        def one_client(_) -> list[tuple[int, float]]:
            client, csrf = session()
            out = []
            try:
                for _ in range(args.per_client):
                    t = time.perf_counter()
                    r = client.post(f"/api/predict?model={model}", content=png,
                                    headers={"X-CSRF-Token": csrf, "X-Filename": "x.png"})
                    out.append((r.status_code, 1000 * (time.perf_counter() - t)))
            finally:
                client.close()
            return out

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            results = [x for batch in pool.map(one_client, range(args.clients)) for x in batch]
        wall = time.perf_counter() - t0
        errors = sum(code != 200 for code, _ in results)
        concurrent_result = {"clients": args.clients, "per_client": args.per_client, "requests": len(results),
                             "errors": errors, "wall_s": round(wall, 2),
                             "predictions_per_s": round(len(results) / wall, 2),
                             **percentiles([ms for _, ms in results])}
        client, _ = session()
        pages = {}
        try:
            for label, path in (("home", "/"), ("run", f"/runs/{run_name}")):
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    assert client.get(path).status_code == 200
                    times.append(1000 * (time.perf_counter() - t))
                pages[label] = percentiles(times)
        finally:
            client.close()
    goals = {"try_p50_le_100ms_one_core": server_side["predict_and_heatmap"]["p50_ms"] <= 100,
             "concurrent_no_error": errors == 0}
    payload = {"model": model, "image": "1024x1024 PNG", "server_side": server_side, "concurrent": concurrent_result,
               "pages": pages, "goals": goals, "run": run_name}
    print(f"wrote {write_result('console_load', payload, smoke=args.smoke)}")
    for k, v in {**server_side, "concurrent": concurrent_result, **{f"page {k}": v for k, v in pages.items()}}.items():
        print(f"  {k:<22} {v}")
    print("  goals:", goals)
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
