"""The names of the planning strategies and of the aggregation rules: one registry each.

The configuration validates against these enums; ``orchestrator/planners/registry.py`` and
``aggregator/merge/registry.py`` map every name to its implementation (a test checks that each
name has exactly one), so a name is written here once and nowhere else as a string.
"""

from __future__ import annotations

from enum import StrEnum


class StrategyName(StrEnum):
    """``strategy:`` of a run."""

    FEDLORA = "fedlora"  # FedIT: every device LoRA on all configured blocks at one rank
    LEGEND = "legend"  # LEGEND-style depth and rising rank distribution per device
    LEGEND_UNIFORM_RANK = "legend_uniform_rank"  # ablation: no rank distribution
    LEGEND_FIXED_DEPTH = "legend_fixed_depth"  # ablation: one depth for every device
    HETLORA = "hetlora"  # all blocks, per-device rank by capacity
    FEDRA = "fedra"  # a random block subset per round, LEGEND's budget
    HIERFEDLORA = "hierfedlora"  # HierFedLoRA-style: near-IID groups, per-group depth and frequency
    HIER_NO_GROUPING = "hier_no_grouping"  # ablation: one group of every device
    HIER_FIXED_FREQUENCY = "hier_fixed_frequency"  # ablation: one frequency for every group
    HIER_FIXED_DEPTH = "hier_fixed_depth"  # ablation: one depth for every group

    @property
    def hierarchical(self) -> bool:
        """Runs global rounds over groups of devices (the HierFedLoRA family)."""
        return self in HIERARCHICAL_STRATEGIES


HIERARCHICAL_STRATEGIES = frozenset(
    {
        StrategyName.HIERFEDLORA,
        StrategyName.HIER_NO_GROUPING,
        StrategyName.HIER_FIXED_FREQUENCY,
        StrategyName.HIER_FIXED_DEPTH,
    }
)


class AggregationName(StrEnum):
    """``aggregation:`` of a run: how updates of one block are merged."""

    AUTO = "auto"  # the strategy's own rule (see default_aggregation)
    RANK_WISE = "rank_wise"  # per block over the devices that trained it, rank-index-wise
    HETLORA = "hetlora"  # zero-padded, norm-weighted (HetLoRA)
    SVD = "svd"  # FlexLoRA-style product-space merge


def default_aggregation(strategy: StrategyName) -> AggregationName:
    """The rule ``aggregation: auto`` means for ``strategy``."""
    return AggregationName.HETLORA if strategy is StrategyName.HETLORA else AggregationName.RANK_WISE
