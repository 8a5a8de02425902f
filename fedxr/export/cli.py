"""The export command line, shared by `fedxr export` and `python -m fedxr.export`."""

from __future__ import annotations

import argparse

from fedxr.errors import EXIT_CHECK_FAILED, EXIT_OK
from fedxr.export.targets import TARGETS

DESCRIPTION = ("Export a fedxr checkpoint to verified ONNX (FP32, INT8 when it pays off, optional FP16) for a laptop, "
               "an ARM board or a phone.")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint")
    p.add_argument("--target", choices=list(TARGETS), default="laptop",
                   help="; ".join(f"{t.name}: {t.help}" for t in TARGETS.values()))
    p.add_argument("--out", help="output folder (default: export/<run>_<model>, or export/<run>_student_<model>; "
                                     "_board or _mobile appended for those targets)")
    p.add_argument("--int8", choices=["auto", "on", "off"], default="auto",
                   help="auto: keep INT8 only when it is faster and loses at most 0.01 AUROC")
    p.add_argument("--fp16", action="store_true", help="also write an FP16 file (checked against its own tolerance)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--data", help="site manifests for validation images (default: the checkpoint's run)")
    p.add_argument("--calibration-images", type=int, default=200)
    p.add_argument("--parity-tolerance", type=float, default=1e-4, help="largest |logit| difference FP32 may have")
    p.add_argument("--operating-point", default="youden",
                   help="per-finding threshold rule on validation: youden, sensitivity:0.90 or specificity:0.95")
    p.add_argument("--ood-quantile", type=float, default=0.99,
                   help="validation quantile of the out-of-distribution score above which an image is flagged")
    p.add_argument("--trust-images", type=int, default=2000,
                   help="images per split read to fit calibration and the out-of-distribution score")
    p.set_defaults(func=export_command)
    return p


def export_command(args: argparse.Namespace) -> int:
    from fedxr.export.exporter import export_checkpoint, format_manifest

    manifest = export_checkpoint(args.checkpoint, args.out, args.int8, args.fp16, args.opset, args.data,
                                 args.calibration_images, args.parity_tolerance,
                                 target=args.target, operating_point=args.operating_point,
                                 ood_quantile=args.ood_quantile, trust_images=args.trust_images)
    print(format_manifest(manifest))
    return EXIT_OK if manifest["ok"] else EXIT_CHECK_FAILED
