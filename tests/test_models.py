"""Registry, classifier, checkpoint format, and the train/evaluate commands at toy size."""

import json
import math

import numpy as np
import pytest
import torch

from fedxr.cli import main
from fedxr.config import RecipeError, load_recipe
from fedxr.labels import LABELS
from fedxr.models.checkpoint import load_checkpoint, model_from_checkpoint
from fedxr.models.classifier import XRayClassifier, pos_weight_from_labels
from fedxr.models.metrics import choose_thresholds, multilabel_scores
from fedxr.models.registry import REGISTRY, UnknownModelError, complexity, get_spec

from helpers import QUICKSTART, tiny_recipe_overrides



@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registry_entry_builds_and_runs(name):
    from fedxr.models.registry import build_model

    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 14)
    assert torch.isfinite(out).all()
    params, macs = complexity(name)
    assert params == sum(p.numel() for p in model.parameters())
    assert macs > 0


def test_complexity_ordering():
    assert complexity("densenet121")[1] > 10 * complexity("mobilenetv3_small_100")[1]


def test_unknown_model_did_you_mean():
    with pytest.raises(UnknownModelError, match="did you mean 'resnet18'.*known models: densenet121"):
        get_spec("resnet-18")
    with pytest.raises(RecipeError, match="model.name: unknown model 'densenet12'; did you mean 'densenet121'"):
        load_recipe(QUICKSTART, ["model.name=densenet12"])


def test_models_list_command(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "densenet121" in out
    assert "teacher" in out
    assert "2.754G" in out


def test_pos_weight_capped_and_safe():
    labels = np.zeros((100, 14))
    labels[:50, 0] = 1
    labels[:1, 1] = 1
    w = pos_weight_from_labels(labels, cap=10)
    assert w[0] == 1.0
    assert w[1] == 10.0
    assert w[2] == 1.0


def test_metrics_exclude_absent_class():
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(50, 14, generator=g) < 0.3).float()
    targets[:, 13] = 0
    probs = (targets * 0.6 + torch.rand(50, 14, generator=g) * 0.4)
    s = multilabel_scores(probs, targets)
    assert s["auroc"]["Hernia"] is None
    assert "Hernia" in s["note"]
    assert s["excluded"] == ["Hernia"]
    assert math.isfinite(s["macro_auroc"])
    assert s["macro_auroc"] > 0.9
    thr = choose_thresholds(probs, targets)
    assert thr[13] == 0.5
    assert (thr[:13] > 0).all()


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    module = XRayClassifier("tiny_cnn", lr=3e-3)
    x = torch.randn(16, 1, 32, 32)
    y = (torch.rand(16, 14) < 0.3).float()
    x = x + 2 * y[:, :1, None, None]  # a learnable signal
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(module._loss(module(x), y))
    module.train()
    for _ in range(30):
        opt.zero_grad()
        module._loss(module(x), y).backward()
        opt.step()
    module.eval()
    with torch.no_grad():
        assert float(module._loss(module(x), y)) < 0.7 * before


def test_state_dict_has_no_duplicate_modules():
    keys = XRayClassifier("tiny_cnn").state_dict().keys()
    assert all(k.startswith("model.") or k == "thresholds" for k in keys)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    ov = tiny_recipe_overrides(tmp)
    assert main(["data", "prepare", str(QUICKSTART), *ov]) == 0
    assert main(["train", str(QUICKSTART), "--mode", "central", *ov]) == 0
    return tmp, ov


def test_train_central_writes_checkpoints(trained):
    tmp, _ = trained
    folder = tmp / "runs" / "t" / "train_central"
    ckpt = load_checkpoint(folder / "best.ckpt")
    assert ckpt["model_name"] == "tiny_cnn"
    assert ckpt["preprocessing"].size == 32
    assert len(ckpt["thresholds"]) == 14
    assert ckpt["recipe"]["model"]["name"] == "tiny_cnn"
    assert "val" in ckpt["metrics"]
    assert (folder / "last.ckpt").is_file()
    assert (folder / "recipe.yaml").is_file()
    assert json.loads((folder / "summary.json").read_text())["best_val_auroc"] > 0


def test_checkpoint_round_trip_identical_outputs(trained, tmp_path):
    tmp, _ = trained
    model, ckpt = model_from_checkpoint(tmp / "runs" / "t" / "train_central" / "best.ckpt")
    module = XRayClassifier.from_fedxr_checkpoint(ckpt).eval()
    module.save_fedxr_checkpoint(tmp_path / "again.ckpt")
    again, ckpt2 = model_from_checkpoint(tmp_path / "again.ckpt")
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)
    assert ckpt2["thresholds"] == ckpt["thresholds"]


