"""python -m fedxr.export CKPT [--target laptop|board|mobile] [--out DIR] [--int8 auto|on|off] [--fp16]
                         [--opset N] [--data SITES_DIR]

The same command as `fedxr export`."""

import argparse
import sys

from fedxr.errors import run_command
from fedxr.export.cli import DESCRIPTION, add_arguments


def main(argv=None) -> int:
    args = add_arguments(argparse.ArgumentParser(prog="python -m fedxr.export", description=DESCRIPTION)).parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
