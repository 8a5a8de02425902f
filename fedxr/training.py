"""Centralised and single-site training: the upper- and lower-bound baselines of federated learning."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from fedxr.config import Recipe
from fedxr.data.datamodule import SiteDataModule
from fedxr.data.manifest import site_manifest_paths
from fedxr.energy import tracked
from fedxr.precision import recipe_precision
from fedxr.errors import FedxrError
from fedxr.labels import VAL_AUROC
from fedxr.layout import BEST, LAST
from fedxr.models.classifier import XRayClassifier, pos_weight_from_labels
from fedxr.preprocessing import Preprocessing
from fedxr.data.atomic import write_json_atomic


class BestCheckpoint(Callback):
    """Writes ``best.ckpt`` (fedxr format) whenever ``val_auroc`` improves and ``last.ckpt`` at the end."""

    best_path = property(lambda self: self.folder / BEST)
    last_path = property(lambda self: self.folder / LAST)

    def __init__(self, folder: Path, recipe: dict, source: str = "train"):
        self.folder, self.recipe, self.source = Path(folder), recipe, source
        self.best = -math.inf

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or VAL_AUROC not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[VAL_AUROC])
        if score > self.best:
            self.best = score
            self._save(pl_module, self.best_path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(pl_module, self.last_path)

    def _save(self, pl_module: L.LightningModule, path: Path) -> None:
        if not isinstance(pl_module, XRayClassifier):
            raise TypeError(f"BestCheckpoint writes the fedxr checkpoint of an XRayClassifier, not of a "
                            f"{type(pl_module).__name__}")
        pl_module.save_fedxr_checkpoint(path, self.recipe, self.source)


def make_trainer(recipe: Recipe, folder: Path, callbacks: list | None = None, max_epochs: int | None = None,
                 max_steps: int | None = None, progress: bool = True, **kwargs) -> L.Trainer:
    """A Trainer configured from the recipe's model section (precision, devices, strategy)."""
    m = recipe.model
    if "logger" not in kwargs:
        kwargs["logger"] = [CSVLogger(str(folder), name="logs", version=""),
                            TensorBoardLogger(str(folder), name="tb", version="")]
    # A federated site states its own devices and strategy (one process, or torchrun's DDP workers).
    devices, strategy = kwargs.pop("devices", m.devices), kwargs.pop("strategy", m.strategy)
    return L.Trainer(
        accelerator=m.accelerator, devices=devices, strategy=strategy, precision=recipe_precision(recipe)[0],
        max_epochs=max_epochs if max_epochs is not None else m.max_epochs,
        max_steps=max_steps if max_steps is not None else m.max_steps,
        callbacks=callbacks or [], default_root_dir=str(folder), enable_checkpointing=False,
        enable_progress_bar=progress, log_every_n_steps=5, deterministic=False, **kwargs,
    )


def make_datamodule(recipe: Recipe, manifests: list[Path], progress: bool = True) -> SiteDataModule:
    """The recipe's data for these manifests, at the recipe's resolved preprocessing."""
    d = recipe.data
    return SiteDataModule(manifests, recipe.preprocessing, batch_size=d.batch_size, num_workers=d.num_workers,
                          augment=d.augment, cache_dir=d.cache_dir, progress=progress)


def make_classifier(recipe: Recipe, dm: SiteDataModule, cls: type[XRayClassifier] = XRayClassifier,
                    **given) -> XRayClassifier:
    """``cls`` (the recipe's classifier by default) with the recipe's training settings, the data module's
    preprocessing and this data's BCE pos_weight. ``given`` arguments win: a federated job's model
    description (architecture, preprocessing, seed, a student's teacher) and the schedule length."""
    m = recipe.model
    dm.setup("fit")
    args = dict(
        model_name=m.name, pretrained=m.pretrained, lr=m.lr, weight_decay=m.weight_decay,
        warmup_epochs=m.warmup_epochs, pos_weight=pos_weight_from_labels(dm.split_labels("train"), m.pos_weight_cap),
        channels_last=m.channels_last, compile_model=m.compile, threshold_rule=m.threshold_rule,
        preprocessing=dm.preprocessing, init_seed=m.seed, mixup=m.mixup, norm=recipe.norm, trainable=m.trainable,
    )
    if recipe.privacy.dp:  # DP's own optimiser and learning rate (see privacy.dp.optimizer)
        dp = recipe.privacy.dp
        args.update(optimizer=dp.optimizer, momentum=dp.momentum, lr=dp.lr or m.lr)
    if "preprocessing" in given and Preprocessing.coerce(given["preprocessing"]) != dm.preprocessing:
        # The model must be trained on the input it will be described (and exported) with.
        raise FedxrError(f"the model description's preprocessing {given['preprocessing']} differs from the data's "
                         f"{dm.preprocessing.as_dict()}; build both from the same recipe")
    module = cls(**{**args, **given})
    if m.init_from and "model_name" not in given:
        from fedxr.models.classifier import load_initial_weights

        load_initial_weights(module, m.init_from)
    return module


def train(recipe: Recipe, sites_folder: Path, mode: str = "central", site: str | None = None,
          progress: bool = True) -> dict:
    """Train on all sites pooled (``central``) or on one site (``local``). Returns a summary dict."""
    L.seed_everything(recipe.model.seed, workers=True, verbose=False)
    paths = site_manifest_paths(sites_folder)
    if mode == "central":
        manifests, tag = list(paths.values()), "central"
    elif mode == "local":
        if site not in paths:
            raise FedxrError(f"--site {site!r} is not one of the sites: {', '.join(paths)}")
        manifests, tag = [paths[site]], f"local_{site}"
    else:
        raise FedxrError(f"unknown --mode {mode!r}; use central or local")
    folder = recipe.layout.train(tag)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    dm = make_datamodule(recipe, manifests, progress=progress)
    module = make_classifier(recipe, dm)
    ckpt_cb = BestCheckpoint(folder, recipe.resolved(), source=f"train:{tag}")
    trainer = make_trainer(recipe, folder, callbacks=[ckpt_cb], progress=progress)
    with tracked(folder, f"train {tag}", recipe.energy_country):
        trainer.fit(module, datamodule=dm)
    summary = {"mode": mode, "site": site, "folder": str(folder), "best_val_auroc": ckpt_cb.best,
               "best": str(ckpt_cb.best_path), "last": str(ckpt_cb.last_path), "precision": str(trainer.precision),
               "precision_why": recipe_precision(recipe)[1]}
    write_json_atomic(folder / "summary.json", summary)
    return summary

