"""The metadata keys a fedxr ONNX model carries (``metadata_props``), shared by export and the edge."""

from __future__ import annotations

import json

PREFIX = "fedxr."
#: Every key an exported fedxr model carries (the exporter writes exactly these).
KEYS = ("labels", "input_size", "channels", "mean", "std", "preprocessing", "thresholds", "model_name",
        "fedxr_version", "checkpoint_sha256", "val_auroc", "format", "trained_on", "calibration",
        "operating_points", "ood")
#: What the runtime cannot work without (an ONNX file lacking them needs ``--labels``).
REQUIRED = ("labels", "input_size", "mean", "std", "thresholds")


def encode(values: dict) -> dict[str, str]:
    """Python values → ``{"fedxr.key": json string}`` for ``metadata_props``."""
    return {PREFIX + k: json.dumps(v) for k, v in values.items()}


def decode(props: dict[str, str]) -> dict:
    """``metadata_props`` (or onnxruntime's custom_metadata_map) → Python values of fedxr keys."""
    return {k[len(PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(PREFIX)}
