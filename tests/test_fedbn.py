"""FedBN through the real NVFlare simulator: every site keeps its BatchNorm and its own model; the global model gets
pooled BatchNorm; evaluation scores each site with its own model; each site distils from its own teacher."""

import json
import math
from pathlib import Path

import pytest
import torch

from fedxr.config import load_recipe
from fedxr.data.prepare import ensure_dataset, ensure_sites
from fedxr.federated.fedbn import PERSONAL_FILE, SUMMARY_FILE, keep_personal, site_models
from fedxr.federated.run import federate
from fedxr.models.checkpoint import load_checkpoint
from fedxr.records import read_records

from helpers import QUICKSTART, tiny_recipe_overrides

pytestmark = pytest.mark.slow

BN_MEAN = "features.1.running_mean"
BN_VAR = "features.1.running_var"
BN_WEIGHT = "features.1.weight"


@pytest.fixture(scope="module")
def fedbn_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fedbn")
    # Two hospitals of different sizes and case mix: their BatchNorm statistics differ.
    ov = tiny_recipe_overrides(tmp, patients=50, extra=(
        "data.phantom.hospitals=2", "data.sites=2", "data.scheme=column", "data.column=hospital",
        "federated.min_clients=2", "federated.rounds=2", "data.batch_size=8", "federated.fedbn=true",
        "federated.cross_site_eval=false", "distill.students=[tiny_cnn]", "distill.rounds=1",
        "distill.ablation_no_teacher=false"))
    recipe = load_recipe(QUICKSTART, ov)
    ensure_dataset(recipe, progress=False)
    ensure_sites(recipe)
    summary = federate(recipe, "sim", extra_args="--save-updates")
    return recipe, summary


def test_sites_keep_batchnorm_and_the_lr_schedule_spans_the_rounds(fedbn_run):
    recipe, summary = fedbn_run
    rounds = json.loads(Path(summary.rounds).read_text())
    assert [r["round"] for r in rounds if isinstance(r["round"], int)] == [0, 1]
    records = recipe.layout.federate / "records"
    s1 = torch.load(records / "site-1_round1.pt", weights_only=True)["state_dict"]
    s2 = torch.load(records / "site-2_round1.pt", weights_only=True)["state_dict"]
    assert not torch.equal(s1[f"model.{BN_MEAN}"], s2[f"model.{BN_MEAN}"])  # statistics stayed at each hospital
    # The learning-rate schedule spans both rounds: half-way (end of round 0) the cosine is at about half the base
    # rate, not already at zero; at the end of the last round it is near zero.
    lr = {(r["site"], r["round"]): r["lr_end"] for r in read_records(records)}
    base = recipe.model.lr
    assert 0.3 * base < lr[("site-1", 0)] < 0.8 * base
    assert lr[("site-1", 1)] < 0.05 * base


