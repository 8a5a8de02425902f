"""Privacy: what leaves a site (the outgoing audit), DP-SGD with Opacus, NVFlare's update filters, and
homomorphic encryption in POC — each through the real NVFlare simulator or POC processes, at toy size."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedxr.cli import main
from fedxr.config import RecipeError, load_recipe
from fedxr.records import read_lines
from fedxr.data.prepare import ensure_dataset, ensure_sites
from fedxr.errors import FedxrError
from fedxr.federated.deploy import processes_using
from fedxr.federated.run import federate
from fedxr.labels import VAL_AP, VAL_AUROC, VAL_LOSS
from fedxr.models.checkpoint import load_checkpoint, model_from_checkpoint
from fedxr.models.classifier import XRayClassifier
from fedxr.models.registry import build_model
from fedxr.privacy.audit import read_outgoing
from fedxr.privacy.dp import BudgetExceeded, SitePrivacy, attach

from helpers import QUICKSTART, tiny_recipe_overrides

#: Everything besides tensors a site may send: its validation scores of the model it received and
#: NVFlare's step count (and, with HE, which tensors are encrypted and how).
ALLOWED_KEYS = {VAL_LOSS, VAL_AUROC, VAL_AP, "NUM_STEPS_CURRENT_ROUND", "PROCESSED_KEYS",
                "PROCESSED_ALGORITHM", "filter_history"}


def two_site_overrides(tmp, *extra, rounds=2, patients=50) -> list[str]:
    return tiny_recipe_overrides(tmp, patients=patients, extra=(
        "data.phantom.hospitals=2", "data.sites=2", "data.scheme=column", "data.column=hospital",
        "federated.min_clients=2", f"federated.rounds={rounds}", "data.batch_size=8", "federated.cross_site_eval=false",
        "distill.students=[]", *extra))


def two_sites(tmp, *extra, rounds=2, patients=50):
    recipe = load_recipe(QUICKSTART, two_site_overrides(tmp, *extra, rounds=rounds, patients=patients))
    ensure_dataset(recipe, progress=False)
    ensure_sites(recipe)
    return recipe


def outgoing(recipe) -> list[dict]:
    return read_outgoing(recipe.layout.federate / "records" / "outgoing")


def val_loss(message: dict) -> float:
    return (message["meta"].get("initial_metrics") or message["values"])[VAL_LOSS]


# ---- recipe checks: every bad combination is an error before any process starts ---------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["privacy.dp=true", "privacy.he=true", "federated.env=poc"], "privacy: dp and he together are not supported"),
    (["privacy.dp.epsilon=0"], "privacy.dp.epsilon must be above 0"),
    (["privacy.dp.epsilon=-1"], "privacy.dp.epsilon must be above 0"),
    (["privacy.dp.delta=1.5"], "privacy.dp.delta must be between 0 and 1"),
    (["privacy.he=true", "federated.env=sim"], "privacy.he: the simulator cannot run homomorphic encryption"),
    (["privacy.dp=true", "model.name=densenet121"], "privacy.dp: model.name densenet121 has layers Opacus cannot"),
    (["privacy.dp=true", "model.name=mobilenetv3_small_100"], "BatchNormAct2d"),
    (["privacy.dp=true", "distill.students=[resnet18_quarter]"], "Set distill.students: []"),
    (["privacy.dp=true", "model.mixup=0.2"], "set model.mixup: 0"),
    (["privacy.dp=true", "model.norm=batch"], "set model.norm: group (or auto)"),
    (["model.trainable=some"], "model.trainable"),
    (["privacy.dp.optimizer=adam"], "privacy.dp.optimizer"),
    (["privacy.filter=svt", "federated.algorithm=scaffold"], "privacy.filter: svt filters weight differences"),
    (["privacy.he=true", "federated.env=poc", "distill.students=[resnet18_quarter]"], "privacy.he: it covers the teacher"),
    (["privacy.filter=percentile"], "cross-site evaluation sends each site's whole local model unfiltered"),
    (["privacy.dp=true", "federated.algorithm=fedprox"], "FedProx's proximal term would be lost"),
    (["privacy.dp=true", "model.devices=1", "model.strategy=ddp"], "without DDP or torch.compile"),
    (["privacy.dp=true", "model.precision=16-mixed"], "model.precision 16-mixed scales the loss"),
])
def test_bad_privacy_settings_are_named_before_anything_starts(tmp_path, overrides, message):
    base = ["distill.students=[]", "model.name=tiny_cnn"]
    with pytest.raises(RecipeError) as err:
        load_recipe(QUICKSTART, base + overrides)
    assert message in str(err.value)


def test_fedxr_check_reports_privacy_problems(capsys):
    assert main(["check", str(QUICKSTART), "privacy.he=true"]) != 0
    err = capsys.readouterr().err
    assert "privacy.he: the simulator cannot run homomorphic encryption" in err
    assert "privacy.he: it covers the teacher" in err  # every problem at once


def test_delta_at_or_above_one_over_n_is_refused_at_the_site():
    dp = load_recipe(QUICKSTART, ["privacy.dp.delta=0.02", "distill.students=[]", "model.name=tiny_cnn"]).privacy.dp
    with pytest.raises(FedxrError, match=r"site 'site-2': privacy.dp.delta = 0.02 is not below 1/N = 1/50"):
        SitePrivacy.for_site(dp, "site-2", 50, 8, rounds=2, local_epochs=1, local_steps=None)
    ok = SitePrivacy.for_site(dp, "site-2", 44, 8, rounds=2, local_epochs=1, local_steps=None)  # 1/44 > 0.02
    assert ok.planned_steps == 2 * 6 and ok.sample_rate == pytest.approx(1 / 6)  # Opacus: ceil(44 / 8) batches


def test_check_and_federate_refuse_a_delta_too_large_for_a_site(tmp_path, capsys):
    """δ ≥ 1/N needs the sites' sizes: `fedxr check` names each site once the run's sites exist, and
    `fedxr federate` refuses before any process starts."""
    ov = two_site_overrides(tmp_path, "privacy.dp.delta=0.05")
    recipe = two_sites(tmp_path, "privacy.dp.delta=0.05")  # ~20 training images per site: 1/N > 0.05 nowhere
    assert main(["check", str(QUICKSTART), *ov]) == 1
    err = capsys.readouterr().err
    assert "privacy.dp.delta = 0.05 is not below 1/N" in err and "site-1" in err and "site-2" in err
    with pytest.raises(FedxrError, match="privacy.dp.delta = 0.05 is not below 1/N"):
        federate(recipe, "sim")
    assert not (recipe.layout.federate / "nvflare").exists()  # nothing was started
    assert main(["check", str(QUICKSTART), *two_site_overrides(tmp_path, "privacy.dp.delta=0.001")]) == 0


def test_a_round_past_the_target_is_refused_before_it_trains():
    """The real Opacus ledger: a site planned for 2 rounds of 4 steps spends its target in exactly those rounds
    and refuses a third with a message that names the site, the ε it would reach and the key to change."""
    dp = load_recipe(QUICKSTART, ["privacy.dp.epsilon=2", "distill.students=[]", "model.name=tiny_cnn"]).privacy.dp
    privacy = SitePrivacy.for_site(dp, "site-1", 32, 8, rounds=2, local_epochs=1, local_steps=None)
    module = XRayClassifier("tiny_cnn", norm="group")
    attach(module, privacy)
    opt = privacy.optimizer(torch.optim.SGD(module.model.parameters(), lr=0.1), expected_batch_size=8)
    spent = []
    for rnd in range(2):
        privacy.start_round("site-1", rnd, 4)
        for _ in range(4):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(module(torch.randn(8, 1, 32, 32)), torch.rand(8, 14))
            loss.backward()
            opt.step()
            opt.zero_grad()
        spent.append(privacy.end_round(rnd))
    assert [s["steps"] for s in spent] == [4, 4]
    assert 0 < spent[0]["epsilon"] < spent[1]["epsilon"] <= 2.0
    assert spent[1]["epsilon"] > 1.9  # the noise was chosen to spend the target, not a fraction of it
    with pytest.raises(BudgetExceeded, match=r"site 'site-1': round 2 would spend ε = [\d.]+ > privacy.dp.epsilon = 2 .*"
                                             r"This site stops training here"):
        privacy.start_round("site-1", 2, 4)
    # Every image's gradient was clipped: with the noise off, the summed clipped gradient is at most C per image.
    quiet = SitePrivacy(epsilon=2, delta=1e-3, max_grad_norm=0.5, sample_rate=0.25, planned_steps=8, noise_multiplier=1e-9)
    plain = XRayClassifier("tiny_cnn", norm="group")
    attach(plain, quiet)
    dp_opt = quiet.optimizer(torch.optim.SGD(plain.model.parameters(), lr=0.0), expected_batch_size=8)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(plain(torch.randn(8, 1, 32, 32)) * 100, torch.rand(8, 14))
    loss.backward()
    dp_opt.pre_step()
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in plain.model.parameters()))
    assert total <= 0.5 * 8 / 8 + 1e-6  # mean of 8 clipped gradients, each of norm <= 0.5


def test_dp_noise_cannot_be_recomputed_from_the_recipe_seed():
    """The same torch seed (what a recipe fixes) gives different DP noise: it comes from the OS's randomness."""
    moved = []
    for _ in range(2):
        torch.manual_seed(0)
        module = XRayClassifier("tiny_cnn", norm="group", init_seed=0)
        privacy = SitePrivacy(epsilon=8, delta=1e-3, max_grad_norm=1.0, sample_rate=0.25, planned_steps=8)
        attach(module, privacy)
        before = [p.detach().clone() for p in module.model.parameters()]
        opt = privacy.optimizer(torch.optim.SGD(module.model.parameters(), lr=1.0), expected_batch_size=8)
        (module(torch.zeros(8, 1, 32, 32)).sum() * 0).backward()  # zero gradient: the step is the noise alone
        opt.step()
        moved.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(module.model.parameters(), before)]))
    assert moved[0].abs().sum() > 0 and not torch.allclose(moved[0], moved[1])


