"""The student classifier trained against a frozen teacher.

``DistillClassifier`` is an ``XRayClassifier`` (so validation AUROC, thresholds and the checkpoint of
the *student* work exactly as for any fedxr model) with a frozen teacher beside it: ``eval()`` always,
``requires_grad_(False)``, run under ``no_grad()``. The teacher sees the batch at its own input size
and normalisation (``teacher_preprocessing``, read from the teacher's checkpoint). Task and distillation losses are logged separately.

The teacher is a registered submodule, so its weights are part of the module's ``state_dict``: in a
federated job they reach every site with the global model (through NVFlare, no manual copying) and,
being frozen and identical everywhere, averaging leaves them unchanged.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedxr.distill.losses import distillation_loss
from fedxr.labels import TRAIN_KD_LOSS, TRAIN_LOSS, TRAIN_TASK_LOSS
from fedxr.models.checkpoint import load_checkpoint
from fedxr.models.classifier import XRayClassifier
from fedxr.models.registry import build_model, get_spec
from fedxr.preprocessing import Preprocessing


class DistillClassifier(XRayClassifier):
    """Student logits (N, 14) from images (N, 1, S, S); loss = (1 − α)·BCE + α·T²·KL(teacher ‖ student)."""

    def __init__(self, model_name: str, teacher_name: str, teacher_preprocessing: Preprocessing | dict | None = None,
                 alpha: float = 0.7, temperature: float = 2.0, teacher_checkpoint: str | None = None, **kwargs):
        super().__init__(model_name, **kwargs)
        self.teacher_name, self.alpha, self.temperature = teacher_name, alpha, temperature
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_preprocessing = (Preprocessing.coerce(teacher_preprocessing) if teacher_preprocessing is not None
                                      else get_spec(teacher_name).preprocessing())
        self.teacher = build_model(teacher_name)
        if teacher_checkpoint:
            ckpt = load_checkpoint(teacher_checkpoint)
            if ckpt["model_name"] != teacher_name:
                raise ValueError(f"{teacher_checkpoint} holds {ckpt['model_name']!r}, not the teacher {teacher_name!r}")
            self.teacher.load_state_dict(ckpt["state_dict"])
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm statistics and dropout stay in inference mode
        return self

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The student's batch re-expressed at the teacher's input size and normalisation."""
        mine, theirs = self.preprocessing, self.teacher_preprocessing
        unit = x * mine.std + mine.mean
        if unit.shape[-1] != theirs.size:
            unit = F.interpolate(unit, size=(theirs.size, theirs.size), mode="bilinear", align_corners=False, antialias=True)
        return (unit - theirs.mean) / theirs.std

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.teacher_input(x))

    def training_step(self, batch, batch_idx):
        x, y = self.mix(*batch)  # with mixup on, the teacher labels the mixed images
        total, task, kd = distillation_loss(self(x), self.teacher_logits(x), y, self.alpha, self.temperature,
                                            pos_weight=self._pos_weight.to(x.device))
        n = len(x)
        self.log(TRAIN_LOSS, total, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log(TRAIN_TASK_LOSS, task, on_step=False, on_epoch=True, batch_size=n)
        self.log(TRAIN_KD_LOSS, kd, on_step=False, on_epoch=True, batch_size=n)
        return total
