"""`python -m fedxr.edge predict|bench`: the command line of the torch-free runtime."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from fedxr.energy import ASSUMED_CORE_W, edge_energy_per_image_j
from fedxr.data.provenance import SYNTHETIC_WARNING
from fedxr.errors import EXIT_CHECK_FAILED, EXIT_OK, FedxrError, run_command
from fedxr.imaging import IMAGE_SUFFIXES


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given, folders searched recursively for images, globs expanded; order kept."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in item for ch in "*?["):
            out += sorted(glob.glob(item, recursive=True))
        else:
            out.append(item)  # a missing file is reported by name by predict
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from fedxr.edge.model import load_model

    model = load_model(args.model, threads=args.threads, labels=args.labels.split(",") if args.labels else None,
                       verify=not args.no_verify)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise FedxrError("no input images found (give files, folders or globs of PNG, JPEG or DICOM)")
    # Results are written as they come (input order), so a folder of any size needs no more memory than a batch.
    failed = total = 0
    # What the model was trained on, before its first prediction (stderr for the machine-readable formats).
    side = sys.stderr if (args.csv or args.json) else sys.stdout
    if model.synthetic:
        print(f"*** {SYNTHETIC_WARNING.upper()} ***", file=side)
    print(f"model: {model.provenance}", file=side)
    if model.unreliable:
        print(f"not reliable in this model (never shown as findings): {', '.join(model.unreliable)}", file=side)
    if model.calibration is None:
        print("this file has no calibration or out-of-distribution check (exported by an older fedxr): "
              "probabilities are uncalibrated; re-export it", file=side)
    warning = SYNTHETIC_WARNING if model.synthetic else None
    writer = csv.writer(sys.stdout) if args.csv else None
    if writer:
        writer.writerow(["input", "error", "in_distribution", "ood_score", *model.labels, "findings"])
    elif args.json:
        sys.stdout.write("[")
    try:
        for r in model.predict_iter(paths, batch_size=args.batch, workers=args.workers):
            if args.json:
                item = {**r.as_dict(), **({"warning": warning} if warning else {})}
                sys.stdout.write(("," if total else "") + "\n" + json.dumps(item, indent=2))
            elif writer:
                writer.writerow([r.input, r.error or "", "" if r.in_distribution is None else r.in_distribution,
                                 "" if r.ood_score is None else r.ood_score,
                                 *(r.probabilities.get(l, "") for l in model.labels), "|".join(l for l, _ in r.findings)])
            elif r.error:
                print(f"{r.input}: ERROR {r.error}")
            elif r.withheld:
                print(f"{r.input}: WARNING {r.ood_reason} — findings withheld" + (f"  [{warning}]" if warning else ""))
            else:
                found = "; ".join(f"{l} {p:.2f} ({r.statements[l]})" if l in r.statements else f"{l} {p:.2f}"
                                  for l, p in r.findings) or "no finding above its threshold"
                print(f"{r.input}: {found}" + (f"  [{warning}]" if warning else ""))
            total += 1
            failed += r.error is not None
    finally:  # the JSON array is closed even when the run stops part-way, so what was written still parses
        if args.json:
            sys.stdout.write("\n]\n")
    if failed:
        print(f"{failed} of {total} input(s) could not be read", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """What a model is, what it was trained on, what its thresholds mean and the model card's summary."""
    from fedxr.edge.model import load_model
    from fedxr.trust.card import summary

    model = load_model(args.model, verify=not args.no_verify)
    folder = model.path.parent
    card = summary(folder)
    meta = model.meta
    lines = [f"model: {model.path} ({meta.get('format', '?')}, {meta.get('model_name', '?')}, input {model.size} px)"]
    if model.synthetic:
        lines.insert(0, f"*** {SYNTHETIC_WARNING.upper()} ***")
    lines.append(f"data: {model.provenance}")
    lines.append("integrity: size and SHA-256 match the export manifest" if model.verified else
                 "integrity: not checked (--no-verify, or no export manifest lists this file)")
    if model.ood:
        lines.append(f"out-of-distribution check: {model.ood['method']}; flagged above {model.ood['threshold']:.3f} "
                     f"(validation {model.ood.get('val_flagged')}, test {model.ood.get('test_flagged')} flagged)")
    if model.calibration:
        done = [l for l, c in zip(model.labels, model.calibration["calibrated"]) if c]
        lines.append(f"calibration: {model.calibration['method']} on validation ({len(done)} of {len(model.labels)} findings)")
    else:
        lines.append("calibration: none (exported by an older fedxr; re-export for calibrated probabilities and the OOD check)")
    if model.operating_points:
        lines.append(f"{'finding':<20}{'threshold':>10}  operating point (validation)")
        for p in model.operating_points:
            text = model.statement(p["label"]) or f"not reliable in this model: {p['why']}"
            lines.append(f"{p['label']:<20}{p['threshold']:>10.3f}  {text}")
    if card:
        lines += ["", f"--- {folder / 'MODEL_CARD.md'} (summary) ---", card]
    else:
        lines.append(f"no MODEL_CARD.md beside {model.path.name}")
    if args.json:
        print(json.dumps({"model": str(model.path), "verified": model.verified, "trained_on": model.trained_on, "ood": model.ood,
                          "calibration": model.calibration, "operating_points": model.operating_points,
                          "model_card_summary": card}, indent=2))
    else:
        print("\n".join(lines))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from fedxr.edge.model import load_model

    model = load_model(args.model, threads=args.threads, spinning=True, verify=not args.no_verify)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 1, model.size, model.size)).astype(np.float32)
    for _ in range(args.warmup):
        model.logits(x)
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        model.logits(x)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    result = {"model": str(model.path), "provider": model.provider, "threads": args.threads, "batch": args.batch,
              "p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
              "images_per_s": round(args.batch / float(np.median(times)), 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    # An estimate, not a measurement: the busy cores' power (assumed unless --core-watts) x time per image.
    threads = args.threads or os.cpu_count() or 1
    per_image_ms = float(np.median(ms)) / args.batch
    result["energy_mj_per_image_estimate"] = round(1000 * edge_energy_per_image_j(per_image_ms, threads, args.core_watts), 2)
    result["energy_basis"] = (f"estimate: {threads} busy core(s) x {args.core_watts or ASSUMED_CORE_W:g} W"
                              + ("" if args.core_watts else " (assumed; --core-watts sets it)") + " x time per image")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']} [{result['provider']}, {args.threads or 'default'} threads, batch {args.batch}]: "
              f"p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, {result['images_per_s']} img/s, "
              f"peak RSS {result['peak_rss_mb']} MB; ~{result['energy_mj_per_image_estimate']} mJ per image "
              f"({result['energy_basis']})")
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _add_no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="load the model file without checking it against the SHA-256 its export manifest lists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedxr.edge", description="Torch-free chest X-ray inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="findings for PNG, JPEG and DICOM files")
    p.add_argument("model", help="export folder or .onnx file")
    p.add_argument("inputs", nargs="+", help="files, folders (searched recursively) or globs")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="all 14 probabilities per image, as JSON")
    fmt.add_argument("--csv", action="store_true")
    p.add_argument("--batch", type=positive_int, default=8, help="images per model run (a folder holds at most "
                                                                   "2 x batch + 2 x workers images in memory)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: its own choice, one per core)")
    p.add_argument("--workers", type=positive_int, help="threads decoding and resizing images while the model runs "
                                               "(default: one per core)")
    p.add_argument("--labels", help="comma-separated label names for an ONNX file without fedxr metadata")
    _add_no_verify(p)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("info", help="what a model is, what it was trained on, its thresholds and model card")
    p.add_argument("model", help="export folder or .onnx file")
    p.add_argument("--json", action="store_true")
    _add_no_verify(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="latency and throughput of a model on this machine")
    p.add_argument("model")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--core-watts", type=float, help="power of one busy core, for the energy estimate "
                                                     "(default: an assumed 10 W)")
    p.add_argument("--json", action="store_true")
    _add_no_verify(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))
