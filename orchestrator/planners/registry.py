"""Every planning strategy behind one signature: ``PlanningContext -> [DevicePlan]`` (pure).

* ``fedlora``: FedIT, every device LoRA on all configured blocks at one rank.
* ``legend``: LEGEND-style per-device depth and rising rank distribution (orchestrator/planners/legend.py).
* ``legend_uniform_rank``: the same without the rank distribution (ablation).
* ``legend_fixed_depth``: the same at one fixed depth for every device (ablation).
* ``hetlora``: all blocks; per-device rank by capacity (fastest third the highest rank), merged
  with zero-padding and norm weights (aggregator/merge/hetlora.py).
* ``fedra``: each round a random subset of blocks per device, as many as LEGEND would give it
  (same budget, random placement instead of top-aligned), one rank.

Hierarchical strategies plan a *global round* instead (:func:`plan_global_round`): near-IID groups
(orchestrator/planners/grouping.py), then a depth and an intra-group aggregation frequency per group
(orchestrator/planners/hierfedlora.py):

* ``hierfedlora``: HierFedLoRA-style, groups and the joint depth/frequency plan.
* ``hier_no_grouping``: one group of every device (the planner still picks depth and frequency).
* ``hier_fixed_frequency``: groups, every group ``hier.fixed_frequency`` intra-group rounds.
* ``hier_fixed_depth``: groups, every group at depth ``hier.fixed_depth``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from lorafleet.devices.costmodel import CostModel
from lorafleet.ml.lora import Tensors, parse_key
from orchestrator.planners.base import DevicePlan, plan_fedlora
from orchestrator.planners.grouping import GroupingDevice, divergence, group_devices
from orchestrator.planners.hierfedlora import GroupInput, HierOptions, plan_hierarchy
from orchestrator.planners.legend import DeviceInput, LegendOptions, SizeModel, plan_legend
from schemas.config import RunConfig
from schemas.messages import LoraSpec

#: safetensors header and envelope overhead per task message, roughly (bytes)
MESSAGE_OVERHEAD_BYTES = 2048


@dataclass(frozen=True)
class PlanningContext:
    round_no: int
    devices: list[DeviceInput]
    num_blocks: int
    config: RunConfig
    cost: CostModel
    sizes: SizeModel


@dataclass(frozen=True)
class RoundPlan:
    plans: list[DevicePlan]
    deadline_s: float = 0.0  # the planner's predicted round time (0: no prediction)


Strategy = Callable[[PlanningContext], RoundPlan]


def size_model(global_tensors: Tensors) -> SizeModel:
    """Bytes per unit of rank per block, and the fixed bytes (head, overhead), of a global adapter."""
    per_rank: dict[int, int] = {}
    fixed = MESSAGE_OVERHEAD_BYTES
    for key, t in global_tensors.items():
        info = parse_key(key)
        if info.block is None or info.rank_axis is None:
            fixed += t.numel() * t.element_size()
            continue
        other = t.shape[1 - info.rank_axis]
        per_rank[info.block] = per_rank.get(info.block, 0) + int(other) * t.element_size()
    return SizeModel(per_rank, fixed)


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
    lora = ctx.config.lora
    plan = plan_legend(
        ctx.devices,
        num_blocks=ctx.num_blocks,
        cost=ctx.cost,
        sizes=ctx.sizes,
        options=options,
        target_modules=list(lora.target_modules),
        alpha_ratio=lora.alpha_ratio,
        dropout=lora.dropout,
    )
    return RoundPlan(plan.plans, plan.deadline_s)


def strategy_fedlora(ctx: PlanningContext) -> RoundPlan:
    return RoundPlan(plan_fedlora([d.device_id for d in ctx.devices], ctx.config, ctx.num_blocks))


def strategy_legend(ctx: PlanningContext) -> RoundPlan:
    return _legend(ctx, legend_options(ctx))


def strategy_legend_uniform_rank(ctx: PlanningContext) -> RoundPlan:
    return _legend(ctx, legend_options(ctx, rank_profile="uniform"))


def strategy_legend_fixed_depth(ctx: PlanningContext) -> RoundPlan:
    depth = min(ctx.config.legend.fixed_depth, ctx.num_blocks)
    return _legend(ctx, legend_options(ctx, fixed_depth=depth))


def strategy_hetlora(ctx: PlanningContext) -> RoundPlan:
    """All blocks; rank by capacity: measured devices split in thirds by slowdown, fastest highest."""
    lora = ctx.config.lora
    ranks = sorted(ctx.config.legend.top_ranks, reverse=True)
    measured = sorted((d for d in ctx.devices if d.estimate is not None), key=lambda d: d.estimate.slowdown)  # type: ignore[union-attr]
    rank_of = {
        d.device_id: ranks[min(len(ranks) - 1, i * len(ranks) // max(1, len(measured)))]
        for i, d in enumerate(measured)
    }
    plans = [
        DevicePlan(
            d.device_id,
            LoraSpec(
                target_modules=list(lora.target_modules),
                layer_ranks=dict.fromkeys(range(ctx.num_blocks), rank_of.get(d.device_id, ranks[-1])),
                alpha_ratio=lora.alpha_ratio,
                dropout=lora.dropout,
            ),
        )
        for d in ctx.devices
    ]
    return RoundPlan(plans)


def strategy_fedra(ctx: PlanningContext) -> RoundPlan:
    """Random blocks, LEGEND's per-device budget of blocks, one rank (``lora.rank``)."""
    budget = strategy_legend_uniform_rank(ctx)
    lora = ctx.config.lora
    plans = []
    for plan in budget.plans:
        digest = hashlib.sha256(f"{ctx.config.seed}:{ctx.round_no}:{plan.device_id}".encode()).digest()
        blocks = random.Random(int.from_bytes(digest[:8], "big")).sample(
            range(ctx.num_blocks), len(plan.lora.layer_ranks)
        )
        plans.append(
            DevicePlan(
                plan.device_id,
                LoraSpec(
                    target_modules=list(lora.target_modules),
                    layer_ranks=dict.fromkeys(sorted(blocks), lora.rank),
                    alpha_ratio=lora.alpha_ratio,
                    dropout=lora.dropout,
                ),
            )
        )
    return RoundPlan(plans)