def test_an_empty_poisson_batch_passes_augmentation():
    """Poisson sampling can draw no image: the batch (with its privacy units) passes augmentation as an empty float
    batch; that it then trains as a counted DP step is in test_dp_units (a logical batch is one DP step)."""
    from fedxr.data.datamodule import SiteDataModule
    from fedxr.preprocessing import Preprocessing

    dm = SiteDataModule.__new__(SiteDataModule)
    dm.preprocessing = Preprocessing(32)
    x, y, units = dm.on_after_batch_transfer((torch.zeros(0, 1, 32, 32, dtype=torch.uint8), torch.zeros(0, 14),
                                              torch.zeros(0, dtype=torch.int64)), 0)
    assert x.dtype == torch.float32 and x.shape == (0, 1, 32, 32) and units.shape == (0,)
    dm.dp_copies = 3  # augmentation multiplicity: copies of an image stay together, with its unit
    x, y, units = dm.on_after_batch_transfer((torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.eye(2, 14),
                                              torch.tensor([5, 9])), 0)
    assert x.shape == (6, 1, 32, 32) and units.tolist() == [5, 5, 5, 9, 9, 9] and y[:3, 0].tolist() == [1, 1, 1]


def _dp_and_plain(name: str, trainable: str = "all", optimizer: str = "sgd"):
    """The same GroupNorm classifier twice: one as plain training has it, one under DP-SGD with no noise and a
    clipping norm no gradient reaches (each image's gradient norm here is < 10), and their optimisers."""
    import copy

    torch.manual_seed(0)
    plain = XRayClassifier(name, norm="group", lr=0.05, trainable=trainable, optimizer=optimizer)
    private = copy.deepcopy(plain)
    groups = lambda m: [p for p in m.model.parameters() if p.requires_grad]  # noqa: E731
    make = (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)) if optimizer == "sgd" else \
        (lambda ps: torch.optim.AdamW(ps, lr=0.05))
    privacy = SitePrivacy(epsilon=8, delta=1e-3, max_grad_norm=1e6, sample_rate=0.25, planned_steps=8)
    privacy.noise_multiplier = 0.0  # no noise at all (even 1e-9 noise can flip a ReLU near zero: a random test)
    attach(private, privacy)
    return plain, make(groups(plain)), private, privacy.optimizer(make(groups(private)), expected_batch_size=8)


