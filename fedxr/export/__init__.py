"""`python -m fedxr.export`: verified ONNX artifacts (FP32, INT8) with their metadata and manifest."""
