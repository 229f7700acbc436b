"""HierFedLoRA-style joint planning (pure): per group, a fine-tuning depth and an aggregation frequency.

Our design after Liu et al., HierFedLoRA (arXiv 2503.21213; the paper's optimisation is not public,
this one is ours). A *global round* lasts a period ``T``; within it group ``g`` runs ``K_g`` intra-
group rounds (train, then aggregate within the group) at depth ``d_g`` (LoRA on the ``d_g`` blocks
nearest the output, one rank), groups independently of each other, and then the groups' adapters are
merged into the global one. A deeper group is slower per intra-group round, so fewer of them fit in
the period: depth and frequency are chosen together.

* ``T_g(d)``: predicted time of one intra-group round of ``g`` at depth ``d`` (its slowest member's
  task time, from the capacity estimates and the cost model, as the LEGEND-style planner predicts).
* progress of group ``g`` in a period: ``K_g * n_g * phi(d_g)``, with ``phi`` the LEGEND-style
  utility of the depth (blocks nearer the output worth more, diminishing returns in rank).
* ``K_g`` is at least ``K_min(g)``: ``min_frequency``, plus one for groups more label-skewed than
  the average (a skewed group drifts, so it aggregates more often), at most ``max_frequency``.

For every candidate period ``T`` (every ``K * T_g(d)``), each group takes the depth that maximises
its progress with ``K = min(max_frequency, floor(T / T_g(d)))``, and the plan minimises
``T / total progress`` (ties: the shorter period). All candidates are scored at once (numpy).
Groups with an unmeasured member get the profiling configuration (the shallowest depth, once).

Within a group every device trains the group's depth (``within_group="uniform"``, the default), or
(``"legend"``) each device takes the deepest configuration that still fits its share of the period
(``T / K_g``), never shallower than the group's: the LEGEND-style combination.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lorafleet.devices.costmodel import CostModel
from orchestrator.planners.legend import (
    Candidate,
    DeviceInput,
    LegendOptions,
    SizeModel,
    time_matrix,
    utility,
)
from orchestrator.planners.specs import top_ranks


@dataclass(frozen=True)
class HierOptions:
    depths: tuple[int, ...] | None = None  # None: 1 .. number of blocks
    rank: int = 8
    decay: float = 0.7
    min_frequency: int = 1
    max_frequency: int = 4
    skew_frequency: bool = True  # groups more skewed than average need one more aggregation
    fixed_depth: int | None = None  # ablation: every group at this depth
    fixed_frequency: int | None = None  # ablation: every group this many intra-group rounds
    within_group: str = "uniform"  # "uniform" | "legend" (the configuration's hier.within_group)
    cached: bool = True
    local_epochs: int = 1
    batch_size: int = 16


@dataclass(frozen=True)
class GroupInput:
    group: int
    devices: list[DeviceInput]
    divergence: float = 0.0  # KL of the group's label distribution from the fleet's


@dataclass(frozen=True)
class GroupPlan:
    group: int
    depth: int
    frequency: int
    round_s: float  # predicted time of one intra-group round (0: not measured)
    layer_ranks: dict[str, dict[int, int]] = field(default_factory=dict)  # device -> block -> rank


@dataclass(frozen=True)
class HierPlan:
    groups: list[GroupPlan]
    period_s: float  # predicted global round time (0: profiling round)


def depth_candidates(
    num_blocks: int, options: HierOptions, sizes: SizeModel
) -> tuple[list[int], list[Candidate]]:
    """The allowed depths and, for each, the uniform-rank configuration on the top blocks."""
    allowed = options.depths or range(1, num_blocks + 1)
    depths = [options.fixed_depth] if options.fixed_depth else list(allowed)
    for d in depths:
        if not 1 <= d <= num_blocks:
            raise ValueError(f"depth {d} outside 1..{num_blocks}")
    cands = []
    for d in depths:
        ranks = top_ranks(num_blocks, d, options.rank)
        cands.append(Candidate(ranks, utility(ranks, num_blocks, options.decay), sizes.payload_bytes(ranks)))
    return depths, cands


def min_frequencies(groups: Sequence[GroupInput], options: HierOptions) -> np.ndarray:
    """``K_min`` per group."""
    base = np.full(len(groups), options.min_frequency, dtype=np.int64)
    if options.skew_frequency and len(groups) > 1:
        div = np.array([g.divergence for g in groups])
        base += (div > div.mean() + 1e-12).astype(np.int64)
    return np.minimum(base, options.max_frequency)


def plan_hierarchy(
    groups: Sequence[GroupInput],
    *,
    num_blocks: int,
    cost: CostModel,
    sizes: SizeModel,
    options: HierOptions,
) -> HierPlan:
    """Depth and frequency per group (see the module docstring).

    Raises:
        ValueError: no groups, an empty group, or an impossible depth or frequency.
    """
    if not groups or any(not g.devices for g in groups):
        raise ValueError("every group needs at least one device")
    if not 1 <= options.min_frequency <= options.max_frequency:
        raise ValueError(f"need 1 <= min_frequency <= max_frequency, got {options}")
    depths, cands = depth_candidates(num_blocks, options, sizes)
    legend_opts = LegendOptions(
        cached=options.cached, local_epochs=options.local_epochs, batch_size=options.batch_size
    )
    measured = [g for g in groups if all(d.estimate is not None for d in g.devices)]
    profiling = {g.group: GroupPlan(g.group, min(depths), 1, 0.0) for g in groups if g not in measured}
    if not measured:
        return _with_ranks(HierPlan([profiling[g.group] for g in groups], 0.0), groups, num_blocks, options)
    # T[g, d]: a group's intra-round time at each depth (its slowest member); U[g, d]: its progress
    per_device = [time_matrix(g.devices, cands, cost, legend_opts) for g in measured]
    round_s = np.stack([t.max(axis=0) for t in per_device])
    samples = np.array([sum(d.samples for d in g.devices) for g in measured], dtype=np.float64)
    value = samples[:, None] * np.array([c.utility for c in cands])[None, :]
    k_min = min_frequencies(measured, options)
    period, depth_index, freq = _best_period(round_s, value, k_min, options)
    plans = {
        g.group: GroupPlan(g.group, depths[int(j)], int(k), float(round_s[row, int(j)]))
        for row, (g, j, k) in enumerate(zip(measured, depth_index, freq, strict=True))
    }
    plans.update(profiling)
    plan = HierPlan([plans[g.group] for g in groups], period)
    if options.within_group == "legend":
        return _with_legend_depths(plan, groups, per_device, measured, cands, num_blocks, options)
    return _with_ranks(plan, groups, num_blocks, options)


def _best_period(
    round_s: np.ndarray, value: np.ndarray, k_min: np.ndarray, options: HierOptions
) -> tuple[float, np.ndarray, np.ndarray]:
    """(period, depth index per group, frequency per group) minimising period / progress."""
    k_max = options.max_frequency
    fixed = options.fixed_frequency
    ks = np.arange(1, k_max + 1) if fixed is None else np.array([fixed])
    periods = np.unique((round_s[:, :, None] * ks[None, None, :]).ravel())
    periods = periods[periods > 0]
    # K[p, g, d]: intra-group rounds that fit the period; feasible where K >= K_min (or == fixed)
    fits = np.floor(periods[:, None, None] / round_s[None, :, :] * (1 + 1e-9))
    if fixed is None:
        k = np.minimum(fits, k_max)
        feasible = k >= k_min[None, :, None]
    else:
        k = np.full_like(fits, float(fixed))
        feasible = fits >= fixed
    progress = np.where(feasible, k * value[None, :, :], -np.inf)
    # best depth per (period, group): most progress, ties to the shallower depth (lower index)
    best_d = np.argmax(progress, axis=2)
    best = np.take_along_axis(progress, best_d[:, :, None], axis=2)[:, :, 0]
    ok = np.isfinite(best).all(axis=1)
    if not ok.any():
        raise ValueError("no period fits every group's minimum frequency (raise max_frequency)")
    score = np.where(ok, periods / np.where(ok, best.sum(axis=1), 1.0), np.inf)
    p = int(np.argmin(score))  # periods ascend: ties go to the shorter one
    depth_index = best_d[p]
    freq = np.take_along_axis(k[p], depth_index[:, None], axis=1)[:, 0].astype(np.int64)
    return float(periods[p]), depth_index, freq


def _with_ranks(
    plan: HierPlan, groups: Sequence[GroupInput], num_blocks: int, options: HierOptions
) -> HierPlan:
    """Every device of a group at the group's depth."""
    by_group = {g.group: g for g in groups}
    out = []
    for gp in plan.groups:
        ranks = top_ranks(num_blocks, gp.depth, options.rank)
        specs = {d.device_id: dict(ranks) for d in by_group[gp.group].devices}
        out.append(GroupPlan(gp.group, gp.depth, gp.frequency, gp.round_s, specs))
    return HierPlan(out, plan.period_s)


def _with_legend_depths(
    plan: HierPlan,
    groups: Sequence[GroupInput],
    per_device: list[np.ndarray],
    measured: list[GroupInput],
    cands: list[Candidate],
    num_blocks: int,
    options: HierOptions,
) -> HierPlan:
    """Each measured device as deep as fits ``period / K_g`` (never shallower than its group)."""
    base = _with_ranks(plan, groups, num_blocks, options)
    if options.fixed_depth:
        return base
    times = {g.group: t for g, t in zip(measured, per_device, strict=True)}
    depth_of = [len(c.layer_ranks) for c in cands]
    out = []
    for gp, g in zip(base.groups, groups, strict=True):
        if g.group not in times:
            out.append(gp)
            continue
        budget = plan.period_s / gp.frequency * (1 + 1e-9)
        specs = {}
        for row, device in enumerate(g.devices):
            fitting = [depth_of[j] for j in range(len(cands)) if times[g.group][row, j] <= budget]
            depth = max([gp.depth, *fitting])
            specs[device.device_id] = top_ranks(num_blocks, depth, options.rank)
        out.append(GroupPlan(gp.group, gp.depth, gp.frequency, gp.round_s, specs))
    return HierPlan(out, plan.period_s)