def _train_both(plain, opt_plain, private, opt_dp, steps: int = 4):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 32, 32, generator=g), (torch.rand(8, 14, generator=g) < 0.3).float()
        y[0, :3] = float("nan")  # unknown labels, as real sources have
        for module, opt in ((plain, opt_plain), (private, opt_dp)):
            opt.zero_grad()
            module.train()
            module._loss(module(x), y).backward()
            opt.step()


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet18"])
def test_null_dp_trains_exactly_as_plain_training(name):
    """With no noise and no clipping, DP-SGD is plain SGD on the same batches: per-image gradients summed and
    divided by the batch size are the batch's gradient. Float summation order differs (about 1e-6 relative in
    one step; 1e-6 to 3e-6 of how far the weights moved after 4 momentum steps, measured, or 5.5e-4 where such a
    difference flips a ReLU near zero), so they must agree to 2e-3 of it — clipping at norm 1 instead makes them
    differ by 5-30 % in one step. (AdamW would not: it
    turns the 1e-6 differences of near-zero gradient coordinates into ±lr steps, which is why DP uses SGD.)"""
    plain, opt_plain, private, opt_dp = _dp_and_plain(name)
    start = torch.cat([p.detach().flatten() for p in plain.model.parameters()]).clone()
    _train_both(plain, opt_plain, private, opt_dp)
    a = torch.cat([p.detach().flatten() for p in plain.model.parameters()])
    b = torch.cat([p.detach().flatten() for p in private.model.parameters()])
    moved = (a - start).abs().max()
    assert moved > 1e-3
    assert (a - b).abs().max() <= 2e-3 * moved, float((a - b).abs().max() / moved)


