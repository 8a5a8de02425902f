"""User-facing errors, and the one way fedxr's commands turn them into messages and exit codes.

Every command line (``fedxr``, ``python -m fedxr.export``, ``python -m fedxr.edge``) runs its command
through :func:`run_command`, so they share one convention:

====  =====================================================================================
0     done
1     error: the command could not do its work; ``error: …`` on stderr names the file, key or
      argument and the fix (no traceback)
2     usage error (argparse: unknown option, missing argument)
3     done, but some results failed a check: inputs that could not be read (``predict``), an
      exported file outside its parity tolerance (``export``); the output says which
130   interrupted (Ctrl-C)
====  =====================================================================================
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CHECK_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: Modules of the ``train`` extra: a command that needs them in an edge-only install says how to get them.
TRAIN_EXTRA_MODULES = ("torch", "torchvision", "lightning", "pytorch_lightning", "nvflare", "timm", "pydantic", "yaml",
                       "pandas", "matplotlib", "onnx", "onnxscript", "torchmetrics", "pytorch_grad_cam", "tqdm")


class FedxrError(Exception):
    """An error caused by the user's input (a file, a recipe, an argument) with the fix in its text."""

    exit_code = EXIT_ERROR


class DataError(FedxrError):
    """A data file or data folder is missing, malformed or inconsistent."""


def _short_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def run_command(command: Callable[[], int | None]) -> int:
    """Run a command function; map what it raises to a message on stderr and an exit code."""
    # Warnings (a deprecated recipe key, few calibration images) are for users: one plain line each.
    formatwarning, warnings.formatwarning = warnings.formatwarning, _short_warning
    try:
        return int(command() or EXIT_OK)
    except FedxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        print(f"error: this command needs fedxr's training stack (module {exc.name!r} is not installed): "
              "pip install 'fedxr[train]'", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.formatwarning = formatwarning
