"""Every aggregation rule by name (schemas/strategies.py), and the merge a run configures."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aggregator.merge.hetlora import aggregate_hetlora
from aggregator.merge.rankwise import WeightedUpdate, aggregate
from aggregator.merge.robust import aggregate_robust, clip_updates
from aggregator.merge.svd import aggregate_svd
from lorafleet.ml.lora import Tensors
from schemas.config import RunConfig
from schemas.strategies import AggregationName

Merge = Callable[[Tensors, Sequence[WeightedUpdate]], Tensors]

#: ``auto`` is not a rule: RunConfig.merge_rule resolves it for the strategy.
MERGES: dict[AggregationName, Merge] = {
    AggregationName.RANK_WISE: aggregate,
    AggregationName.HETLORA: aggregate_hetlora,
    AggregationName.SVD: aggregate_svd,
}


def merge(config: RunConfig, current: Tensors, updates: list[WeightedUpdate]) -> Tensors:
    """The configured merge: optional norm clipping, then a robust statistic or the strategy's rule."""
    robust = config.robust
    if robust.clip_norm is not None:
        updates = clip_updates(current, updates, robust.clip_norm)
    if robust.method != "none":
        return aggregate_robust(current, updates, method=robust.method, trim=robust.trim)
    return MERGES[config.merge_rule](current, updates)
