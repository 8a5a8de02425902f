"""The multi-label chest X-ray classifier as a LightningModule (teacher and student alike)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

from fedxr.labels import NUM_LABELS, TEST_AP, TEST_AUROC, TRAIN_LOSS, VAL_AP, VAL_AUROC, VAL_LOSS, per_class_metric
from fedxr.models.checkpoint import save_checkpoint
from fedxr.models.loss import masked_bce_with_logits
from fedxr.models.metrics import choose_thresholds, multilabel_scores
from fedxr.models.registry import build_model, get_spec
from fedxr.models.trainable import freeze_except
from fedxr.preprocessing import Preprocessing

if TYPE_CHECKING:
    from fedxr.privacy.dp import SitePrivacy

log = logging.getLogger(__name__)


def pos_weight_from_labels(labels: np.ndarray, cap: float) -> list[float]:
    """BCE pos_weight per class = known negatives / known positives, capped; 1.0 for a class with no
    positives. Unknown labels (NaN) count as neither."""
    labels = np.asarray(labels, dtype=np.float64)
    pos = (labels == 1).sum(0)
    neg = (labels == 0).sum(0)
    return [float(min(cap, n / p)) if p > 0 else 1.0 for p, n in zip(pos, neg)]


class XRayClassifier(L.LightningModule):
    """Images (N, 1, S, S) → logits (N, 14). BCE-with-logits, AdamW, warm-up + cosine schedule.

    Validation computes per-class and macro AUROC / AP (``val_auroc`` is the key metric) and re-chooses
    the per-class decision thresholds, which are kept in the ``thresholds`` buffer and so travel with
    every checkpoint.
    """

    thresholds: torch.Tensor  # a buffer (register_buffer in __init__)
    _compiled: Callable[[torch.Tensor], torch.Tensor] | None  # set in __init__, outside the module tree

    def __init__(
        self, model_name: str, pretrained: bool = False, lr: float = 1e-3, weight_decay: float = 1e-4,
        warmup_epochs: float = 0.0, pos_weight: list[float] | None = None, channels_last: bool = False,
        compile_model: bool = False, threshold_rule: str = "youden",
        preprocessing: Preprocessing | dict | None = None, schedule_epochs: int | None = None,
        schedule_steps: int | None = None, epoch_steps: int | None = None, init_seed: int | None = None, mixup: float = 0.0, norm: str = "batch",
        trainable: str = "all", optimizer: str = "adamw", momentum: float = 0.9,
    ):
        super().__init__()
        self.save_hyperparameters()
        # Constructor arguments are also kept as same-named attributes: NVFlare's job builder rebuilds
        # a component from them when a recipe registers the model instance (FedOpt does).
        self.model_name, self.pretrained, self.lr, self.weight_decay = model_name, pretrained, lr, weight_decay
        self.warmup_epochs, self.channels_last, self.compile_model = warmup_epochs, channels_last, compile_model
        self.threshold_rule = threshold_rule
        # Length of the learning-rate schedule when it spans several fits (federated rounds): the
        # whole federation, not one round, so later rounds do not train at a decayed-to-zero rate.
        self.schedule_epochs, self.schedule_steps = schedule_epochs, schedule_steps
        # Rounds limited by steps (federated.local_steps / max_local_steps): one round counts as one epoch for the
        # warm-up, for every site alike — a capped site's whole epoch would stretch its warm-up over many rounds.
        self.epoch_steps = epoch_steps
        # The input this model is trained on: given by the caller (resolved from the recipe, or read from a
        # checkpoint); the registry's own default only when the module is built bare.
        self.preprocessing = (Preprocessing.coerce(preprocessing) if preprocessing is not None
                              else get_spec(model_name).preprocessing())
        self.init_seed, self.mixup, self.norm = init_seed, mixup, norm
        # Set by fedxr.privacy.dp.attach at a site that trains with differential privacy (and, there, the most
        # validation images one privacy unit has: 1 per image, a patient's count per patient).
        self.privacy: SitePrivacy | None = None
        self.val_unit_images = 1
        # A seeded initialisation that leaves the caller's random state alone: the NVFlare server builds
        # the round-0 model from this class, and an unseeded server would start every run elsewhere.
        with torch.random.fork_rng(devices=[]):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            self.model = build_model(model_name, pretrained=pretrained, norm=norm)
        # Frozen weights keep requires_grad False: the optimiser never sees them and DP-SGD neither clips nor
        # noises them (less noise for the weights that do train).
        self.trainable, self.optimizer_name, self.momentum = trainable, optimizer, momentum
        freeze_except(self.model, trainable)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Kept out of the module tree (plain __dict__ entry) so state_dict keys stay `model.*` only.
        self.__dict__["_compiled"] = torch.compile(self.model) if compile_model else None
        # pos_weight is a site fact (its own label balance): a plain attribute, not a buffer, so that
        # federated averaging never mixes it across sites.
        self.pos_weight = list(pos_weight) if pos_weight else None
        self._pos_weight = torch.tensor(self.pos_weight or [1.0] * NUM_LABELS, dtype=torch.float32)
        self.register_buffer("thresholds", torch.full((NUM_LABELS,), 0.5))
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}
        self.last_scores: dict[str, dict] = {}

    #: Tensors (by state-dict name) put back after every load into this module — what a federated site keeps of its
    #: own whatever model it receives: its own teacher while it distils from a FedBN teacher, its own BatchNorm when
    #: it scores a FedBN federation's final model (fedxr.federated.client).
    keep_on_load: dict[str, torch.Tensor] | None = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.keep_on_load:
            super().load_state_dict(self.keep_on_load, strict=False)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        # `or` would call len() on the compiled module, which torch.compile refuses for non-container modules.
        return (self._compiled if self._compiled is not None else self.model)(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return masked_bce_with_logits(logits, y, pos_weight=self._pos_weight.to(logits.device))

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup (Zhang et al., 2018): each image blended with another of the batch, labels alike, with a
        Beta(a, a) weight drawn from torch's (seeded) generator. Identity when ``mixup`` is 0."""
        if not self.mixup or len(x) < 2:
            return x, y
        lam = torch.distributions.Beta(self.mixup, self.mixup).sample().to(x.device)
        perm = torch.randperm(len(x), device=x.device)
        return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]

    def training_step(self, batch, batch_idx):
        if self.privacy is not None:
            return self._dp_training_step(*batch)
        x, y = self.mix(*batch)
        loss = self._loss(self(x), y)
        self.log(TRAIN_LOSS, loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x))
        return loss

    def _dp_training_step(self, x: torch.Tensor, y: torch.Tensor, units: torch.Tensor):
        """One DP-SGD step on a Poisson-sampled logical batch (manual optimisation, see privacy.dp.attach): the
        batch is taken in physical chunks that never split a privacy unit; each chunk's per-image gradients are
        summed per unit (augmented copies averaged), clipped and accumulated; the last chunk's step adds the
        noise once and updates the weights. An empty batch still takes its (noise-only) step: it is in the plan."""
        from fedxr.privacy.sampling import group_grad_samples, physical_chunks

        assert self.privacy is not None  # training_step comes here only under DP
        opt = self.optimizers()
        assert isinstance(opt, LightningOptimizer)  # configure_optimizers returns one optimizer
        dp_opt: Any = opt.optimizer  # Opacus' DPOptimizer (self.privacy.optimizer); Opacus has no type information
        opt.zero_grad()
        chunks = physical_chunks(units, self.privacy.physical_batch_size or max(1, len(x))) or [slice(0, 0)]
        total = 0.0
        for i, part in enumerate(chunks):
            xs, ys = x[part], y[part]
            loss = self._loss(self(xs), ys) if len(xs) else self(xs).sum()
            self.manual_backward(loss)
            group_grad_samples(dp_opt.params, units[part], self.privacy.copies)
            if i < len(chunks) - 1:
                dp_opt.clip_and_accumulate()  # adds this chunk's clipped unit gradients to p.summed_grad
                for p in dp_opt.params:
                    p.grad_sample = None
            total += float(loss.detach()) * len(xs)
        opt.step()
        scheduler = self.lr_schedulers()
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)  # configure_optimizers: one LambdaLR
        scheduler.step()
        if len(x):
            self.log(TRAIN_LOSS, total / len(x), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x))

    def _eval_step(self, batch, stage: str):
        x, y = batch
        # Scored in full precision even when training runs under bf16 autocast (model.precision: auto): these
        # scores pick the best model, set thresholds and are compared with `fedxr evaluate` and the FP32 ONNX
        # export, which all run the FP32 weights in FP32 (bf16 moved a small validation split's AUROC by 0.125).
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self(x)
        if stage == "val" and self.privacy is None:  # under DP only the noised AUROC leaves (see _epoch_end)
            self.log(VAL_LOSS, self._loss(logits, y), prog_bar=False, batch_size=len(x))
        self._outputs[stage].append((torch.sigmoid(logits.float()).detach(), y.detach()))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _gather(self, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        outs = self._outputs[stage]
        self._outputs[stage] = []
        probs = torch.cat([o[0] for o in outs]) if outs else torch.zeros(0, NUM_LABELS)
        targets = torch.cat([o[1] for o in outs]) if outs else torch.zeros(0, NUM_LABELS)
        if self.trainer is not None and self.trainer.world_size > 1:
            # all_gather returns what it is given, gathered: a tensor for a tensor.
            probs = cast(torch.Tensor, self.all_gather(probs)).reshape(-1, NUM_LABELS)
            targets = cast(torch.Tensor, self.all_gather(targets)).reshape(-1, NUM_LABELS)
        return probs.cpu(), targets.cpu()

    def _epoch_end(self, stage: str, auroc_name: str, ap_name: str) -> None:
        probs, targets = self._gather(stage)
        if len(probs) == 0:
            return
        scores = multilabel_scores(probs, targets)
        if scores["note"]:
            log.info("%s: %s", stage, scores["note"])
        macro = scores["macro_auroc"]
        if math.isnan(macro):
            # No class has both positives and negatives: there is no AUROC to report. Log nothing
            # rather than an invented value (model selection then skips this evaluation).
            log.warning("%s: no class has both positives and negatives; %s not logged", stage, auroc_name)
            return
        if stage == "val" and self.privacy is not None:
            # A DP site: the validation patients' data leaves only as one noised, accounted score (no AP, no
            # per-label scores, no thresholds re-chosen on them); none once its planned releases are spent.
            released = self.privacy.release_val_auroc(scores["auroc"], targets, self.val_unit_images)
            if released is not None:
                self.log(auroc_name, released, prog_bar=True, sync_dist=False)
            return
        self.log(auroc_name, macro, prog_bar=True, sync_dist=False)
        if not math.isnan(scores["macro_ap"]):
            self.log(ap_name, scores["macro_ap"], sync_dist=False)
        for name, value in scores["auroc"].items():
            if value is not None:
                self.log(per_class_metric(auroc_name, name), value, sync_dist=False)
        if stage == "val" and not (self.trainer and self.trainer.sanity_checking):
            self.thresholds.copy_(choose_thresholds(probs, targets, self.hparams["threshold_rule"]))
        self.last_scores[stage] = scores

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val", VAL_AUROC, VAL_AP)

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test", TEST_AUROC, TEST_AP)

    def configure_optimizers(self):
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.hparams["weight_decay"]},
                  {"params": no_decay, "weight_decay": 0.0}]
        opt: torch.optim.Optimizer
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(groups, lr=self.hparams["lr"], momentum=self.momentum)
        else:
            opt = torch.optim.AdamW(groups, lr=self.hparams["lr"])
        if self.privacy is not None:  # DP-SGD: every step clips each image's gradient and adds noise
            opt = self.privacy.optimizer(opt)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        # estimated_stepping_batches has set up the training data: its batches per epoch are known here. A
        # round limited by steps runs with an unbounded epoch count, so dividing the total by it would not say.
        batches = self.trainer.num_training_batches
        per_epoch = self.epoch_steps or (max(1, int(batches)) if math.isfinite(batches) and batches > 0
                                         else max(1, total // max(1, self.trainer.max_epochs or 1)))
        if self.schedule_steps:
            total = self.schedule_steps
        elif self.schedule_epochs:
            total = per_epoch * self.schedule_epochs
        warmup = int(self.hparams["warmup_epochs"] * per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def save_fedxr_checkpoint(self, path: str | Path, recipe: dict | None = None, source: str = "train",
                              metrics: dict | None = None) -> Path:
        """Write the network, thresholds and metadata in the fedxr checkpoint format."""
        return save_checkpoint(
            path, model_name=self.hparams["model_name"], state_dict=self.model.state_dict(),
            preprocessing=self.preprocessing, thresholds=self.thresholds, recipe=recipe, source=source,
            metrics=metrics if metrics is not None else {k: v for k, v in self.last_scores.items()},
            extra={"norm": self.norm} if self.norm != "batch" else None,
        )

    @classmethod
    def from_fedxr_checkpoint(cls, ckpt: dict, **overrides) -> "XRayClassifier":
        module = cls(ckpt["model_name"], preprocessing=ckpt["preprocessing"], **{"norm": ckpt.get("norm", "batch"), **overrides})
        module.model.load_state_dict(ckpt["state_dict"])
        module.thresholds.copy_(torch.tensor(ckpt["thresholds"]))
        return module


def load_initial_weights(module: XRayClassifier, checkpoint: str | Path) -> XRayClassifier:
    """Start ``module`` from a fedxr checkpoint's network (``model.init_from``): the same architecture and
    normalisation, or a clear error. Thresholds are not taken: they are chosen again on this run's data."""
    from fedxr.errors import FedxrError
    from fedxr.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if ckpt["model_name"] != module.model_name or ckpt.get("norm", "batch") != module.norm:
        raise FedxrError(f"model.init_from: {checkpoint} holds {ckpt['model_name']!r} (norm {ckpt.get('norm', 'batch')}), "
                         f"but this run trains {module.model_name!r} (norm {module.norm}); start from a checkpoint of "
                         "the same architecture")
    module.model.load_state_dict(ckpt["state_dict"])
    return module
