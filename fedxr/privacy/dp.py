"""Differentially private training at a site: DP-SGD with Opacus, and its privacy accounting.

Each site clips every image's gradient to ``privacy.dp.max_grad_norm`` and adds Gaussian noise to the
batch gradient (Opacus' ``DPOptimizer``), drawing its batches by Poisson sampling (Opacus' ``DPDataLoader``),
which is what the accountant's guarantee assumes. The noise is chosen once, before the first round, so
that the site's whole share of the federation (every round, every local epoch or step) spends at most the
target ``(epsilon, delta)`` under Opacus' RDP accountant; the accountant then tracks what each round spent.
A round that would take the site past its target is refused before it starts (:class:`BudgetExceeded`).

The guarantee is per site and about one *privacy unit* of its training data (``privacy.dp.unit``: an image,
or all of a patient's images; :mod:`fedxr.privacy.sampling`): what the site sends (its weights) is a
post-processing of DP-SGD's output. The validation score a site reports each round is the other thing that
leaves it: under DP it is released with Gaussian noise sized to its sensitivity and accounted against the same
ε for the validation patients (:meth:`SitePrivacy.release_val_auroc`). The splits are patient-disjoint, so a
patient's data feeds either the training ledger or the validation one, never both (parallel composition).

Per-sample gradients need layers whose gradient Opacus can split per image: BatchNorm mixes images, so
:func:`private_model` replaces it by GroupNorm (``ModuleValidator.fix``); timm's fused BatchNorm+activation
layers have no such replacement, and those models are refused by :func:`dp_problem` up front.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from fedxr.errors import FedxrError
from fedxr.models.private import private_model

#: The model's normalisation layers when it trains with DP (stored in checkpoints as ``norm``).
DP_NORM = "group"


class BudgetExceeded(FedxrError):
    """A site's next round would spend more privacy than the recipe's target."""


@lru_cache(maxsize=None)
def dp_problem(model_name: str) -> str | None:
    """Why ``model_name`` cannot train with Opacus DP-SGD, or None when it can: the fixed model passes Opacus'
    validator and one real per-sample backward pass (2 images at 32 px) gives every weight its per-image gradient."""
    from opacus import GradSampleModule

    from fedxr.models.registry import build_model

    with torch.random.fork_rng(devices=[]):
        model = private_model(build_model(model_name)).train()
        errors = GradSampleModule.validate(model, strict=False)
        if errors:
            kinds = sorted({type(m).__name__ for m in model.modules()
                            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
            why = (f"{', '.join(kinds)}: timm's BatchNorm fused with its activation, which Opacus' "
                   "ModuleValidator.fix does not replace" if kinds else str(errors[0])[:160])
            return f"{model_name} has layers Opacus cannot compute per-sample gradients for ({why})"
        try:
            with warnings.catch_warnings():  # torch's note that the input needs no gradient: true, and harmless here
                warnings.simplefilter("ignore", UserWarning)
                GradSampleModule(model)(torch.randn(2, 1, 32, 32)).sum().backward()
        except Exception as exc:  # e.g. an in-place operation on a hooked layer's output
            return f"{model_name} fails Opacus' per-sample backward pass ({type(exc).__name__}: {str(exc)[:160]})"
    missing = [n for n, p in model.named_parameters() if p.requires_grad and getattr(p, "grad_sample", None) is None]
    if missing:
        return (f"{model_name} has weights outside any layer Opacus knows ({', '.join(missing[:3])}"
                f"{', …' if len(missing) > 3 else ''}), so they get no per-image gradient")
    return None


@dataclass
class SitePrivacy:
    """One site's DP-SGD settings and its privacy ledger for the whole federation."""

    epsilon: float            # the target over every round
    delta: float
    max_grad_norm: float
    sample_rate: float        # each unit's chance to be in a step's logical batch (Poisson sampling)
    planned_steps: int        # every optimizer step the federation asks of this site
    noise_multiplier: float = 0.0
    unit: str = "image"       # what ε is about: one image, or one patient (all of their images)
    units: int = 0            # training units at the site (images or patients)
    physical_batch_size: int = 0   # most images per forward/backward pass (0: the whole logical batch)
    copies: int = 1           # augmented copies of each image, averaged before clipping
    val_releases: int = 0     # validation scores the site may release under DP over the federation
    val_min_count: int = 20   # labels with fewer validation positives or negatives are left out of a release
    spent: list[dict] = field(default_factory=list)  # per round: {"round", "steps", "epsilon"}

    def __post_init__(self):
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier

        if not self.noise_multiplier:
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.epsilon, target_delta=self.delta, sample_rate=self.sample_rate,
                steps=self.planned_steps, accountant="rdp")
        self.accountant = RDPAccountant()
        self._round_steps = 0
        # Validation releases: the Gaussian mechanism on every score, all of them within the same (ε, δ).
        self.val_noise_multiplier = (get_noise_multiplier(target_epsilon=self.epsilon, target_delta=self.delta,
                                                          sample_rate=1.0, steps=self.val_releases, accountant="rdp")
                                     if self.val_releases else 0.0)
        self.val_accountant = RDPAccountant()
        self.val_noise_std: list[float] = []

    @property
    def expected_batch(self) -> float:
        """Units in a step's logical batch on average: what DP-SGD divides the noised sum of clipped unit
        gradients by (per patient this is fewer than images, so the same σ is more noise per example)."""
        if not self.units:
            raise ValueError("SitePrivacy.units is not set: pass expected_batch_size to optimizer()")
        return self.sample_rate * self.units

    @classmethod
    def for_site(cls, dp, site: str, train_images: int, batch_size: int, rounds: int,
                 local_epochs: int, local_steps: int | None, train_patients: int | None = None,
                 val_releases: int = 0) -> "SitePrivacy":
        """The site's plan from the recipe's ``privacy.dp`` section and its own training split. ``batch_size`` is
        the physical batch (``data.batch_size``); the logical one is ``privacy.dp.logical_batch_size`` or that."""
        unit = getattr(dp, "unit", "image")
        units = train_images if unit == "image" else (train_patients or train_images)
        delta = dp.delta if dp.delta is not None else 1.0 / (10 * max(units, 1))
        if problem := delta_problem(site, delta, units, unit=unit):
            raise FedxrError(problem)
        logical = getattr(dp, "logical_batch_size", None) or batch_size
        # One epoch = as many steps as the plain loader's batches of the logical size, each unit drawn with
        # probability 1 / that number (as Opacus' Poisson loader does): the accountant uses the same two figures.
        # Per patient the expected images per step stay the logical batch (every drawn patient brings all theirs).
        sample_rate = 1.0 / math.ceil(train_images / logical)
        per_epoch = int(1 / sample_rate)  # as Opacus computes it (float rounding can make it one less)
        steps = rounds * (local_steps or local_epochs * per_epoch)
        return cls(epsilon=dp.epsilon, delta=delta, max_grad_norm=dp.max_grad_norm, sample_rate=sample_rate,
                   planned_steps=steps, unit=unit, units=units, physical_batch_size=batch_size,
                   copies=getattr(dp, "augmentations", 1), val_releases=val_releases,
                   val_min_count=getattr(dp, "val_min_count", 20))

    @property
    def epsilon_spent(self) -> float:
        return float(self.accountant.get_epsilon(self.delta)) if self.accountant.history else 0.0

    def epsilon_after(self, steps: int) -> float:
        """ε this site would have spent after ``steps`` more optimizer steps (the ledger is unchanged)."""
        from opacus.accountants import RDPAccountant

        ahead = RDPAccountant()
        ahead.history = list(self.accountant.history) + [(self.noise_multiplier, self.sample_rate, steps)]
        return float(ahead.get_epsilon(self.delta))

    def start_round(self, site: str, rnd: int, steps: int) -> None:
        """Refuse a round that would take the site past its target (before it touches an image)."""
        after = self.epsilon_after(steps)
        # A little slack for the accountant's own numerical search (the noise was chosen to meet the target).
        if after > self.epsilon * (1 + 1e-6):
            raise BudgetExceeded(
                f"site {site!r}: round {rnd} would spend ε = {after:.3f} > privacy.dp.epsilon = {self.epsilon:g} "
                f"(δ = {self.delta:.2g}; spent so far ε = {self.epsilon_spent:.3f} in {len(self.spent)} round(s), "
                f"the noise was planned for {self.planned_steps} steps). This site stops training here; raise "
                "privacy.dp.epsilon or plan fewer rounds/steps to train further")
        self._round_steps = 0

    def optimizer(self, optimizer, expected_batch_size: float | None = None):
        """``optimizer`` as Opacus' DPOptimizer (clip per unit, add noise), each step entered in the ledger.
        ``expected_batch_size`` defaults to :attr:`expected_batch` (units per logical batch on average)."""
        from opacus.optimizers import DPOptimizer

        device = optimizer.param_groups[0]["params"][0].device
        dp_opt = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                             expected_batch_size=expected_batch_size or self.expected_batch, loss_reduction="mean",
                             generator=unpredictable_generator(device))

        def count(_opt):
            self._round_steps += 1
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

        dp_opt.attach_step_hook(count)
        return dp_opt

    def end_round(self, rnd: int) -> dict:
        entry = {"round": rnd, "steps": self._round_steps, "epsilon": self.epsilon_spent}
        self.spent.append(entry)
        return entry

    def summary(self) -> dict:
        return {"target_epsilon": self.epsilon, "delta": self.delta, "max_grad_norm": self.max_grad_norm,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "planned_steps": self.planned_steps, "accountant": "rdp (Opacus)", "unit": self.unit,
                "units": self.units, "expected_batch": self.expected_batch, "copies": self.copies,
                "val_releases_planned": self.val_releases, "val_releases": len(self.val_noise_std),
                "val_min_count": self.val_min_count,
                "val_epsilon": self.val_epsilon_spent,
                "val_noise_std": self.val_noise_std[-1] if self.val_noise_std else None}

    @property
    def val_epsilon_spent(self) -> float:
        return float(self.val_accountant.get_epsilon(self.delta)) if self.val_accountant.history else 0.0

    def release_val_auroc(self, per_label: dict[str, float | None], targets: torch.Tensor,
                          unit_images: int = 1) -> float | None:
        """The macro validation AUROC this site may send, with Gaussian noise of std σ_val · Δ, or None when
        no label has enough validation cases or the planned releases are spent (the server then has no score
        from this site for that round, and none of the validation budget is used).

        The macro averages only the labels with at least ``val_min_count`` known validation positives and as many
        negatives (``per_label``: each label's AUROC, None where undefined). Δ bounds how much one validation unit
        (an image, or a patient with up to ``unit_images`` images) can move that macro: a label's AUROC is a mean
        over positive×negative pairs, and removing m of its P positives and N negatives removes at most
        m / min(P, N) of the pairs, so it moves by at most m / (min(P, N) − m). A label with two positives would
        give Δ = 1 and noise far above any AUROC (measured: releases of 2.2 and −0.19 on the quickstart's sites at
        ε = 8 before this floor), so such labels stay out of the release. The label counts are treated as public
        (they are the site's prevalence, shown by `fedxr data inspect`); a strict reading would need a public
        lower bound on them."""
        if len(self.val_noise_std) >= self.val_releases:
            return None
        y = targets.float()
        names = list(per_label)
        kept: list[float] = []
        bounds: list[float] = []
        for k, name in enumerate(names):
            pos, neg = int((y[:, k] == 1).sum()), int((y[:, k] == 0).sum())
            score = per_label[name]
            if score is not None and min(pos, neg) >= max(self.val_min_count, unit_images + 1):
                kept.append(score)
                bounds.append(min(1.0, unit_images / (min(pos, neg) - unit_images)))
        if not kept:
            return None
        macro = sum(kept) / len(kept)
        std = self.val_noise_multiplier * sum(bounds) / len(bounds)
        self.val_accountant.step(noise_multiplier=self.val_noise_multiplier, sample_rate=1.0)
        self.val_noise_std.append(std)
        noise = torch.normal(0.0, std, (1,), generator=unpredictable_generator()).item() if std else 0.0
        return float(macro + noise)


