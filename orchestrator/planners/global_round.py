"""The plan of one global round of the hierarchical strategies (pure).

Near-IID groups (orchestrator/planners/grouping.py), then a depth and an intra-group aggregation
frequency per group (orchestrator/planners/hierfedlora.py):

* ``hierfedlora``: HierFedLoRA-style, groups and the joint depth/frequency plan.
* ``hier_no_grouping``: one group of every device (the planner still picks depth and frequency).
* ``hier_fixed_frequency``: groups, every group ``hier.fixed_frequency`` intra-group rounds.
* ``hier_fixed_depth``: groups, every group at depth ``hier.fixed_depth``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from orchestrator.planners.context import PlanningContext
from orchestrator.planners.grouping import GroupingDevice, auto_group_devices, divergence, group_devices
from orchestrator.planners.hierfedlora import GroupInput, HierOptions, plan_hierarchy
from orchestrator.planners.specs import DevicePlan, lora_spec
from schemas.strategies import StrategyName

log = logging.getLogger(__name__)

#: Runs already warned that devices shared no label histogram (one warning per run and process).
_warned_no_histograms: set[str] = set()


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
    group's label divergence from the fleet's.

    A device without a histogram (``privacy.label_histogram: off``) counts as one of a single class,
    so grouping falls back to speed alone for it; that is logged once per run.
    """
    missing = sorted(d.device_id for d in ctx.devices if not histograms.get(d.device_id))
    grouped = ctx.config.strategy is not StrategyName.HIER_NO_GROUPING
    if missing and grouped and ctx.config.run_id not in _warned_no_histograms:
        _warned_no_histograms.add(ctx.config.run_id)
        log.warning(
            "orchestrator: %d of %d devices shared no label histogram (privacy.label_histogram is %s): "
            "groups are formed by speed alone for them, not near-IID by labels",
            len(missing),
            len(ctx.devices),
            ctx.config.privacy.label_histogram,
        )
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
    if ctx.config.strategy is StrategyName.HIER_NO_GROUPING:
        members = sorted(d.device_id for d in devices)
        total = [sum(col) for col in zip(*(d.histogram for d in devices), strict=True)]
        return [members], [divergence(total, total)]
    h = ctx.config.hier
    if h.auto_groups:
        grouping = auto_group_devices(
            devices,
            h.max_groups,
            threshold=h.warn_divergence,
            min_group_size=h.min_group_size,
            speed_weight=h.speed_weight,
        )
    else:
        grouping = group_devices(devices, h.most_groups, speed_weight=h.speed_weight)
    return grouping.groups, grouping.divergence


def hier_options(ctx: PlanningContext) -> HierOptions:
    cfg = ctx.config
    h = cfg.hier
    fixed_depth = cfg.strategy is StrategyName.HIER_FIXED_DEPTH
    fixed_frequency = cfg.strategy is StrategyName.HIER_FIXED_FREQUENCY
    return HierOptions(
        depths=None if h.depths is None else tuple(d for d in h.depths if d <= ctx.num_blocks),
        rank=cfg.lora.rank,
        decay=cfg.legend.decay,
        min_frequency=h.min_frequency,
        max_frequency=h.max_frequency,
        skew_frequency=h.skew_frequency,
        fixed_depth=min(h.fixed_depth, ctx.num_blocks) if fixed_depth else None,
        fixed_frequency=h.fixed_frequency if fixed_frequency else None,
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
    out = []
    for gp, gi in zip(plan.groups, inputs, strict=True):
        lora = ctx.config.lora
        plans = [DevicePlan(d.device_id, lora_spec(lora, gp.layer_ranks[d.device_id])) for d in gi.devices]
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
