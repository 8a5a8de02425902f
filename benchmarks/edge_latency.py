"""Edge latency: PyTorch eager vs onnxruntime FP32 vs INT8, for a teacher and a student, on this machine.

    python benchmarks/edge_latency.py            # DenseNet-121 vs MobileNetV3-Small at 224 px
    python benchmarks/edge_latency.py --smoke    # tiny_cnn at 32 px (CI)

Each model is trained for one epoch on a small phantom set (so AUROC is real, if modest), exported with
`fedxr.export` (FP32 + INT8 kept regardless), and timed at batch 1 and 8 with 1 and 2 threads:
p50/p95 latency, model size, and macro AUROC of every format on the same validation images.
Each row also gives the model's achieved GFLOP/s (2 × MACs × batch / p50) and its share of this machine's
measured FP32 peak at that thread count (a large square matmul), so the distance to the hardware is visible.
Goals: the student's best format >= 50x faster than the teacher in PyTorch eager at batch 1;
onnxruntime >= 2x faster than PyTorch eager for the same student.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import one_epoch_checkpoints, write_result  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from fedxr.export.exporter import export_checkpoint, validation_images  # noqa: E402
from fedxr.models.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from fedxr.models.metrics import multilabel_scores  # noqa: E402


def timed(fn, runs: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(runs):
        s = time.perf_counter()
        fn()
        t.append((time.perf_counter() - s) * 1000)
    return round(float(np.percentile(t, 50)), 3), round(float(np.percentile(t, 95)), 3)


def matmul_peak_gflops(threads: int, n: int = 2048, runs: int = 10) -> float:
    """FP32 GFLOP/s of the fastest of ``runs`` n × n matmuls with ``threads`` threads: this CPU's practical peak."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(runs))
    return round(2 * n**3 / best / 1e9, 1)


def _seconds(fn) -> float:
    s = time.perf_counter()
    fn()
    return time.perf_counter() - s


def auroc(logits: np.ndarray, y: np.ndarray) -> float:
    return round(multilabel_scores(torch.sigmoid(torch.from_numpy(logits)), torch.from_numpy(y.copy()))["macro_auroc"], 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    models = {"teacher": "tiny_cnn", "student": "tiny_cnn"} if args.smoke else \
        {"teacher": "densenet121", "student": "mobilenetv3_small_100"}
    size, patients, runs = (32, 40, 3) if args.smoke else (224, 150, args.runs)
    rows = []
    peak = {t: matmul_peak_gflops(t, n=256 if args.smoke else 2048) for t in (1, 2)}
    print(f"matmul FP32 peak: {peak[1]} GFLOP/s (1 thread), {peak[2]} GFLOP/s (2 threads)", flush=True)
    from fedxr.models.registry import complexity

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoints, sites = one_epoch_checkpoints(tmp, {role: (name, size) for role, name in models.items()}, patients)
        for role, name in models.items():
            ckpt_path = checkpoints[role]
            out = tmp / f"export_{role}"
            export_checkpoint(ckpt_path, out, int8="on", data=sites, calibration_images=100)
            model, ckpt = model_from_checkpoint(load_checkpoint(ckpt_path))
            images, y = validation_images(ckpt, sites, 200)
            x = ckpt["preprocessing"].batch(images)
            torch_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            with torch.no_grad():
                eager_logits = np.concatenate([model(torch.from_numpy(x[i:i + 16])).numpy() for i in range(0, len(x), 16)])
            formats = {"pytorch-eager": (None, torch_bytes, auroc(eager_logits, y))}
            for fmt, fname in (("onnx-fp32", f"{name}_fp32.onnx"), ("onnx-int8", f"{name}_int8.onnx")):
                sess = ort.InferenceSession(str(out / fname), providers=["CPUExecutionProvider"])
                logits = np.concatenate([sess.run(None, {"image": x[i:i + 16]})[0] for i in range(0, len(x), 16)])
                formats[fmt] = (out / fname, (out / fname).stat().st_size, auroc(logits, y))
            for threads in (1, 2):
                for batch in (1, 8):
                    xb = x[:batch] if len(x) >= batch else np.repeat(x[:1], batch, axis=0)
                    for fmt, (path, nbytes, auc) in formats.items():
                        if path is None:
                            torch.set_num_threads(threads)
                            with torch.no_grad():
                                p50, p95 = timed(lambda: model(torch.from_numpy(xb)), runs)  # noqa: B023 (called here)
                        else:
                            so = ort.SessionOptions()
                            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
                            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                            p50, p95 = timed(lambda: sess.run(None, {"image": xb}), runs)  # noqa: B023 (called here)
                        gflops = 2 * complexity(name, size)[1] * batch / (p50 / 1000) / 1e9
                        rows.append({"role": role, "model": name, "format": fmt, "threads": threads, "batch": batch,
                                     "p50_ms": p50, "p95_ms": p95, "size_mb": round(nbytes / 1e6, 2), "val_auroc": auc,
                                     "gflops": round(gflops, 2), "share_of_peak": round(gflops / peak[threads], 4)})
                        print(f"{role:<8}{name:<24}{fmt:<15} t={threads} b={batch}: p50 {p50:8.2f} ms  p95 {p95:8.2f} ms  "
                              f"{nbytes / 1e6:6.2f} MB  AUROC {auc:.4f}  {gflops:6.1f} GFLOP/s "
                              f"({100 * gflops / peak[threads]:.0f}% of peak)", flush=True)
    def p50(role, fmt, threads=1, batch=1):
        return next(r["p50_ms"] for r in rows if r["role"] == role and r["format"] == fmt and r["threads"] == threads
                    and r["batch"] == batch)
    best_student = min(p50("student", f) for f in ("pytorch-eager", "onnx-fp32", "onnx-int8"))
    goals = {"student_best_vs_teacher_eager_b1": round(p50("teacher", "pytorch-eager") / best_student, 1),
             "student_onnx_vs_eager_b1": round(p50("student", "pytorch-eager") / min(p50("student", "onnx-fp32"),
                                                                                        p50("student", "onnx-int8")), 2),
             "targets": {"student_best_vs_teacher_eager_b1": 50, "student_onnx_vs_eager_b1": 2}}
    print(f"student (best format) vs teacher eager, batch 1, 1 thread: {goals['student_best_vs_teacher_eager_b1']}x (goal 50x)")
    print(f"student onnxruntime vs eager, batch 1, 1 thread: {goals['student_onnx_vs_eager_b1']}x (goal 2x)")
    print(f"wrote {write_result('edge_latency', {'image_size': size, 'rows': rows, 'goals': goals, 'matmul_peak_gflops': peak}, smoke=args.smoke)}")


if __name__ == "__main__":
    main()