def test_trainable_head_under_dp_changes_only_the_head():
    plain, opt_plain, private, opt_dp = _dp_and_plain("resnet18", trainable="head")
    before = {n: p.detach().clone() for n, p in private.model.named_parameters()}
    _train_both(plain, opt_plain, private, opt_dp, steps=2)
    changed = {n for n, p in private.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"fc.weight", "fc.bias"}


def test_trainable_norms_and_head_under_dp_changes_only_those():
    plain, opt_plain, private, opt_dp = _dp_and_plain("resnet18", trainable="norms_and_head")
    before = {n: p.detach().clone() for n, p in private.model.named_parameters()}
    _train_both(plain, opt_plain, private, opt_dp, steps=2)
    changed = {n for n, p in private.model.named_parameters() if not torch.equal(p, before[n])}
    norms = {f"{m}.{n}" for m, mod in private.model.named_modules() if isinstance(mod, torch.nn.GroupNorm)
             for n, _ in mod.named_parameters(recurse=False)}
    assert len(norms) == 40 and changed == norms | {"fc.weight", "fc.bias"}  # 20 GroupNorms in ResNet-18, no conv


def test_dp_model_is_groupnorm_and_checkpoints_remember_it(tmp_path):
    model = build_model("tiny_cnn", norm="group")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "GroupNorm" in kinds and not any("BatchNorm" in k for k in kinds)
    module = XRayClassifier("tiny_cnn", norm="group")
    path = module.save_fedxr_checkpoint(tmp_path / "dp.ckpt")
    assert load_checkpoint(path)["norm"] == "group"
    rebuilt, _ = model_from_checkpoint(path)  # strict load: the GroupNorm network, not the BatchNorm one
    assert "GroupNorm" in {type(m).__name__ for m in rebuilt.modules()}