def test_each_site_has_its_own_model_and_the_global_one_pooled_batchnorm(fedbn_run):
    recipe, summary = fedbn_run
    own = site_models(summary.checkpoint)
    assert set(own) == {"site-1", "site-2"}
    sites = {s: load_checkpoint(p) for s, p in own.items()}
    info = json.loads((recipe.layout.fedbn_sites() / SUMMARY_FILE).read_text())["sites"]
    for site, ckpt in sites.items():
        assert ckpt["source"] == "federate:fedbn" and ckpt["fedbn"]["site"] == site
        # kept where the site's own validation was best (or the last model, where it could not be scored); round 0's
        # model, the server's starting point, is not the site's
        scores = [r["val_auroc"] for r in read_records(recipe.layout.federate / "records")
                  if r["site"] == site and r["round"] > 0]
        finite = [v for v in scores if v is not None and math.isfinite(v)]
        if finite and info[site]["val_auroc"] is not None:
            assert info[site]["val_auroc"] >= max(finite) - 1e-9
    a, b = sites["site-1"]["state_dict"], sites["site-2"]["state_dict"]
    assert not torch.equal(a[BN_MEAN], b[BN_MEAN])
    glob = load_checkpoint(summary.checkpoint)
    assert glob["fedbn"]["site_models"] == {"site-1": "site-1.ckpt", "site-2": "site-2.ckpt"}
    # Without pooling the global model would hold NVFlare's untouched BatchNorm (weights 1, statistics 0 and 1).
    w = torch.tensor([info["site-1"]["train_images"], info["site-2"]["train_images"]], dtype=torch.float64)
    w = w / w.sum()
    mean = w[0] * a[BN_MEAN].double() + w[1] * b[BN_MEAN].double()
    var = (w[0] * (a[BN_VAR].double() + a[BN_MEAN].double() ** 2) + w[1] * (b[BN_VAR].double() + b[BN_MEAN].double() ** 2)
           - mean ** 2)
    assert torch.allclose(glob["state_dict"][BN_MEAN].double(), mean, atol=1e-6)
    assert torch.allclose(glob["state_dict"][BN_VAR].double(), var, atol=1e-5)
    assert torch.allclose(glob["state_dict"][BN_WEIGHT].double(), w[0] * a[BN_WEIGHT].double() + w[1] * b[BN_WEIGHT].double(),
                          atol=1e-6)
    assert not torch.allclose(glob["state_dict"][BN_WEIGHT], torch.ones_like(glob["state_dict"][BN_WEIGHT]))
    # The shared layers are the server's (FedAvg of the sites) and are left alone.
    server = torch.load(next((recipe.layout.federate / "nvflare").rglob("app_server/FL_global_model.pt")),
                        weights_only=False)["model"]
    last = load_checkpoint(summary.checkpoints["global_last"])["state_dict"]
    assert torch.equal(torch.as_tensor(server["model.head.weight"]), last["head.weight"])


def test_evaluation_scores_each_site_with_its_own_model(fedbn_run, tmp_path):
    from fedxr.evaluation import evaluate_sites

    recipe, summary = fedbn_run
    own = site_models(summary.checkpoint)
    both = evaluate_sites({"own": {**own, "*": summary.checkpoint}, "site-1's": own["site-1"],
                           "global": summary.checkpoint}, recipe.layout.sites, split="val", out=tmp_path,
                          cache_dir=recipe.data.cache_dir, progress=False, keep_predictions=True)
    p = both["predictions"]
    assert (p["site-1"]["own"][0] == p["site-1"]["site-1's"][0]).all()
    assert not (p["site-2"]["own"][0] == p["site-2"]["site-1's"][0]).all()
    assert not (p["site-1"]["own"][0] == p["site-1"]["global"][0]).all()
    assert both["per_site_models"] == ["own"]
    assert both["models"]["own"]["site-2"] == str(own["site-2"])


def test_each_site_distils_from_its_own_teacher(fedbn_run):
    from fedxr.distill.run import distill

    recipe, summary = fedbn_run
    distill(recipe, summary.checkpoint, progress=False)
    records = read_records(recipe.layout.stage("distill/tiny_cnn") / "records")
    own = {s: load_checkpoint(p)["weights_sha256"][:16] for s, p in site_models(summary.checkpoint).items()}
    used = {r["site"]: r["teacher_digest"] for r in records}
    assert used == own  # not the global teacher with pooled BatchNorm, and not one site's for both
    assert own["site-1"] != own["site-2"]
    # FedBN carries over to the student: each site keeps its own student beside the student's global checkpoints.
    students = site_models(recipe.layout.stage("distill/tiny_cnn") / "global_last.ckpt")
    assert set(students) == {"site-1", "site-2"}
    student = load_checkpoint(students["site-1"])
    assert not any(k.startswith("teacher.") for k in student["state_dict"])  # the student alone
    assert not torch.equal(student["state_dict"][BN_MEAN], load_checkpoint(students["site-2"])["state_dict"][BN_MEAN])


