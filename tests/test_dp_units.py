"""DP-SGD's units and batches: per-patient Poisson sampling and clipping, logical batches trained in physical
chunks, augmentation multiplicity, noised validation scores, and public pretraining that lets DP learn — each
through the real Opacus optimizer and accountant and a real Lightning trainer, at toy size."""

import copy

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedxr.config import load_recipe
from fedxr.errors import FedxrError
from fedxr.models.metrics import multilabel_scores
from fedxr.models.classifier import XRayClassifier
from fedxr.privacy.dp import SitePrivacy, attach, delta_problem
from fedxr.privacy.sampling import (PoissonUnitSampler, group_grad_samples, physical_chunks, poisson_loader,
                                    units_of)

from helpers import QUICKSTART

PATIENTS = np.array(["p3", "p1", "p3", "p2", "p1", "p3", "p4", "p5", "p5", "p6"])


def dp_section(*overrides):
    return load_recipe(QUICKSTART.parent / "quickstart_dp.yaml", list(overrides)).privacy.dp


def test_patient_units_keep_every_patients_images_together():
    units = units_of(PATIENTS, "patient")
    assert sorted(tuple(PATIENTS[u]) for u in units) == sorted(
        (p,) * int((PATIENTS == p).sum()) for p in set(PATIENTS))
    assert [len(u) for u in units_of(PATIENTS, "image")] == [1] * len(PATIENTS)
    sampler = PoissonUnitSampler(units, 0.5, 200, torch.Generator().manual_seed(0))
    sizes = set()
    for batch in sampler:
        drawn = PATIENTS[batch]
        for p in set(drawn):  # a drawn patient brings all of their images, each once, next to each other
            assert (drawn == p).sum() == (PATIENTS == p).sum()
            where = np.flatnonzero(drawn == p)
            assert (np.diff(where) == 1).all()
        sizes.add(len(batch))
    assert 0 in sizes and len(PATIENTS) in sizes  # empty and full logical batches both occur (Poisson)
    # Physical chunks of at most 2 images never split a patient: p3 (3 images) gets a chunk of its own.
    tags = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4])
    chunks = physical_chunks(tags, 2)
    assert [tags[c].tolist() for c in chunks] == [[0, 0, 0], [1, 1], [2], [3, 3], [4]]
    assert physical_chunks(torch.arange(5), 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_per_patient_accounting_differs_from_per_image():
    """Same site (1,000 images of 400 patients), same recipe: per patient, δ defaults to 1/(10 patients), the noise
    is planned for that δ, and each step's noised sum is divided by the expected patients, not images."""
    image = SitePrivacy.for_site(dp_section(), "s", 1000, 32, rounds=2, local_epochs=1, local_steps=None,
                                 train_patients=400)
    patient = SitePrivacy.for_site(dp_section("privacy.dp.unit=patient"), "s", 1000, 32, rounds=2, local_epochs=1,
                                   local_steps=None, train_patients=400)
    assert image.unit == "image" and patient.unit == "patient"
    assert image.delta == pytest.approx(1e-4) and patient.delta == pytest.approx(2.5e-4)
    assert image.sample_rate == patient.sample_rate == 1 / 32 and image.planned_steps == patient.planned_steps
    assert patient.noise_multiplier < image.noise_multiplier  # a larger δ needs less noise for the same ε...
    assert patient.expected_batch == pytest.approx(400 / 32) and image.expected_batch == pytest.approx(1000 / 32)
    # ...but every step's noise is spread over 2.5x fewer examples: more noise on the mean gradient.
    assert patient.noise_multiplier / patient.expected_batch > 2 * image.noise_multiplier / image.expected_batch
    # δ below 1/N counts the units: δ = 1/600 is refused for 1,000 images, accepted for 400 patients.
    assert "1/N = 1/1000 (its training images)" in delta_problem("s", 1 / 600, 1000)
    assert delta_problem("s", 1 / 600, 400, unit="patient") is None
    with pytest.raises(FedxrError, match=r"not below 1/N = 1/400 \(its training patients\)"):
        SitePrivacy.for_site(dp_section("privacy.dp.unit=patient", "privacy.dp.delta=0.003"), "s", 1000, 32,
                             rounds=1, local_epochs=1, local_steps=None, train_patients=400)
    assert patient.summary()["unit"] == "patient" and patient.summary()["units"] == 400


def test_a_patients_gradient_is_clipped_as_one():
    """group_grad_samples sums a unit's per-image gradients (averaging augmented copies) before Opacus clips."""
    gs = torch.arange(12.0).reshape(6, 2)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad_sample = gs.clone()
    group_grad_samples([p], torch.tensor([7, 7, 7, 2, 5, 5]))
    assert torch.equal(p.grad_sample, torch.stack([gs[:3].sum(0), gs[3], gs[4:].sum(0)]))
    p.grad_sample = gs.clone()
    group_grad_samples([p], torch.tensor([0, 0, 1, 1, 2, 2]), copies=2)  # image mode, 2 augmented copies each
    assert torch.allclose(p.grad_sample, gs.reshape(3, 2, 2).mean(1))


def _toy_images(n, generator, signal=1.0, shift=0.0):
    """32 px images whose label 0 is a bright square in the upper left; the other labels are noise."""
    x = torch.randn(n, 1, 32, 32, generator=generator) * 0.5 + shift
    y = torch.zeros(n, 14)
    y[:, 0] = (torch.rand(n, generator=generator) < 0.5).float()
    x[y[:, 0] == 1, :, 4:14, 4:14] += 2.0 * signal
    y[:, 1:] = (torch.rand(n, 13, generator=generator) < 0.3).float()
    return x, y


def _fit_dp(module, privacy, x, y, patients, unit="image", epochs=1):
    """Train ``module`` with DP-SGD through Lightning as a site does (manual optimisation, Poisson loader)."""
    attach(module, privacy)
    loader = poisson_loader(TensorDataset(x, y), units_of(patients, unit), privacy.sample_rate, num_workers=0)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    if privacy.noise_multiplier:  # (a noiseless test step has ε = ∞: nothing to check against the target)
        privacy.start_round("s", 0, privacy.planned_steps)
    trainer.fit(module, train_dataloaders=loader)
    return privacy.end_round(0)


def _weights(module):
    return torch.cat([p.detach().flatten() for p in module.model.parameters()])


def test_a_logical_batch_in_physical_chunks_is_one_dp_step():
    """A 24-image logical batch trained in chunks of 4 (manual optimisation) gives the weights one 24-image pass
    gives — no noise, no clipping reached — within float summation order (measured ≤ 1e-6 of the move), and the
    accountant counts one step per logical batch, not per chunk. Empty Poisson batches are steps too."""
    g = torch.Generator().manual_seed(0)
    x, y = _toy_images(24, g)
    patients = np.array([f"p{i // 2}" for i in range(24)])
    start = XRayClassifier("tiny_cnn", norm="group", lr=0.05, optimizer="sgd", init_seed=0)
    moved = []
    for physical in (4, 24):
        module = copy.deepcopy(start)
        privacy = SitePrivacy(epsilon=8, delta=1e-3, max_grad_norm=1e6, sample_rate=1.0, planned_steps=1,
                              units=12, unit="patient", physical_batch_size=physical)
        privacy.noise_multiplier = 0.0
        spent = _fit_dp(module, privacy, x, y, patients, unit="patient")
        assert spent["steps"] == 1
        moved.append(_weights(module) - _weights(start))
    assert moved[0].abs().max() > 1e-4
    assert (moved[0] - moved[1]).abs().max() <= 1e-4 * moved[0].abs().max()
    # An epoch of mostly empty batches (sample rate 1/8 of 3 units): every step is counted, none crashes.
    privacy = SitePrivacy(epsilon=8, delta=1e-3, max_grad_norm=1.0, sample_rate=1 / 8, planned_steps=8, units=3)
    spent = _fit_dp(copy.deepcopy(start), privacy, x[:3], y[:3], np.array(["a", "b", "c"]))
    assert spent["steps"] == 8 and privacy.epsilon_spent > 0


def test_per_patient_clipping_bounds_each_patients_influence():
    """With clipping at C and no noise, one step moves the head by at most lr·C·(drawn patients)/(expected
    patients) per unit — whatever number of images each patient has (20 images of one patient count as one)."""
    g = torch.Generator().manual_seed(1)
    x, y = _toy_images(21, g)
    patients = np.array(["big"] * 20 + ["small"])
    start = XRayClassifier("tiny_cnn", norm="group", lr=1.0, optimizer="sgd", momentum=0.0, init_seed=0, weight_decay=0.0,
                           trainable="head")
    module = copy.deepcopy(start)
    privacy = SitePrivacy(epsilon=8, delta=1e-3, max_grad_norm=0.01, sample_rate=1.0, planned_steps=1, units=2,
                          unit="patient", physical_batch_size=8)
    privacy.noise_multiplier = 0.0
    _fit_dp(module, privacy, x, y, patients, unit="patient")
    step = (_weights(module) - _weights(start)).norm()
    assert 0 < step <= 1.0 * 0.01 * 2 / 2 + 1e-6


def test_validation_scores_are_noised_within_the_budget():
    from fedxr.labels import LABELS

    privacy = SitePrivacy(epsilon=8, delta=1e-3, max_grad_norm=1.0, sample_rate=0.1, planned_steps=10, units=100,
                          val_releases=3)
    g = torch.Generator().manual_seed(0)
    scores = {name: 0.7 for name in LABELS}
    few = (torch.rand(40, 14, generator=g) < 0.2).float()      # ~8 positives per label: below val_min_count
    some = (torch.rand(200, 14, generator=g) < 0.2).float()    # ~40
    many = (torch.rand(4000, 14, generator=g) < 0.2).float()   # ~800
    assert privacy.release_val_auroc(scores, few) is None and privacy.val_epsilon_spent == 0  # nothing released
    released = [privacy.release_val_auroc(scores, many) for _ in range(2)]
    assert all(r is not None and r != 0.7 for r in released)
    assert privacy.val_noise_std[0] < 0.01  # ~800 positives per label: one image moves the AUROC little
    assert privacy.release_val_auroc(scores, some) is not None
    assert 5 * privacy.val_noise_std[0] < privacy.val_noise_std[-1] < 0.1  # ~40: more noise, still a usable score
    assert privacy.release_val_auroc(scores, many) is None  # the three planned releases are spent
    assert 7.5 < privacy.val_epsilon_spent <= 8 * (1 + 1e-6)
    # Only labels with enough cases are averaged: one rare label neither enters the score nor its noise.
    rare = many.clone()
    rare[:, 0] = 0
    rare[:3, 0] = 1
    floor = SitePrivacy(epsilon=8, delta=1e-3, max_grad_norm=1.0, sample_rate=0.1, planned_steps=10, units=100,
                        val_releases=3)
    floor.noise_multiplier, floor.val_noise_multiplier = 0.0, 0.0
    assert floor.release_val_auroc({**scores, LABELS[0]: 0.1}, rare) == pytest.approx(0.7)
    # A patient with 5 validation images can move the score 5x as much: more noise for the same ε.
    per_patient = SitePrivacy(epsilon=8, delta=1e-3, max_grad_norm=1.0, sample_rate=0.1, planned_steps=10, units=100,
                              val_releases=3)
    per_patient.release_val_auroc(scores, many, unit_images=5)
    assert per_patient.val_noise_std[0] == pytest.approx(5 * privacy.val_noise_std[0], rel=0.01)


def test_dp_from_a_public_model_learns_where_from_scratch_it_cannot():
    """ε = 1 on 128 private images: from random weights the noise (norm σ·C·√d / B ≫ the clipped gradient) leaves
    the model at chance; from a model pretrained on public images of another population (dimmer, shifted) the
    same DP fine-tuning gives a useful model. The margin holds by construction: the public model already
    separates the finding, and DP-SGD on the head cannot undo it at this learning rate."""
    g = torch.Generator().manual_seed(3)
    public_x, public_y = _toy_images(512, g, signal=0.7, shift=0.3)
    torch.manual_seed(0)
    public = XRayClassifier("tiny_cnn", norm="group", lr=0.05, optimizer="sgd", init_seed=0)
    opt = torch.optim.SGD(public.model.parameters(), lr=0.05, momentum=0.9)
    for i in range(120):  # plain (public) pretraining
        part = slice(32 * (i % 16), 32 * (i % 16 + 1))
        opt.zero_grad()
        public._loss(public(public_x[part]), public_y[part]).backward()
        opt.step()
    private_x, private_y = _toy_images(128, g)
    test_x, test_y = _toy_images(256, g)
    patients = np.array([f"p{i}" for i in range(128)])
    scores = {}
    for name, start in (("public", public), ("scratch", None)):
        module = XRayClassifier("tiny_cnn", norm="group", lr=0.05, optimizer="sgd", init_seed=1, trainable="head")
        if start is not None:
            module.model.load_state_dict(start.model.state_dict())
        privacy = SitePrivacy.for_site(dp_section("privacy.dp.epsilon=1"), "s", 128, 32, rounds=1, local_epochs=3,
                                       local_steps=None, train_patients=128)
        _fit_dp(module, privacy, private_x, private_y, patients, epochs=3)
        assert privacy.epsilon_spent <= 1.0 + 1e-6
        module.eval()
        with torch.no_grad():
            probs = torch.sigmoid(module(test_x))
        scores[name] = multilabel_scores(probs[:, :1], test_y[:, :1])["macro_auroc"]
    assert scores["public"] >= 0.9 and scores["scratch"] <= 0.75, scores