def unpredictable_generator(device="cpu") -> torch.Generator:
    """A generator seeded from the operating system's randomness. DP's noise and Poisson batches must not come
    from torch's global stream: fedxr seeds that from the recipe (model.seed, site, round) for reproducible
    training, and the recipe travels with the job — whoever holds it could recompute the noise and remove it."""
    import os

    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))


def attach(module, privacy: SitePrivacy) -> None:
    """Make a fedxr classifier train with DP-SGD: per-sample gradient hooks on its network, and the
    optimizer Lightning builds wrapped by ``privacy`` (see XRayClassifier.configure_optimizers)."""
    from opacus import GradSampleModule

    # The wrapper registers its hooks on the network's layers; the classifier keeps calling the network itself,
    # so the state dict the federation exchanges keeps its keys. The wrapper is kept alive beside it.
    module.__dict__["_grad_sampler"] = GradSampleModule(module.model)
    module.privacy = privacy
    # The classifier takes each logical batch in physical chunks, grouping and clipping per unit itself
    # (XRayClassifier._dp_training_step), so Lightning's loop must not step the optimizer for it.
    module.automatic_optimization = False


def ledger(records: list[dict]) -> dict | None:
    """``privacy.json``: per site, the target, δ, the noise and ε spent after each round, from the sites'
    round records; ``within_target`` is False if any site ended above its target. None without DP."""
    sites: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: (r["site"], r["round"])):
        p = r.get("privacy")
        if not p:
            continue
        site = sites.setdefault(r["site"], {k: p.get(k) for k in (
            "target_epsilon", "delta", "noise_multiplier", "sample_rate", "max_grad_norm", "planned_steps", "unit",
            "units", "expected_batch", "copies", "val_releases_planned", "val_min_count")})
        site.setdefault("rounds", []).append({"round": r["round"], "steps": p["steps"], "epsilon": p["epsilon"],
                                              "val_epsilon": p.get("val_epsilon"), "val_noise_std": p.get("val_noise_std")})
    if not sites:
        return None
    for site in sites.values():
        site["epsilon_spent"] = max(x["epsilon"] for x in site["rounds"])
        site["val_epsilon_spent"] = max((x["val_epsilon"] or 0.0) for x in site["rounds"])
        site["within_target"] = max(site["epsilon_spent"], site["val_epsilon_spent"]) <= site["target_epsilon"] * (1 + 1e-6)
    units = sorted({s["unit"] or "image" for s in sites.values()})
    return {"mechanism": f"DP-SGD (Opacus): per-{'/'.join(units)} clipping, Gaussian noise, Poisson sampling; RDP "
                         "accountant. Validation scores: Gaussian mechanism within the same ε (patient-disjoint "
                         "splits: parallel composition)",
            "sites": sites, "within_target": all(s["within_target"] for s in sites.values())}


