"""Torch-free inference on exported fedxr ONNX models (onnxruntime + numpy + Pillow + pydicom).

    from fedxr.edge import load_model
    model = load_model("export/quickstart")           # an export folder or a .onnx file
    results = model.predict(["cxr.png", "study.dcm"])  # paths or (H, W) uint8 arrays
"""

from fedxr.edge.model import EdgeModel, ModelMetadataError, load_model

__all__ = ["EdgeModel", "ModelMetadataError", "load_model"]