def test_a_damaged_checkpoint_is_refused_with_its_name_and_the_fix(trained, tmp_path, capsys):
    """A byte flipped inside the weights (torch's file format loads that silently, with the wrong weights) or a
    truncated file: a clear error naming the file and what to do, from the library and from a command."""
    from fedxr.errors import FedxrError
    from fedxr.models.checkpoint import state_dict_sha256

    tmp, _ = trained
    good = tmp / "runs" / "t" / "train_central" / "best.ckpt"
    ckpt = load_checkpoint(good)
    assert ckpt["weights_sha256"] == state_dict_sha256(ckpt["state_dict"])
    data = bytearray(good.read_bytes())
    # the largest tensor's stored bytes (its storage: channels_last is not the logical order): flip one in the middle
    name, biggest = max(ckpt["state_dict"].items(), key=lambda kv: kv[1].numel())
    raw = torch.empty(0, dtype=torch.uint8).set_(biggest.untyped_storage()).numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0, name
    data[at + len(raw) // 2] ^= 0x40
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(FedxrError, match=r"flipped.ckpt: its weights are not the ones written .*Copy it again"):
        load_checkpoint(flipped)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FedxrError, match="truncated.ckpt: not a readable fedxr checkpoint"):
        load_checkpoint(truncated)
    capsys.readouterr()
    assert main(["evaluate", str(flipped), "--data", str(tmp / "runs" / "t" / "sites"), "--json"]) == 1
    assert "flipped.ckpt: its weights are not the ones written" in capsys.readouterr().err


