"""The joint depth/frequency planner: decisions on hand-made groups, and optimality by brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lorafleet.devices.costmodel import CostModel
from orchestrator.capacity import DeviceEstimate
from orchestrator.hierarchical_service import refit_frequency
from orchestrator.planners.context import PlanningContext
from orchestrator.planners.global_round import hier_options
from orchestrator.planners.hierfedlora import (
    GroupInput,
    HierOptions,
    depth_candidates,
    min_frequencies,
    plan_hierarchy,
)
from orchestrator.planners.legend import DeviceInput, LegendOptions, SizeModel, time_matrix
from schemas.config import parse_run_config

COST = CostModel("test", 6, embed_s=0.0, prefix_block_s=0.0, train_block_s=1e-4, head_s=2e-5, step_s=5e-3)
SIZES = SizeModel({b: 6144 for b in range(6)}, 4096)
FAST_LINK = 1e9


def dev(name: str, slowdown: float, samples: int = 64, up_bps: float = FAST_LINK) -> DeviceInput:
    return DeviceInput(name, samples, DeviceEstimate(slowdown, up_bps * 2, up_bps, 30.0))


def group(g: int, *devices: DeviceInput, divergence: float = 0.0) -> GroupInput:
    return GroupInput(g, list(devices), divergence)


def plan(groups: list[GroupInput], **options: object):  # type: ignore[no-untyped-def]
    return plan_hierarchy(groups, num_blocks=6, cost=COST, sizes=SIZES, options=HierOptions(**options))  # type: ignore[arg-type]


def round_times(g: GroupInput, options: HierOptions) -> np.ndarray:
    _, cands = depth_candidates(6, options, SIZES)
    legend = LegendOptions(
        cached=options.cached, local_epochs=options.local_epochs, batch_size=options.batch_size
    )
    return time_matrix(g.devices, cands, COST, legend).max(axis=0)


def test_unmeasured_groups_get_the_profiling_round() -> None:
    groups = [group(0, DeviceInput("a", 10, None)), group(1, DeviceInput("b", 10, None), dev("c", 1.0))]
    p = plan(groups)
    assert p.period_s == 0.0
    assert [(g.depth, g.frequency) for g in p.groups] == [(1, 1), (1, 1)]
    assert p.groups[1].layer_ranks == {"b": {5: 8}, "c": {5: 8}}


def test_a_fast_group_aggregates_more_often_than_a_slow_one_within_the_period() -> None:
    fast = group(0, dev("f1", 1.0), dev("f2", 1.2))
    slow = group(1, dev("s1", 8.0), dev("s2", 10.0))
    options = HierOptions(max_frequency=6)
    p = plan([fast, slow], max_frequency=6)
    by = {g.group: g for g in p.groups}
    assert by[0].frequency > by[1].frequency
    for g, gi in ((by[0], fast), (by[1], slow)):
        depths, _ = depth_candidates(6, options, SIZES)
        t = round_times(gi, options)[depths.index(g.depth)]
        assert g.round_s == pytest.approx(t)
        assert g.frequency * t <= p.period_s * (1 + 1e-9)  # its rounds fit in the period


@pytest.mark.parametrize("case", range(6))
def test_the_plan_minimises_time_per_unit_of_progress_over_every_combination(case: int) -> None:
    rng = np.random.default_rng(case)
    groups = [
        group(
            g, *(dev(f"g{g}d{i}", float(rng.uniform(0.5, 12)), int(rng.integers(16, 128))) for i in range(2))
        )
        for g in range(3)
    ]
    options = HierOptions(max_frequency=3, depths=(1, 2, 4, 6), skew_frequency=False)
    p = plan(groups, max_frequency=3, depths=(1, 2, 4, 6), skew_frequency=False)
    depths, cands = depth_candidates(6, options, SIZES)
    times = [round_times(g, options) for g in groups]
    value = [[sum(d.samples for d in g.devices) * c.utility for c in cands] for g in groups]
    best = math.inf
    for combo in itertools.product(itertools.product(range(len(depths)), range(1, 4)), repeat=len(groups)):
        period = max(k * times[i][j] for i, (j, k) in enumerate(combo))
        best = min(best, period / sum(k * value[i][j] for i, (j, k) in enumerate(combo)))
    chosen = sum(g.frequency * value[i][depths.index(g.depth)] for i, g in enumerate(p.groups))
    assert p.period_s / chosen == pytest.approx(best, rel=1e-9)
    assert max(g.frequency * g.round_s for g in p.groups) <= p.period_s * (1 + 1e-9)


def test_more_skewed_groups_need_at_least_one_more_aggregation() -> None:
    groups = [group(0, dev("a", 1.0), divergence=0.05), group(1, dev("b", 1.0), divergence=0.5)]
    assert min_frequencies(groups, HierOptions(min_frequency=1, max_frequency=4)).tolist() == [1, 2]
    p = plan(groups, min_frequency=1, max_frequency=4)
    assert p.groups[1].frequency >= 2


def test_ablations_fix_the_depth_or_the_frequency() -> None:
    groups = [group(0, dev("a", 1.0)), group(1, dev("b", 7.0))]
    assert {g.depth for g in plan(groups, fixed_depth=4).groups} == {4}
    fixed = plan(groups, fixed_frequency=2)
    assert {g.frequency for g in fixed.groups} == {2}
    assert all(2 * g.round_s <= fixed.period_s * (1 + 1e-9) for g in fixed.groups)


def test_within_group_legend_lets_fast_members_go_deeper() -> None:
    # A mixed group: the slow member sets the group's depth; the fast one has time to spare
    mixed = group(0, dev("fast", 1.0), dev("slow", 12.0))
    uniform = plan([mixed], max_frequency=2, within_group="uniform")
    legend = plan([mixed], max_frequency=2, within_group="legend")
    g_u, g_l = uniform.groups[0], legend.groups[0]
    assert (g_u.depth, g_u.frequency) == (g_l.depth, g_l.frequency)
    assert len(g_u.layer_ranks["fast"]) == len(g_u.layer_ranks["slow"]) == g_u.depth
    assert len(g_l.layer_ranks["slow"]) == g_l.depth < len(g_l.layer_ranks["fast"])
    # each device's deeper configuration still fits its share of the period
    options = HierOptions(max_frequency=2)
    _, cands = depth_candidates(6, options, SIZES)
    times = time_matrix(mixed.devices, cands, COST, LegendOptions())
    deepest = len(g_l.layer_ranks["fast"])
    assert times[0, deepest - 1] <= legend.period_s / g_l.frequency * (1 + 1e-9)


@pytest.mark.parametrize("within_group", [None, "uniform", "legend"])
def test_the_configuration_chooses_the_depths_within_a_group(within_group: str | None) -> None:
    # Given the hier options a run gets from a configuration (None: within_group not set)
    hier = {} if within_group is None else {"within_group": within_group}
    config = parse_run_config(
        {"strategy": "hierfedlora", "devices": {"count": 2}, "lora": {"rank": 8}, "hier": hier}
    )
    ctx = PlanningContext(round_no=2, devices=[], num_blocks=6, config=config, cost=COST, sizes=SIZES)
    options = hier_options(ctx)
    # When a mixed group is planned with them
    mixed = group(0, dev("fast", 1.0), dev("slow", 12.0))
    g = plan_hierarchy([mixed], num_blocks=6, cost=COST, sizes=SIZES, options=options).groups[0]
    # Then the slow member trains the group's depth, and the fast one goes deeper only with legend
    # (uniform, the default, measured as accurate and cheaper: benchmarks/results/hierfedlora.md)
    assert len(g.layer_ranks["slow"]) == g.depth
    if within_group == "legend":
        assert len(g.layer_ranks["fast"]) > g.depth
    else:
        assert len(g.layer_ranks["fast"]) == g.depth


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one device"):
        plan([group(0)])
    with pytest.raises(ValueError, match="min_frequency"):
        plan([group(0, dev("a", 1.0))], min_frequency=3, max_frequency=2)
    with pytest.raises(ValueError, match="depth 9"):
        plan([group(0, dev("a", 1.0))], depths=(9,))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"period_s": 10.0, "elapsed_s": 2.0, "round_s": 2.0, "done": 1, "opened": 1, "max_frequency": 9}, 5),
        ({"period_s": 10.0, "elapsed_s": 8.0, "round_s": 8.0, "done": 1, "opened": 1, "max_frequency": 9}, 1),
        ({"period_s": 10.0, "elapsed_s": 8.0, "round_s": 8.0, "done": 1, "opened": 2, "max_frequency": 9}, 2),
        (
            {"period_s": 100.0, "elapsed_s": 1.0, "round_s": 1.0, "done": 1, "opened": 1, "max_frequency": 4},
            4,
        ),
        ({"period_s": 10.0, "elapsed_s": 0.0, "round_s": 0.0, "done": 0, "opened": 0, "max_frequency": 4}, 1),
    ],
)
def test_refit_frequency(kwargs: dict[str, float], expected: int) -> None:
    assert refit_frequency(**kwargs) == expected  # type: ignore[arg-type]