# ---- whole federations -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dp_federation_spends_within_its_target_and_reports_it(tmp_path):
    """Per-patient DP with logical batches of 16 images (physical 8) and 2 augmented copies per image, through the
    real simulator: every site within its ε for training and for the validation scores it released, and those
    scores are all that left besides the weights (no loss, AP or per-label score)."""
    recipe = two_sites(tmp_path, "privacy.dp.epsilon=3", "privacy.dp.unit=patient",
                       "privacy.dp.logical_batch_size=16", "privacy.dp.augmentations=2",
                       # validation splits big enough that some label has more cases than a patient has images
                       # (fewer, and one patient could swing it: nothing would be released)
                       "data.val_fraction=0.4", "privacy.dp.val_min_count=2", patients=160)
    summary = federate(recipe, "sim")
    book = json.loads((recipe.layout.federate / "privacy.json").read_text())
    assert book["within_target"] and set(book["sites"]) == {"site-1", "site-2"}
    assert "per-patient clipping" in book["mechanism"]
    for name, site in book["sites"].items():
        eps = [r["epsilon"] for r in site["rounds"]]
        assert [r["round"] for r in site["rounds"]] == [0, 1]
        assert 0 < eps[0] < eps[1] <= 3.0, name       # each round spends, and the total stays within the target
        assert eps[1] > 2.5, name                      # ...and the noise was not wastefully large
        assert site["unit"] == "patient" and site["copies"] == 2 and site["units"] < 100
        assert site["delta"] < 1 / site["units"] and site["noise_multiplier"] > 0.3
        # One validation score per round was released, noised, within the same target (3 planned: 2 rounds + final).
        assert site["val_releases_planned"] == 3 and 0 < site["val_epsilon_spent"] <= 3.0
        assert all(r["val_noise_std"] > 0 for r in site["rounds"])
    sent = [m for m in outgoing(recipe) if m["task"] == "train"]
    for m in sent:
        keys = set(m["values"]) | set((m.get("meta") or {}).get("initial_metrics", {}))
        assert not {VAL_LOSS, VAL_AP} & keys and not any("/" in k for k in keys), keys
    records = [r for f in (recipe.layout.federate / "records").glob("*.jsonl") for r in read_lines(f)]
    dp_records = [r for r in records if "privacy" in r]
    assert len(dp_records) == 4
    for r in dp_records:  # Lightning counts logical steps: one epoch = ⌈training images / 16⌉ DP steps, not chunks
        assert r["steps"] == round(1 / r["privacy"]["sample_rate"]) == -(-r["train_images"] // 16), r
    assert (recipe.layout.federate / "privacy.png").is_file()
    ckpt = load_checkpoint(summary.checkpoint)
    assert ckpt["norm"] == "group"
    model_from_checkpoint(ckpt)  # the exported network is the GroupNorm one that was trained
    assert not any("running_mean" in k for k in ckpt["state_dict"])


@pytest.mark.slow
def test_percentile_filter_sends_differences_and_training_still_learns(tmp_path):
    recipe = two_sites(tmp_path, "privacy.filter=percentile", rounds=3)
    federate(recipe, "sim")
    messages = outgoing(recipe)
    train = [m for m in messages if m["task"] == "train"]
    assert len(train) == 6 and {m["kind"] for m in train} == {"WEIGHT_DIFF"}
    for m in train:
        values = sum(int(np.prod(t["shape"])) for t in m["tensors"].values())
        zeros = sum(t["zeros"] for t in m["tensors"].values())
        assert zeros >= 0.099 * values  # the filter withheld the smallest 10 % of the changes (to its percentile)
    # Learning on data the model never trained on: each site's validation loss of the global model falls.
    for site in ("site-1", "site-2"):
        first = next(m for m in train if m["site"] == site and m["round"] == 0)
        final = [m for m in messages if m["site"] == site and m["task"] == "validate"]
        assert final and val_loss(final[-1]) < val_loss(first) - 0.005, site


@pytest.mark.slow
def test_poc_sends_only_weights_and_declared_scores(tmp_path):
    """Mutual-TLS POC: every message each site sent (recorded by its last outgoing filter) holds only the
    model's parameters, by name and shape, plus the declared scores — no image, file path or patient id."""
    recipe = two_sites(tmp_path, rounds=2)
    summary = federate(recipe, "poc")
    workspace = recipe.layout.federate / "poc"
    server_cfg = json.loads(next(workspace.rglob("server/startup/fed_server.json")).read_text())
    assert server_cfg["servers"][0]["connection_security"] == "mtls"
    assert (recipe.layout.federate / "global_last.ckpt").is_file() and summary.env == "poc"
    assert processes_using(workspace) == []  # every server/site process fedxr started is gone

    state = XRayClassifier("tiny_cnn").state_dict()
    params = {k: list(v.shape) for k, v in state.items()}
    manifests = [pd.read_csv(p) for p in sorted(recipe.layout.sites.glob("site-*.csv"))]
    # Image names and paths are long enough to find anywhere in the text; patient ids are small integers, which
    # the key check above covers (no key but the declared ones is sent).
    secrets = {str(v) for df in manifests for col in ("image", "path") for v in df[col]}
    secrets |= {str(recipe.layout.sites.resolve()), str(tmp_path), "patient"}
    assert len(secrets) > 50
    messages = outgoing(recipe)
    assert {m["site"] for m in messages} == {"site-1", "site-2"}
    assert sorted((m["site"], m["round"]) for m in messages if m["task"] == "train") == \
        [("site-1", 0), ("site-1", 1), ("site-2", 0), ("site-2", 1)]
    for m in messages:
        assert {n: t["shape"] for n, t in m["tensors"].items()} == (params if m["task"] == "train" else {})
        keys = set(m["values"]) | set(m.get("meta", {})) | set((m.get("meta") or {}).get("initial_metrics", {}))
        keys -= {"initial_metrics"}
        assert {k.split("/")[0] for k in keys} <= ALLOWED_KEYS, m
        text = json.dumps({k: v for k, v in m.items() if k != "tensors"})
        assert not [s for s in secrets if s and s in text], m
    table = json.loads((recipe.layout.federate / "outgoing.json").read_text())
    row = next(r for r in table if r["site"] == "site-1" and r["task"] == "train" and r["round"] == 1)
    assert row["tensors"] == len(params) and row["bytes"] == sum(v.numel() * v.element_size() for v in state.values())


@pytest.mark.slow
def test_he_in_poc_aggregates_encrypted_updates_exactly(tmp_path):
    """2 sites, 1 round, TenSEAL CKKS in POC: sites send only ciphertexts, the server saves the global model
    encrypted, and the model a site decrypts equals plain FedAvg of the same updates (within 1e-5)."""
    recipe = two_sites(tmp_path, "privacy.he=true", "federated.env=poc", rounds=1)
    summary = federate(recipe, "poc", extra_args="--save-updates")
    fed = recipe.layout.federate
    train = [m for m in outgoing(recipe) if m["task"] == "train"]
    assert len(train) == 2
    for m in train:
        assert {t["dtype"] for t in m["tensors"].values()} == {"CKKSVector"}
        assert m["meta"]["PROCESSED_ALGORITHM"] == "CKKS"
    server_model = next(p for p in (fed / "poc_result").rglob("FL_global_model.pt"))
    saved = torch.load(server_model, weights_only=False)["model"]
    assert saved and all(isinstance(v, bytes) for v in saved.values())  # nothing in the clear on the server
    updates = [torch.load(fed / "records" / f"{s}_round0.pt", weights_only=False) for s in ("site-1", "site-2")]
    steps = sum(u["steps"] for u in updates)
    assert len({u["steps"] for u in updates}) == 2  # different site sizes: the weighting matters
    decrypted = load_checkpoint(summary.checkpoint)["state_dict"]
    worst = 0.0
    for name, value in decrypted.items():
        plain = sum(u["state_dict"][f"model.{name}"].double() * u["steps"] for u in updates) / steps
        if value.is_floating_point():
            worst = max(worst, float((value.double() - plain).abs().max()))
        else:
            assert torch.equal(value, plain.round().to(value.dtype)), name
    assert worst < 1e-5
    assert processes_using(fed / "poc") == []
