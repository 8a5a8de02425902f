"""GPU paths from the recipe (bf16-mixed, channels_last, torch.compile). Skipped without a CUDA device."""

import pytest
import torch

from fedxr.config import load_recipe
from fedxr.data.prepare import ensure_dataset, ensure_sites
from fedxr.data.manifest import site_manifest_paths
from fedxr.training import make_classifier, make_datamodule, make_trainer

from helpers import ROOT, tiny_recipe_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("compile_model", [False, True])
def test_bf16_channels_last_training_on_gpu(tmp_path, compile_model):
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", tiny_recipe_overrides(tmp_path) + [
        "model.accelerator=gpu", "model.devices=1", "model.precision=bf16-mixed", "model.channels_last=true",
        f"model.compile={str(compile_model).lower()}", "model.name=resnet18", "data.image_size=64"])
    ensure_dataset(recipe, progress=False)
    sites, _ = ensure_sites(recipe)
    dm = make_datamodule(recipe, list(site_manifest_paths(sites).values()), progress=False)
    module = make_classifier(recipe, dm)
    trainer = make_trainer(recipe, tmp_path / "run", max_steps=5, progress=False, logger=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 5
    assert next(module.model.parameters()).is_cuda
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train_loss"])))
