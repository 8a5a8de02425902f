"""Differentially private training at a site: DP-SGD with Opacus, and its privacy accounting.

Each site clips every image's gradient to ``privacy.dp.max_grad_norm`` and adds Gaussian noise to the
batch gradient (Opacus' ``DPOptimizer``), drawing its batches by Poisson sampling (Opacus' ``DPDataLoader``),
which is what the accountant's guarantee assumes. The noise is chosen once, before the first round, so
that the site's whole share of the federation (every round, every local epoch or step) spends at most the
target ``(epsilon, delta)`` under Opacus' RDP accountant; the accountant then tracks what each round spent.
A round that would take the site past its target is refused before it starts (:class:`BudgetExceeded`).

The guarantee is per site and about that site's training images: what the site sends (its weights) is
a post-processing of DP-SGD's output. Validation scores a site reports are not covered (see README).

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
    sample_rate: float        # batch size / the site's training images (Poisson sampling)
    planned_steps: int        # every optimizer step the federation asks of this site
    noise_multiplier: float = 0.0
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

    @classmethod
    def for_site(cls, dp, site: str, train_images: int, batch_size: int, rounds: int,
                 local_epochs: int, local_steps: int | None) -> "SitePrivacy":
        """The site's plan from the recipe's ``privacy.dp`` section and its own training split."""
        delta = dp.delta if dp.delta is not None else 1.0 / (10 * max(train_images, 1))
        if problem := delta_problem(site, delta, train_images):
            raise FedxrError(problem)
        # Opacus' Poisson loader keeps the plain loader's number of batches per epoch and draws each image into a
        # batch with probability 1 / that number: the accountant must use the same two figures.
        sample_rate = 1.0 / math.ceil(train_images / batch_size)
        per_epoch = int(1 / sample_rate)  # as Opacus computes it (float rounding can make it one less)
        steps = rounds * (local_steps or local_epochs * per_epoch)
        return cls(epsilon=dp.epsilon, delta=delta, max_grad_norm=dp.max_grad_norm, sample_rate=sample_rate,
                   planned_steps=steps)

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

    def optimizer(self, optimizer, expected_batch_size: int):
        """``optimizer`` as Opacus' DPOptimizer (clip per image, add noise), each step entered in the ledger."""
        from opacus.optimizers import DPOptimizer

        device = optimizer.param_groups[0]["params"][0].device
        dp_opt = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                             expected_batch_size=expected_batch_size, loss_reduction="mean",
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
                "planned_steps": self.planned_steps, "accountant": "rdp (Opacus)"}


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


def ledger(records: list[dict]) -> dict | None:
    """``privacy.json``: per site, the target, δ, the noise and ε spent after each round, from the sites'
    round records; ``within_target`` is False if any site ended above its target. None without DP."""
    sites: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: (r["site"], r["round"])):
        p = r.get("privacy")
        if not p:
            continue
        site = sites.setdefault(r["site"], {k: p[k] for k in ("target_epsilon", "delta", "noise_multiplier",
                                                             "sample_rate", "max_grad_norm", "planned_steps")})
        site.setdefault("rounds", []).append({"round": r["round"], "steps": p["steps"], "epsilon": p["epsilon"]})
    if not sites:
        return None
    for site in sites.values():
        site["epsilon_spent"] = max(x["epsilon"] for x in site["rounds"])
        site["within_target"] = site["epsilon_spent"] <= site["target_epsilon"] * (1 + 1e-6)
    return {"mechanism": "DP-SGD (Opacus): per-image clipping, Gaussian noise, Poisson sampling; RDP accountant",
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


def delta_problem(site: str, delta: float, train_images: int, source: str = "") -> str | None:
    """The one δ rule: a site needs training images, and δ must be below 1/N for its N training images
    (a δ that large allows leaking whole records). ``source`` names the manifest the count came from."""
    where = f" ({source})" if source else ""
    if train_images < 2:
        return f"site {site!r}{where}: differential privacy needs training images; it has {train_images}"
    if delta >= 1.0 / train_images:
        return (f"site {site!r}{where}: privacy.dp.delta = {delta:g} is not below 1/N = 1/{train_images} (its training "
                f"images); a δ that large allows leaking whole records. Set privacy.dp.delta below "
                f"{1 / train_images:.2g}, or leave it out (default 1/(10 N) at each site)")
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
        n = int((read_manifest(path)["split"] == "train").sum())
        if problem := delta_problem(site, dp.delta, n, str(path)):
            problems.append(problem)
    return problems
