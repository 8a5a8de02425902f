"""How a model's input is made from an image: the one ``Preprocessing`` value (torch-free).

Every fedxr model takes ``(N, 1, S, S)`` float32 built the same way (``DESCRIPTION``); what differs between
models is only the size ``S`` and the normalisation ``mean`` / ``std``. That triple is resolved once — from the
recipe's ``data.image_size`` and the model's registry entry (:meth:`fedxr.config.Recipe.preprocessing`) —
and then travels with the model: in the Lightning module, the fedxr checkpoint (``preprocessing``) and the
exported ONNX file's metadata (``fedxr.input_size``, ``fedxr.mean``, ``fedxr.std``). Every later stage
(evaluation, export, Grad-CAM, distillation, the edge runtime) reads it back from there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedxr.imaging import load_for_model, model_input

#: Normalisation for a model that states none (a foreign ONNX file; the test CNN): gray radiographs on
#: a 0..1 scale have roughly this mean and spread.
FALLBACK_MEAN, FALLBACK_STD = 0.5, 0.25

#: The steps, stored in every exported model so that a reader of the .onnx file alone can reproduce them.
DESCRIPTION = ("decode to 8-bit gray (fedxr.imaging.read_gray rules) -> resize to SxS, bilinear, antialiased, "
               "aspect not kept -> x/255 -> (x - mean)/std -> NCHW float32 with C=1")


@dataclass(frozen=True)
class Preprocessing:
    """Input size in pixels (square) and the normalisation of the 0..1 gray image."""

    size: int
    mean: float = FALLBACK_MEAN
    std: float = FALLBACK_STD

    def __post_init__(self):
        if int(self.size) < 1 or float(self.std) <= 0:
            raise ValueError(f"invalid preprocessing: size {self.size}, std {self.std}")
        # Plain Python numbers whatever came in (numpy scalars, tensors' .item()): the value is saved as JSON.
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, value: "Preprocessing | Mapping[str, Any]") -> "Preprocessing":
        """A Preprocessing from itself or from its dict form (checkpoints, job arguments)."""
        return value if isinstance(value, Preprocessing) else cls(**dict(value))

    # --- the ONNX metadata form: keys the edge runtime reads -----------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"input_size": self.size, "channels": 1, "mean": self.mean, "std": self.std,
                "preprocessing": DESCRIPTION}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "Preprocessing":
        return cls(int(meta["input_size"]), float(meta["mean"]), float(meta["std"]))

    # --- applying it -------------------------------------------------------------------------------------
    def load(self, path: str | Path) -> np.ndarray:
        """An image file → the (S, S) uint8 image the model input starts from."""
        return load_for_model(path, self.size)

    def batch(self, grays: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Resized uint8 images → the (N, 1, S, S) float32 batch the model takes."""
        return model_input(grays, self.mean, self.std)
