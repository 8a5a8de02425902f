"""python -m fedxr.export CKPT [--out DIR] [--int8 auto|on|off] [--fp16] [--opset N] [--data SITES_DIR]"""

import argparse
import sys

from fedxr.errors import FedxrError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedxr.export", description="Export a fedxr checkpoint to verified ONNX.")
    p.add_argument("checkpoint")
    p.add_argument("--out", help="output folder (default: export/<run>_<model>)")
    p.add_argument("--int8", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--data", help="site manifests for validation images (default: the checkpoint's run)")
    p.add_argument("--calibration-images", type=int, default=200)
    args = p.parse_args(argv)
    from fedxr.export.exporter import export_checkpoint, format_manifest

    try:
        manifest = export_checkpoint(args.checkpoint, args.out, args.int8, args.fp16, args.opset, args.data,
                                     args.calibration_images)
    except FedxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_manifest(manifest))
    return 0 if manifest["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
