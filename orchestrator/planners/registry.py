"""Every planning strategy by name (schemas/strategies.py): one planner each, no fallback.

Flat strategies plan a round: ``PlanningContext -> RoundPlan``. Hierarchical strategies plan a
global round over groups (orchestrator/planners/global_round.py); the strategy name selects the
grouping and the ablation inside that one planner.
"""

from __future__ import annotations

from orchestrator.planners.baselines import strategy_fedlora, strategy_fedra, strategy_hetlora
from orchestrator.planners.context import Strategy
from orchestrator.planners.legend_strategies import (
    strategy_legend,
    strategy_legend_fixed_depth,
    strategy_legend_uniform_rank,
)
from schemas.strategies import HIERARCHICAL_STRATEGIES, StrategyName

STRATEGIES: dict[StrategyName, Strategy] = {
    StrategyName.FEDLORA: strategy_fedlora,
    StrategyName.LEGEND: strategy_legend,
    StrategyName.LEGEND_UNIFORM_RANK: strategy_legend_uniform_rank,
    StrategyName.LEGEND_FIXED_DEPTH: strategy_legend_fixed_depth,
    StrategyName.HETLORA: strategy_hetlora,
    StrategyName.FEDRA: strategy_fedra,
}


def round_planner(name: StrategyName) -> Strategy:
    """The planner of a flat strategy.

    Raises:
        ValueError: ``name`` is hierarchical (it plans global rounds, not rounds).
    """
    if name in HIERARCHICAL_STRATEGIES:
        raise ValueError(f"strategy {name} plans global rounds (orchestrator/planners/global_round.py)")
    return STRATEGIES[name]
