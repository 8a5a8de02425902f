"""FedAvg whose result does not depend on the order in which sites answer.

NVFlare's built-in FedAvg aggregates "in time": each site's weights are added to a running sum as they
arrive, and floating-point addition is not associative, so two runs of the same job can differ in the
last bits whenever sites finish in another order (NVFlare's own docstring says so). Those bits grow
over later rounds into visibly different models. This aggregator keeps the round's results and sums
them in site-name order when the round closes: the same step-weighted mean (weights: the steps each
site trained, as NVFlare's FedAvg), the same exclusions, bit-identical whatever the arrival order.
It holds one model per site until the round ends — negligible beside a site's own training memory.
"""

from __future__ import annotations

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.aggregators.weighted_aggregation_helper import (WeightedAggregationHelper,
                                                                        filter_aggregatable_metrics)
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.base_fedavg import _get_client_name, _get_num_steps_weight


class SiteOrderedFedAvg(ModelAggregator):
    """Step-weighted FedAvg of weights and metrics, summed in sorted site order."""

    def __init__(self, exclude_vars: str | None = None):
        super().__init__()
        self.exclude_vars = exclude_vars
        self._results: dict[str, FLModel] = {}

    def reset_stats(self) -> None:
        self._results = {}

    def accept_model(self, model: FLModel) -> bool:
        name = _get_client_name(model)
        if name in self._results:
            self.warning(f"second result from {name} in one round; keeping the first")
            return False
        self._results[name] = model
        return True

    def aggregate_model(self) -> FLModel:
        weights = WeightedAggregationHelper(exclude_vars=self.exclude_vars)
        metrics = WeightedAggregationHelper()
        all_metrics = True
        first = None
        for name in sorted(self._results):
            result = self._results[name]
            first = first or result
            weight = _get_num_steps_weight(result)
            weights.add(data=result.params, weight=weight, contributor_name=name, contribution_round=result.current_round)
            if result.metrics is None:
                all_metrics = False
            elif all_metrics and (kept := filter_aggregatable_metrics(result.metrics)):
                metrics.add(data=kept, weight=weight, contributor_name=name, contribution_round=result.current_round)
        count = len(self._results)
        self._results = {}
        if first is None:
            return FLModel(params={}, meta={"nr_aggregated": 0})
        return FLModel(params=weights.get_result(), params_type=first.params_type,
                       metrics=(metrics.get_result() or None) if all_metrics else None,
                       meta={"nr_aggregated": count, AppConstants.CURRENT_ROUND: first.current_round})
