"""fedxr's FedAvg aggregator: the step-weighted mean, independent of the order sites answer in."""

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.apis.fl_constant import FLMetaKey

from fedxr.federated.aggregator import SiteOrderedFedAvg


def site_result(name: str, steps: int, seed: int, metric: float) -> FLModel:
    rng = np.random.default_rng(seed)
    params = {"model.w": rng.standard_normal(1000).astype(np.float32) * 1e3,
              "model.b": rng.standard_normal(7).astype(np.float32),
              "teacher.w": np.full(3, float(seed), dtype=np.float32)}
    return FLModel(params=params, params_type=ParamsType.FULL, metrics={"val_auroc": metric},
                   meta={"client_name": name, FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps}, current_round=2)


def aggregate(order, exclude=None) -> FLModel:
    agg = SiteOrderedFedAvg(exclude_vars=exclude)
    results = {"site-1": site_result("site-1", 10, 1, 0.6), "site-2": site_result("site-2", 30, 2, 0.7),
               "site-3": site_result("site-3", 20, 3, 0.9)}
    for name in order:
        assert agg.accept_model(results[name])
    return agg.aggregate_model(), results


def test_step_weighted_mean_of_weights_and_metrics():
    out, results = aggregate(["site-1", "site-2", "site-3"])
    steps = {"site-1": 10, "site-2": 30, "site-3": 20}
    expected = sum(steps[n] * results[n].params["model.w"].astype(np.float64) for n in steps) / 60
    np.testing.assert_allclose(out.params["model.w"], expected, rtol=1e-5, atol=1e-3)  # float32 sums
    assert out.metrics["val_auroc"] == pytest.approx((10 * 0.6 + 30 * 0.7 + 20 * 0.9) / 60)
    assert out.meta["nr_aggregated"] == 3


def test_result_is_bit_identical_whatever_the_arrival_order():
    first, _ = aggregate(["site-1", "site-2", "site-3"])
    for order in (["site-3", "site-1", "site-2"], ["site-2", "site-3", "site-1"]):
        other, _ = aggregate(order)
        for key in first.params:
            assert np.array_equal(first.params[key], other.params[key]), (order, key)


def test_excluded_tensors_are_not_aggregated_and_the_state_resets():
    out, _ = aggregate(["site-2", "site-1", "site-3"], exclude=r"^teacher\.")
    assert "teacher.w" not in out.params
    assert "model.w" in out.params
    agg = SiteOrderedFedAvg()
    assert agg.accept_model(site_result("site-1", 5, 1, 0.5))
    assert not agg.accept_model(site_result("site-1", 5, 9, 0.5))  # a second answer from one site is dropped
    agg.aggregate_model()
    assert agg.aggregate_model().meta["nr_aggregated"] == 0  # nothing carried over to the next round
