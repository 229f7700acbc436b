"""The LEGEND-style strategies and their ablations over the pure planner (orchestrator/planners/legend.py).

* ``legend``: per-device depth and rising rank distribution.
* ``legend_uniform_rank``: the same without the rank distribution.
* ``legend_fixed_depth``: the same at one fixed depth (``legend.fixed_depth``) for every device.
"""

from __future__ import annotations

from dataclasses import replace

from orchestrator.planners.context import PlanningContext, RoundPlan
from orchestrator.planners.legend import LegendOptions, plan_legend


def legend_options(ctx: PlanningContext, **overrides: object) -> LegendOptions:
    cfg = ctx.config
    options = LegendOptions(
        top_ranks=tuple(cfg.legend.top_ranks),
        min_rank=cfg.legend.min_rank,
        halving=cfg.legend.halving,
        decay=cfg.legend.decay,
        cached=cfg.activation_cache,
        local_epochs=cfg.training.local_epochs,
        batch_size=cfg.training.batch_size,
    )
    return replace(options, **overrides)  # type: ignore[arg-type]


def _legend(ctx: PlanningContext, options: LegendOptions) -> RoundPlan:
    plan = plan_legend(
        ctx.devices,
        num_blocks=ctx.num_blocks,
        cost=ctx.cost,
        sizes=ctx.sizes,
        options=options,
        lora=ctx.config.lora,
    )
    return RoundPlan(plan.plans, plan.deadline_s)


def strategy_legend(ctx: PlanningContext) -> RoundPlan:
    return _legend(ctx, legend_options(ctx))


def strategy_legend_uniform_rank(ctx: PlanningContext) -> RoundPlan:
    return _legend(ctx, legend_options(ctx, rank_profile="uniform"))


def strategy_legend_fixed_depth(ctx: PlanningContext) -> RoundPlan:
    depth = min(ctx.config.legend.fixed_depth, ctx.num_blocks)
    return _legend(ctx, legend_options(ctx, fixed_depth=depth))
