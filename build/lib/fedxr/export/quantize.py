"""Static INT8 quantisation with onnxruntime (QDQ, per-channel weights, uint8 activations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed validation batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self._items = iter([{input_name: b} for b in batches])

    def get_next(self):
        return next(self._items, None)


def quantize_int8(fp32: Path, out: Path, input_name: str, batches: list[np.ndarray]) -> Path:
    """Activations uint8, weights int8 per channel (measured faster than int8/int8 on x86 here)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepped = out.with_name(out.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
        source = prepped
    except Exception:  # pre-processing is an optimisation; quantise the original when it fails
        source = fp32
    quantize_static(str(source), str(out), _Calibration(input_name, batches), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    prepped.unlink(missing_ok=True)
    return out