def test_train_local_and_evaluate(trained, capsys):
    tmp, ov = trained
    assert main(["train", str(QUICKSTART), "--mode", "local", "--site", "site-2", *ov]) == 0
    ckpt = tmp / "runs" / "t" / "train_local_site-2" / "best.ckpt"
    assert ckpt.is_file()
    capsys.readouterr()
    # One site's test split is small: rare classes are absent and must be excluded, not crash.
    assert main(["evaluate", str(ckpt), "--data", str(tmp / "runs" / "t" / "sites" / "site-2.csv"),
                 "--split", "test", "--json", "--cache-dir", str(tmp / "cache")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["excluded"]
    assert math.isfinite(result["macro_auroc"])
    assert set(result["at_thresholds"]["Effusion"]) >= {"sensitivity", "specificity", "threshold"}
    out = tmp / "runs" / "t" / "train_local_site-2" / "eval_test"
    assert (out / "metrics.json").is_file()
    assert (out / "roc_curves.png").stat().st_size > 5000


def test_train_errors(trained, capsys, tmp_path):
    tmp, ov = trained
    assert main(["train", str(QUICKSTART), "--mode", "local", *ov]) == 1
    assert "--site" in capsys.readouterr().err
    assert main(["train", str(QUICKSTART), "--mode", "local", "--site", "site-9", *ov]) == 1
    assert "site-9" in capsys.readouterr().err
    fresh = tiny_recipe_overrides(tmp_path)
    assert main(["train", str(QUICKSTART), *fresh]) == 1
    assert "fedxr data prepare" in capsys.readouterr().err


def test_batched_auroc_matches_torchmetrics_with_ties():
    from torchmetrics.functional.classification import binary_auroc

    from fedxr.models.metrics import batched_auroc

    rng = np.random.default_rng(3)
    labels = (rng.random((4, 300)) < 0.2).astype(np.int64)
    scores = np.round(rng.random((4, 300)) + 0.4 * labels, 1)  # rounding makes many ties
    got = batched_auroc(scores, labels)
    for b in range(4):
        expected = binary_auroc(torch.tensor(scores[b], dtype=torch.float32), torch.tensor(labels[b]))  # as models output
        assert got[b] == pytest.approx(float(expected), abs=1e-6)
    assert np.isnan(batched_auroc(scores[:1], np.zeros((1, 300))))[0]


def test_macro_counts_only_classes_with_enough_positives():
    from fedxr.models.metrics import multilabel_scores

    g = torch.Generator().manual_seed(1)
    targets = torch.zeros(200, 14)
    targets[:40, 0] = 1  # 40 positives: counted
    targets[:3, 1] = 1   # 3 positives: too few
    probs = torch.rand(200, 14, generator=g) * 0.5 + targets * 0.4
    s = multilabel_scores(probs, targets, min_positives=10)
    assert s["counted"] == [LABELS[0]]
    assert s["macro_auroc"] == pytest.approx(s["auroc"][LABELS[0]])
    assert s["macro_auroc_all"] == pytest.approx((s["auroc"][LABELS[0]] + s["auroc"][LABELS[1]]) / 2)
    assert "too few known positives or negatives (< 10)" in s["note"]
    assert LABELS[1] in s["note"]
    # A toy split where no class reaches the minimum still gets a macro, flagged as unstable.
    toy = multilabel_scores(probs, targets, min_positives=100)
    assert toy["counted"] == [LABELS[0], LABELS[1]]
    assert "unstable" in toy["note"]


def test_bootstrap_interval_and_paired_difference():
    from fedxr.models.metrics import bootstrap_macro_auroc, interval

    rng = np.random.default_rng(0)
    targets = (rng.random((500, 14)) < 0.15).astype(np.float32)
    good = rng.random((500, 14)) * 0.6 + targets * 0.5
    worse = rng.random((500, 14)) * 0.6 + targets * 0.2
    classes = list(LABELS[:5])
    samples = bootstrap_macro_auroc([good, worse, good], targets, classes, resamples=200, seed=4)
    assert samples.shape == (3, 200)
    point = float(np.mean([float(binary_auroc_np(good[:, i], targets[:, i])) for i in range(5)]))
    lo, hi = interval(samples[0])
    assert lo < point < hi
    assert hi - lo < 0.1
    assert np.array_equal(samples[0], samples[2])  # same resamples for every model: differences are paired
    diff_lo, _ = interval(samples[0] - samples[1])
    assert diff_lo > 0  # the better model is better on (nearly) every resample
    again = bootstrap_macro_auroc([good], targets, classes, resamples=200, seed=4)
    assert np.array_equal(again[0], samples[0])  # seeded


def binary_auroc_np(scores, labels):
    from torchmetrics.functional.classification import binary_auroc

    return binary_auroc(torch.tensor(scores), torch.tensor(labels).int())


def test_seeded_initialisation_is_reproducible_and_leaves_global_rng_alone():
    from fedxr.models.classifier import XRayClassifier

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = XRayClassifier("tiny_cnn", init_seed=5)
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is untouched
    b = XRayClassifier("tiny_cnn", init_seed=5)
    c = XRayClassifier("tiny_cnn", init_seed=6)
    key = "model.features.0.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_mixup_blends_images_and_labels_of_one_batch():
    from fedxr.models.classifier import XRayClassifier

    x = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    y = torch.tensor([[0.0] * 14, [1.0] * 14])
    plain = XRayClassifier("tiny_cnn")
    assert plain.mix(x, y)[0] is x  # off by default
    torch.manual_seed(0)
    mx, my = XRayClassifier("tiny_cnn", mixup=0.4).mix(x, y)
    # Every mixed image is a convex blend, and its label is the same blend of the labels.
    assert torch.allclose(mx.mean(dim=(1, 2, 3)), my.mean(1))
    assert ((mx >= 0) & (mx <= 1)).all()


def test_site_round_seeds_are_stable_and_distinct():
    from fedxr.federated.client import site_round_seed

    assert site_round_seed(0, "site-1", 3) == site_round_seed(0, "site-1", 3)
    seeds = {site_round_seed(s, site, r) for s in (0, 1) for site in ("site-1", "site-2") for r in (None, 0, 1)}
    assert len(seeds) == 12


@pytest.mark.parametrize("name,ratio", [("resnet18_quarter", 10), ("resnet18_eighth", 20), ("resnet18_narrow", 14)])
def test_slim_resnet18_students(name, ratio):
    # The quickstart's student must have at least 10x fewer MACs than its ResNet-18 teacher at 96 px.
    assert complexity("resnet18", 96)[1] >= ratio * complexity(name, 96)[1]
    from fedxr.models.registry import build_model

    model = build_model(name).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 96, 96)).shape == (2, 14)
    assert get_spec(name).role == "student"
    stem = model.conv1.out_channels
    assert stem == (16 if name == "resnet18_narrow" else 64)  # timm's plain stem stays 64 wide unless narrowed


def test_compiled_model_runs_forward_on_cpu():
    """model.compile: true goes through torch.compile (inductor; CPU here). A compiled module refuses len(),
    so `compiled or model` broke every compiled run before the first step (found on the H200)."""
    import torch

    from fedxr.models.classifier import XRayClassifier

    module = XRayClassifier("tiny_cnn", compile_model=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        compiled = module(x)
        eager = module.model(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