STRATEGIES: dict[str, Strategy] = {
    "fedlora": strategy_fedlora,
    "legend": strategy_legend,
    "legend_uniform_rank": strategy_legend_uniform_rank,
    "legend_fixed_depth": strategy_legend_fixed_depth,
    "hetlora": strategy_hetlora,
    "fedra": strategy_fedra,
}


# -- hierarchical strategies --------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupRound:
    """One group's share of a global round."""

    group: int
    devices: list[str]
    depth: int
    frequency: int  # intra-group rounds this global round
    round_s: float  # predicted time of one intra-group round (0: not measured)
    divergence: float  # KL of the group's label distribution from the fleet's
    plans: list[DevicePlan]


@dataclass(frozen=True)
class GlobalRoundPlan:
    groups: list[GroupRound]
    period_s: float  # predicted global round time (0: profiling round)


def form_groups(
    ctx: PlanningContext, histograms: dict[str, list[int]]
) -> tuple[list[list[str]], list[float]]:
    """The groups of ``ctx.devices`` for the strategy (one group for ``hier_no_grouping``), and each
    group's label divergence from the fleet's."""
    devices = [
        GroupingDevice(
            d.device_id,
            tuple(histograms.get(d.device_id) or [1]),
            None if d.estimate is None else d.estimate.slowdown,
        )
        for d in ctx.devices
    ]
    width = max(len(g.histogram) for g in devices)
    devices = [
        GroupingDevice(g.device_id, g.histogram + (0,) * (width - len(g.histogram)), g.slowdown)
        for g in devices
    ]
    if ctx.config.strategy == "hier_no_grouping":
        members = sorted(d.device_id for d in devices)
        total = [sum(col) for col in zip(*(d.histogram for d in devices), strict=True)]
        return [members], [divergence(total, total)]
    grouping = group_devices(devices, ctx.config.hier.groups, speed_weight=ctx.config.hier.speed_weight)
    return grouping.groups, grouping.divergence


def hier_options(ctx: PlanningContext) -> HierOptions:
    cfg = ctx.config
    h = cfg.hier
    return HierOptions(
        depths=None if h.depths is None else tuple(d for d in h.depths if d <= ctx.num_blocks),
        rank=cfg.lora.rank,
        decay=cfg.legend.decay,
        min_frequency=h.min_frequency,
        max_frequency=h.max_frequency,
        skew_frequency=h.skew_frequency,
        fixed_depth=min(h.fixed_depth, ctx.num_blocks) if cfg.strategy == "hier_fixed_depth" else None,
        fixed_frequency=h.fixed_frequency if cfg.strategy == "hier_fixed_frequency" else None,
        within_group=h.within_group,
        cached=cfg.activation_cache,
        local_epochs=cfg.training.local_epochs,
        batch_size=cfg.training.batch_size,
    )


def plan_global_round(
    ctx: PlanningContext, groups: list[list[str]], divergences: list[float]
) -> GlobalRoundPlan:
    """Depth, frequency and every device's LoRA for each group of a global round."""
    by_id = {d.device_id: d for d in ctx.devices}
    inputs = [
        GroupInput(g, [by_id[m] for m in members], div)
        for g, (members, div) in enumerate(zip(groups, divergences, strict=True))
        if members
    ]
    plan = plan_hierarchy(
        inputs, num_blocks=ctx.num_blocks, cost=ctx.cost, sizes=ctx.sizes, options=hier_options(ctx)
    )
    lora = ctx.config.lora
    out = []
    for gp, gi in zip(plan.groups, inputs, strict=True):
        plans = [
            DevicePlan(
                d.device_id,
                LoraSpec(
                    target_modules=list(lora.target_modules),
                    layer_ranks=gp.layer_ranks[d.device_id],
                    alpha_ratio=lora.alpha_ratio,
                    dropout=lora.dropout,
                ),
            )
            for d in gi.devices
        ]
        out.append(
            GroupRound(
                gp.group,
                [d.device_id for d in gi.devices],
                gp.depth,
                gp.frequency,
                gp.round_s,
                gi.divergence,
                plans,
            )
        )
    return GlobalRoundPlan(out, plan.period_s)
