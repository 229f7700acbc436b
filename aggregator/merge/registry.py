"""Every aggregation rule by name (schemas/strategies.py), and the merge a run configures."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aggregator.merge.hetlora import aggregate_hetlora
from aggregator.merge.rankwise import WeightedUpdate, aggregate
from aggregator.merge.robust import aggregate_robust, check_clip_norm, clip_update
from aggregator.merge.svd import aggregate_svd
from lorafleet.ml.lora import Tensors
from schemas.config import RunConfig
from schemas.strategies import AggregationName

Merge = Callable[[Tensors, Iterable[WeightedUpdate]], Tensors]

#: ``auto`` is not a rule: RunConfig.merge_rule resolves it for the strategy.
MERGES: dict[AggregationName, Merge] = {
    AggregationName.RANK_WISE: aggregate,
    AggregationName.HETLORA: aggregate_hetlora,
    AggregationName.SVD: aggregate_svd,
}


def merge(config: RunConfig, current: Tensors, updates: Iterable[WeightedUpdate]) -> Tensors:
    """The configured merge: optional norm clipping, then a robust statistic or the strategy's rule.

    ``updates`` is read once. Every rule (and clipping) takes one update at a time, so a generator
    that loads each update when asked keeps one in memory; only the robust statistics (a median, a
    trimmed mean) need all of them at once and hold them in a list.
    """
    robust = config.robust
    clip_norm = robust.clip_norm
    if clip_norm is not None:
        check_clip_norm(clip_norm)
        updates = (clip_update(current, update, clip_norm) for update in updates)
    if robust.method != "none":
        return aggregate_robust(current, list(updates), method=robust.method, trim=robust.trim)
    if config.coverage:  # rank_wise only (RunConfig checks)
        return aggregate(current, updates, coverage=config.coverage)
    return MERGES[config.merge_rule](current, updates)
