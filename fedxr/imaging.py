"""Reading clinical image files into one 8-bit gray array, and resizing it. Torch-free.

This is the single implementation of image decoding used everywhere: the training cache, evaluation
and the edge runtime (which must run where torch is absent). It needs only numpy, Pillow and pydicom.

Conversion rules (documented because a model is only valid on inputs preprocessed the same way):

* 8-bit gray PNG/JPEG: unchanged.
* RGB, RGBA, LA and palette images: converted with ITU-R 601 luma (Pillow's ``convert("L")``);
  alpha is ignored (NIH's RGBA PNGs are opaque).
* 16-bit (and 32-bit integer) gray PNG: values are scaled linearly from ``[0, 4095]`` when the image's
  maximum fits in 12 bits (typical detector data), else from ``[0, 65535]``.
* DICOM: modality LUT (rescale slope/intercept), then the VOI LUT or the first window centre/width
  when present, else the min..max of the pixel data, mapped to 0..255; MONOCHROME1 is inverted so that
  bone is always bright.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedxr.errors import DataError

if TYPE_CHECKING:  # for the annotation only: this module must import without torch (the edge runtime)
    import torch

#: A numpy array here and at the edge, a torch tensor on the training device (fedxr.data.augment).
ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")

#: File name suffixes treated as images when searching folders.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


class ImageReadError(DataError):
    """An image file could not be decoded; the message names the file."""


def _is_dicom(name: str, head: bytes) -> bool:
    return head[128:132] == b"DICM" or Path(name).suffix.lower() in (".dcm", ".dicom")


def _scale_to_uint8(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    arr = arr.astype(np.float32)
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr - low) * (255.0 / (high - low))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        top = 4095.0 if arr.max(initial=0) <= 4095 else 65535.0
        return _scale_to_uint8(arr, 0.0, top)
    if img.mode == "F":
        arr = np.asarray(img)
        return _scale_to_uint8(arr, float(arr.min()), float(arr.max()))
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGB" if img.mode == "RGBA" else "L")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _read_dicom(data: bytes, path: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from None
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame is the radiograph
    if pixels.ndim != 2:
        raise ImageReadError(f"{path}: DICOM pixel data has shape {pixels.shape}; expected one gray frame")
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)

    def to_display(values: np.ndarray) -> np.ndarray:  # modality LUT, then the VOI LUT / window: per value
        values = apply_modality_lut(values, ds)
        if not has_voi:
            return values.astype(np.float32)
        if "VOILUTSequence" not in ds:  # a window works on floats
            return apply_voi_lut(values.astype(np.float32), ds, index=0).astype(np.float32)
        # A VOI LUT table is indexed by integer modality values (a rescale of 1/0 still makes them floats).
        if values.dtype.kind == "f" and np.array_equal(values, np.rint(values)):
            values = values.astype(np.int64)
        return apply_voi_lut(values, ds, index=0).astype(np.float32)

    try:
        out = _dicom_to_uint8(pixels, to_display)
    except Exception as exc:  # a broken LUT or window (e.g. width 0) in the header
        raise ImageReadError(f"{path}: its DICOM display values cannot be computed ({type(exc).__name__}: {exc}); "
                             "check the Rescale/Window/VOI LUT attributes or remove the file") from None
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 255 - out
    return out


def _dicom_to_uint8(pixels: np.ndarray, to_display) -> np.ndarray:
    """Stored values → display values (``to_display``) → 0..255 over the range of the image's display values."""
    if pixels.dtype.kind in "iu" and pixels.dtype.itemsize <= 2:
        # Integer detector data: every step is a function of the stored value alone, so it is computed once per
        # possible value and looked up (the same numbers as per pixel, ~5x faster on 1024-px images, and no
        # float copies of the whole image). The display range is that of the values present.
        lowest, highest = pixels.min(), pixels.max()
        # value − lowest fits the unsigned type of the same width (a signed subtraction that wraps reads right)
        index = (pixels - lowest).view(np.dtype(f"u{pixels.dtype.itemsize}"))
        display = to_display(np.arange(int(lowest), int(highest) + 1, dtype=np.int32).astype(pixels.dtype))
        step = np.diff(display)
        if (step >= 0).all() or (step <= 0).all():  # monotonic (rescale and windowing): the ends are present
            low, high = sorted((float(display[0]), float(display[-1])))
        else:  # e.g. a non-monotonic LUT: the range of the values that occur
            present = display[np.bincount(index.ravel(), minlength=len(display)) > 0]
            low, high = float(present.min()), float(present.max())
        return _scale_to_uint8(display, low, high)[index]
    arr = to_display(pixels)
    return _scale_to_uint8(arr, float(arr.min()), float(arr.max()))


def read_gray(path: str | Path) -> np.ndarray:
    """Read a PNG, JPEG or DICOM file into an (H, W) uint8 array. Raises ImageReadError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot open ({exc})") from None
    return decode_gray(data, str(path))


def decode_gray(data: bytes, name: str = "<upload>", fix: str = "re-copy it or remove it from the list") -> np.ndarray:
    """:func:`read_gray` for a file's bytes already in memory (an upload is never written to disk);
    ``name`` is used in messages and, by its suffix, to recognise DICOM without a preamble; ``fix`` ends
    the message of an unreadable image."""
    if not data:
        raise ImageReadError(f"{name}: file is empty (0 bytes); re-copy it from the source")
    if _is_dicom(name, data[:132]):
        return _read_dicom(data, name)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _pil_to_gray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(exc))
        raise ImageReadError(f"{name}: corrupt or unsupported image ({reason}); {fix}") from None


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) uint8 image to (size, size) with antialiased bilinear filtering.

    The aspect ratio is not kept (chest radiographs are close to square; this matches CheXNet-style
    preprocessing). Both training and the edge runtime call this one function.
    """
    if gray.shape == (size, size):
        return gray
    img = Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8))
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def load_for_model(path: str | Path, size: int) -> np.ndarray:
    """Read and resize: the (size, size) uint8 array a model's preprocessing starts from."""
    return resize_square(read_gray(path), size)


def to_unit(gray: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W) → float32 in [0, 1]."""
    return np.asarray(gray, dtype=np.float32) / np.float32(255.0)


def standardize(unit: ArrayT, mean: float, std: float) -> ArrayT:
    """(x − mean) / std on float32 arrays (or tensors) in [0, 1]: the model's input normalisation."""
    return (unit - np.float32(mean)) / np.float32(std)


def model_input(grays: list[np.ndarray] | np.ndarray, mean: float, std: float) -> np.ndarray:
    """Stack resized uint8 images into the (N, 1, S, S) float32 batch a fedxr model takes."""
    batch = np.stack([np.asarray(g, dtype=np.uint8) for g in grays])
    return standardize(to_unit(batch), mean, std)[:, None, :, :]