def plot_ledger(book: dict, path) -> None:
    """ε spent after each round, per site, with each site's target."""
    from fedxr.plots import saved_figure

    with saved_figure(path, dpi=90, figsize=(5.5, 3.2)) as (fig, ax):
        for name, site in book["sites"].items():
            line, = ax.plot([x["round"] for x in site["rounds"]], [x["epsilon"] for x in site["rounds"]], "o-", label=name)
            ax.axhline(site["target_epsilon"], color=line.get_color(), ls=":", lw=1)
        ax.set_xlabel("round")
        ax.set_ylabel("ε spent (dotted: target)")
        ax.set_title("differential privacy budget per site")
        ax.legend(fontsize=8)


def delta_problem(site: str, delta: float, train_units: int, source: str = "", unit: str = "image") -> str | None:
    """The one δ rule: a site needs training data, and δ must be below 1/N for its N training units (images, or
    patients with ``unit='patient'``; a δ that large allows leaking whole records). ``source`` names the manifest
    the count came from."""
    where = f" ({source})" if source else ""
    what = "images" if unit == "image" else "patients"
    if train_units < 2:
        return f"site {site!r}{where}: differential privacy needs training {what}; it has {train_units}"
    if delta >= 1.0 / train_units:
        return (f"site {site!r}{where}: privacy.dp.delta = {delta:g} is not below 1/N = 1/{train_units} (its training "
                f"{what}); a δ that large allows leaking whole records. Set privacy.dp.delta below "
                f"{1 / train_units:.2g}, or leave it out (default 1/(10 N) at each site)")
    return None


def delta_problems(recipe, sites_dir) -> list[str]:
    """:func:`delta_problem` for every site manifest in ``sites_dir``: what `fedxr check` and `fedxr federate` can
    know before any site starts (each site checks again with its own data)."""
    from fedxr.data.manifest import read_manifest, site_manifest_paths

    dp = recipe.privacy.dp
    if not dp or dp.delta is None:
        return []
    problems = []
    for site, path in site_manifest_paths(sites_dir).items():
        train = read_manifest(path)
        train = train[train["split"] == "train"]
        n = len(train) if dp.unit == "image" else train["patient_id"].nunique()
        if problem := delta_problem(site, dp.delta, n, str(path), unit=dp.unit):
            problems.append(problem)
    return problems
