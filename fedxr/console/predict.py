"""`/try`: one uploaded image → the model's 14 probabilities and findings, and a Grad-CAM overlay.

The upload arrives as bytes and stays in memory (:func:`fedxr.imaging.decode_gray`); predictions go
through :mod:`fedxr.edge` (onnxruntime). The heatmap needs the model's checkpoint (named in the export
manifest) and torch; where either is missing the page shows the image alone and says why.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from fedxr.imaging import decode_gray, resize_square

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DISPLAY_SIZE = 384

_models: dict[str, object] = {}
_lock = threading.Lock()
#: Grad-CAM hooks into the shared torch model: one heatmap at a time.
_cam_lock = threading.Lock()


def edge_model(folder: Path):
    """The export folder's recommended model, loaded once and shared by requests (onnxruntime sessions
    may run concurrently)."""
    from fedxr.edge import load_model

    key = str(folder.resolve())
    with _lock:
        if key not in _models:
            _models[key] = load_model(folder)
        return _models[key]


def warm_up(folders: list[Path], checkpoints: list[str | None]) -> threading.Thread:
    """Load what /try needs — the export folders' onnxruntime sessions, torch and the checkpoints Grad-CAM uses —
    in a background thread at start-up, so the first prediction does not wait for them (the pages answer
    meanwhile: nothing here holds a lock a page needs)."""
    def load() -> None:
        for folder in folders:
            try:
                edge_model(folder)
            except Exception:  # a broken export is reported when someone picks it, not at start-up
                pass
        for ckpt in checkpoints:
            try:
                if ckpt and Path(ckpt).is_file() and importlib.util.find_spec("torch") is not None:
                    import fedxr.explain  # noqa: F401  (torch, grad-cam)
                    _torch_model(str(Path(ckpt).resolve()), Path(ckpt).stat().st_mtime)
            except Exception:
                pass

    thread = threading.Thread(target=load, name="fedxr-warm-up", daemon=True)
    thread.start()
    return thread


def png_data_url(rgb_or_gray: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb_or_gray).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _overlay(gray: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The image with the heatmap blended in (grad-cam's own overlay, jet colours), at the image's size."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    cam = np.asarray(Image.fromarray(np.clip(cam, 0, 1).astype(np.float32)).resize(gray.shape[::-1]), np.float32)
    rgb = np.repeat(gray[..., None].astype(np.float32) / 255, 3, axis=2)
    return show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=True, image_weight=0.6)


@functools.lru_cache(maxsize=4)
def _torch_model(path: str, mtime: float):
    """The checkpoint's network, loaded once per file version (Grad-CAM needs gradients: torch, not ONNX)."""
    from fedxr.models.checkpoint import model_from_checkpoint

    return model_from_checkpoint(path)


def gradcam(checkpoint: str | None, gray: np.ndarray, label: str) -> tuple[np.ndarray | None, str | None]:
    """(heatmap at the model's input size, None) or (None, why there is none)."""
    if not checkpoint or not Path(checkpoint).is_file():
        return None, "no heatmap: the model's checkpoint is not on this machine"
    if importlib.util.find_spec("torch") is None:
        return None, "no heatmap: torch is not installed (pip install 'fedxr[train]')"
    from fedxr.explain import heatmaps, saved_cam_layer

    with _cam_lock:
        model, ckpt = _torch_model(str(Path(checkpoint).resolve()), Path(checkpoint).stat().st_mtime)
        size = ckpt["preprocessing"].size
        layer = saved_cam_layer(model, checkpoint)  # the layer `fedxr explain` chose on validation boxes, if any
        return heatmaps(model, ckpt, [{"gray": resize_square(gray, size), "label": label}], layer)[0], None


def predict_upload(data: bytes, name: str, folder: Path, checkpoint: str | None) -> dict:
    """Decode, predict and explain one upload. Raises fedxr.imaging.ImageReadError for unreadable data."""
    gray = decode_gray(data, name, fix="upload a PNG, JPEG or DICOM radiograph")
    model = edge_model(folder)
    result = model.predict([gray])[0]
    shown = resize_square(gray, DISPLAY_SIZE)
    top = max(result.probabilities, key=result.probabilities.get)
    label = result.findings[0][0] if result.findings else top
    why: str | None
    if result.withheld:  # a heatmap on an image the model is not for would look like an answer
        cam, why = None, "no heatmap: the image is not like those the model was trained on"
    else:
        cam, why = gradcam(checkpoint, gray, label)
    found = {lab for lab, _ in result.findings}
    return {
        "model": str(model.path.name), "input": name, "size": list(gray.shape),
        "trained_on": model.provenance, "synthetic": model.synthetic,
        "in_distribution": result.in_distribution, "ood_reason": result.ood_reason, "ood_score": result.ood_score,
        "calibrated": model.calibration is not None,
        "probabilities": [{"label": lab, "probability": result.probabilities[lab], "threshold": float(t),
                           "finding": lab in found, "reliable": lab not in model.unreliable,
                           "why": model.unreliable.get(lab), "operating_point": model.statement(lab)}
                          for lab, t in zip(model.labels, model.thresholds)],
        "findings": [{"label": lab, "probability": p, "operating_point": result.statements.get(lab)}
                     for lab, p in result.findings],
        "image": png_data_url(shown),
        "heatmap": png_data_url(_overlay(shown, cam)) if cam is not None else None,
        "heatmap_label": label if cam is not None else None, "heatmap_note": why,
    }