def test_a_site_keeps_the_model_its_validation_liked_best(tmp_path):
    net = torch.nn.Linear(2, 1)
    assert keep_personal(tmp_path, net, 0, 0.6, 10)
    with torch.no_grad():
        net.weight.add_(1)
    assert not keep_personal(tmp_path, net, 1, 0.5, 10)  # worse: the round-0 model stays
    kept = torch.load(tmp_path / PERSONAL_FILE, weights_only=True)
    assert kept["round"] == "0" and kept["val_auroc"] == 0.6
    assert keep_personal(tmp_path, net, 2, 0.7, 10)
    # a site whose validation cannot be scored (one class) keeps the latest model
    other = tmp_path / "one-class"
    other.mkdir()
    assert keep_personal(other, net, 0, float("nan"), 10)
    assert keep_personal(other, net, 1, None, 10)
    assert torch.load(other / PERSONAL_FILE, weights_only=True)["round"] == "1"


def test_fedbn_with_cross_site_evaluation_is_refused(tmp_path):
    from fedxr.config import RecipeError

    with pytest.raises(RecipeError, match="federated.cross_site_eval: with federated.fedbn"):
        load_recipe(QUICKSTART, tiny_recipe_overrides(tmp_path) + ["federated.fedbn=true"])


def test_the_final_evaluation_scores_each_sites_own_model(fedbn_run):
    """The server's final evaluation (its last and best global models at every site) scores each site's own model:
    the shared layers with that site's BatchNorm, not the untrained BatchNorm the server holds."""
    recipe, summary = fedbn_run
    final = json.loads(Path(summary.cross_site).read_text())["by_data_site"]
    info = json.loads((recipe.layout.fedbn_sites() / SUMMARY_FILE).read_text())["sites"]
    checked = 0
    for site, scores in final.items():
        if info[site]["round"] == "final" and info[site]["val_auroc"] is not None:
            assert info[site]["val_auroc"] == pytest.approx(max(scores.values()))  # what it kept is what it reported
            checked += 1
    assert checked, "no site kept its final model: nothing was compared (the toy run changed; adjust it)"
    assert summary.checkpoints.keys() == {"global_best", "global_last"}


def test_a_module_keeps_what_it_must_whatever_model_is_loaded_into_it():
    from fedxr.models.classifier import XRayClassifier

    module, other = XRayClassifier("tiny_cnn"), XRayClassifier("tiny_cnn")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1)
    own = {f"model.{BN_WEIGHT}": torch.full_like(module.model.features[1].weight, 5.0)}
    module.keep_on_load = own
    module.load_state_dict(other.state_dict(), strict=False)  # as NVFlare's callback loads a received model
    assert torch.equal(module.state_dict()[f"model.{BN_WEIGHT}"], own[f"model.{BN_WEIGHT}"])
    assert torch.equal(module.state_dict()["model.head.weight"], other.state_dict()["model.head.weight"])
    module.keep_on_load = None
    module.load_state_dict(other.state_dict())
    assert torch.equal(module.state_dict()[f"model.{BN_WEIGHT}"], other.state_dict()[f"model.{BN_WEIGHT}"])


def test_a_global_model_with_untrained_batchnorm_is_refused(tmp_path):
    """Production FedBN: the sites' models stay at the sites, so the global checkpoints say their BatchNorm is
    untrained, and evaluating, exporting or distilling from them is an error saying what to use instead."""
    from fedxr.distill.run import check_teacher
    from fedxr.errors import FedxrError
    from fedxr.federated.fedbn import mark_untrained
    from fedxr.models.checkpoint import model_from_checkpoint, save_checkpoint
    from fedxr.models.registry import build_model
    from fedxr.preprocessing import Preprocessing

    path = save_checkpoint(tmp_path / "global_last.ckpt", model_name="tiny_cnn", state_dict=build_model("tiny_cnn").state_dict(),
                           preprocessing=Preprocessing(32), thresholds=[0.5] * 14, source="federate")
    model_from_checkpoint(path)  # an ordinary checkpoint loads
    mark_untrained({"global_last": str(path)})
    for use in (model_from_checkpoint, check_teacher):
        with pytest.raises(FedxrError, match="global_last.ckpt: a FedBN federation's global model.*personal.pt"):
            use(path)
