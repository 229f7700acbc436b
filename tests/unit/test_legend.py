"""LEGEND-style planning, capacity estimation, cost model and device emulation (pure)."""

from __future__ import annotations

import math
import random

import pytest

from lorafleet.devices.costmodel import CostModel, cost_model_for
from lorafleet.devices.emulator import DeviceEmulator, jitter_factor, transfer_seconds
from orchestrator.capacity import DeviceEstimate, measure, update_estimate
from orchestrator.planners.legend import (
    DeviceInput,
    LegendOptions,
    SizeModel,
    candidates,
    plan_legend,
    rank_template,
    task_seconds,
    utility,
)
from schemas.measurement import DeviceMeasurement
from schemas.messages import DeviceProfile

COST = CostModel("test", 6, embed_s=1e-6, prefix_block_s=2e-6, train_block_s=6e-6, head_s=1e-6, step_s=0.0)
SIZES = SizeModel({b: 6144 for b in range(6)}, 1000)
FAST = DeviceEstimate(slowdown=1.0, down_bps=1e9, up_bps=1e9, tokens_per_sample=20.0)


def _device(name: str, slowdown: float, samples: int = 100, up_bps: float = 1e9) -> DeviceInput:
    return DeviceInput(name, samples, DeviceEstimate(slowdown, up_bps * 2, up_bps, 20.0))


def _plan(devices: list[DeviceInput], **options: object):  # type: ignore[no-untyped-def]
    return plan_legend(
        devices,
        num_blocks=6,
        cost=COST,
        sizes=SIZES,
        options=LegendOptions(**options),  # type: ignore[arg-type]
    )


# ---- rank templates and utility -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("depth", "top", "profile", "expected"),
    [
        (1, 8, "rising", {5: 8}),
        (3, 8, "rising", {3: 4, 4: 8, 5: 8}),
        (6, 16, "rising", {0: 4, 1: 4, 2: 8, 3: 8, 4: 16, 5: 16}),
        (6, 4, "rising", {0: 2, 1: 2, 2: 2, 3: 2, 4: 4, 5: 4}),
        (4, 8, "uniform", {2: 8, 3: 8, 4: 8, 5: 8}),
    ],
)
def test_rank_template_rises_toward_the_output(
    depth: int, top: int, profile: str, expected: dict[int, int]
) -> None:
    ranks = rank_template(depth, top, 6, LegendOptions(rank_profile=profile))
    assert ranks == expected
    ordered = [ranks[b] for b in sorted(ranks)]
    assert ordered == sorted(ordered)  # non-decreasing toward the output


def test_utility_weighs_blocks_near_the_output_more() -> None:
    near, far = {5: 8}, {0: 8}
    assert utility(near, 6, 0.7) == pytest.approx(math.log1p(8))
    assert utility(far, 6, 0.7) == pytest.approx(0.7**5 * math.log1p(8))
    assert utility({4: 8, 5: 8}, 6, 0.7) > utility({5: 8}, 6, 0.7)


# ---- planner decisions on hand-made device sets -----------------------------------------------------
def test_equal_devices_get_equal_plans() -> None:
    plan = _plan([_device(f"d{i}", 1.0) for i in range(4)])
    assert len({tuple(sorted(p.lora.layer_ranks.items())) for p in plan.plans}) == 1


def test_slow_devices_get_shallower_lora_than_fast_ones() -> None:
    # Given a fast, a 2.5x slower and a 6x slower device with the same data
    plan = _plan([_device("fast", 1.0), _device("mid", 2.5), _device("slow", 6.0)])
    depth = {p.device_id: len(p.lora.layer_ranks) for p in plan.plans}
    # Then depth falls with speed, every plan ends at the output block, and nobody exceeds T*
    assert depth["fast"] >= depth["mid"] >= depth["slow"] >= 1
    assert depth["fast"] > depth["slow"]
    assert all(max(p.lora.layer_ranks) == 5 for p in plan.plans)
    assert all(t <= plan.deadline_s * (1 + 1e-9) for t in plan.predicted_s.values())


def test_the_deadline_is_the_best_time_per_unit_of_progress() -> None:
    # Given a random device set, the planner's score must be minimal over every candidate deadline
    rng = random.Random(3)
    devices = [
        _device(f"d{i}", rng.uniform(1, 8), rng.randint(20, 200), rng.uniform(1e5, 1e7)) for i in range(12)
    ]
    options = LegendOptions()
    plan = _plan(devices)
    cands = candidates(6, options, SIZES)
    times = [[task_seconds(d.estimate, d.samples, c, COST, options) for c in cands] for d in devices]  # type: ignore[arg-type]

    def score(deadline: float) -> float:
        total = 0.0
        for d, row in zip(devices, times, strict=True):
            feasible = [c.utility for c, t in zip(cands, row, strict=True) if t <= deadline * (1 + 1e-9)]
            if not feasible:
                return math.inf
            total += d.samples * max(feasible)
        return deadline / total

    brute = min(score(t) for row in times for t in row)
    assert score(plan.deadline_s) == pytest.approx(brute, rel=1e-9)


def test_a_slow_uplink_alone_makes_the_plan_lighter() -> None:
    plan = _plan([_device("wired", 1.0), _device("radio", 1.0, up_bps=2e4)])
    size = {p.device_id: SIZES.payload_bytes(p.lora.layer_ranks) for p in plan.plans}
    assert size["radio"] < size["wired"]


def test_unmeasured_devices_get_the_profiling_configuration() -> None:
    plan = _plan([DeviceInput("new", 100, None), _device("fast", 1.0), _device("slow", 6.0)])
    by_id = {p.device_id: p.lora.layer_ranks for p in plan.plans}
    assert by_id["new"] == {5: 4}  # one block, the smallest top rank
    assert "new" not in plan.predicted_s  # it does not set the deadline
    assert len(by_id["fast"]) > 1


def test_fixed_depth_and_uniform_rank_ablations() -> None:
    fixed = _plan([_device("a", 1.0), _device("b", 6.0)], fixed_depth=3)
    assert all(sorted(p.lora.layer_ranks) == [3, 4, 5] for p in fixed.plans)
    uniform = _plan([_device("a", 1.0), _device("b", 6.0)], rank_profile="uniform")
    assert all(len(set(p.lora.layer_ranks.values())) == 1 for p in uniform.plans)


def test_planner_rejects_no_devices_and_bad_depths() -> None:
    with pytest.raises(ValueError, match="no devices"):
        _plan([])
    with pytest.raises(ValueError, match="depth 7"):
        _plan([_device("a", 1.0)], depths=(1, 7))


# ---- cost model, emulator, estimator --------------------------------------------------------------
def test_cost_model_counts_prefix_only_without_the_cache() -> None:
    plain = COST.task_seconds(tokens=1000, lowest_block=4, steps=1, cached=False)
    cached = COST.task_seconds(tokens=1000, lowest_block=4, steps=1, cached=True)
    assert plain == pytest.approx(1000 * (2 * 6e-6 + 1e-6) + 1000 * (1e-6 + 4 * 2e-6))
    assert cached == pytest.approx(1000 * (2 * 6e-6 + 1e-6))
    with pytest.raises(ValueError, match="lowest_block"):
        COST.task_seconds(tokens=1, lowest_block=6, steps=1, cached=True)


def test_packaged_minilm_cost_model_orders_depths() -> None:
    cost = cost_model_for("minilm", 6, 384)
    times = [cost.task_seconds(tokens=1024, lowest_block=6 - d, steps=1, cached=True) for d in range(1, 7)]
    assert times == sorted(times) and times[-1] > 3 * times[0]
    tiny = cost_model_for("tiny", 2, 32)
    assert tiny.num_blocks == 2 and tiny.train_block_s < cost.train_block_s


def test_emulator_scales_by_speed_and_bandwidth_deterministically() -> None:
    profile = DeviceProfile(speed=0.25, uplink_mbps=2.0, downlink_mbps=8.0, jitter=0.0)
    emulator = DeviceEmulator("d", profile, COST)
    t = emulator.times(
        round_no=1,
        lowest_block=5,
        tokens=1000,
        embed_tokens=0,
        prefix_block_tokens=0,
        steps=1,
        bytes_down=1_000_000,
        bytes_up=250_000,
    )
    assert t.compute_s == pytest.approx(4 * 1000 * (6e-6 + 1e-6))
    assert t.downlink_s == pytest.approx(1.0) and t.uplink_s == pytest.approx(1.0)
    assert transfer_seconds(125_000, 1.0) == pytest.approx(1.0)


def test_jitter_is_deterministic_with_mean_one() -> None:
    assert jitter_factor(0, "d", 1, 0.0) == 1.0
    assert jitter_factor(0, "d", 1, 0.2) == jitter_factor(0, "d", 1, 0.2)
    factors = [jitter_factor(0, f"d{i}", r, 0.2) for i in range(50) for r in range(20)]
    assert sum(factors) / len(factors) == pytest.approx(1.0, abs=0.03)
    assert len(set(factors)) > 900


def test_estimator_recovers_slowdown_and_bandwidth_and_smooths() -> None:
    # Given a device 3x slower than the host with a 1 MB/s uplink
    host = COST.train_seconds(tokens=2000, lowest_block=4, steps=5, embed_tokens=0, prefix_block_tokens=0)
    m = DeviceMeasurement(
        device_compute_s=3 * host,
        tokens=2000,
        embed_tokens=0,
        prefix_block_tokens=0,
        steps=5,
        examples=100,
        lowest_block=4,
        bytes_down=2_000_000,
        downlink_s=1.0,
        bytes_up=1_000_000,
        uplink_s=1.0,
        device_time_s=2.0 + 3 * host,
    )
    first = measure(m, COST)
    assert first is not None
    assert first.slowdown == pytest.approx(3.0)
    assert first.up_bps == pytest.approx(1e6) and first.down_bps == pytest.approx(2e6)
    assert first.tokens_per_sample == pytest.approx(20.0)
    # When it then measures 6x, the EMA moves 30% of the way
    slower = m.model_copy(update={"device_compute_s": 6 * host})
    second = update_estimate(first, slower, COST, rho=0.7)
    assert second is not None and second.slowdown == pytest.approx(0.7 * 3 + 0.3 * 6)
    assert second.rounds_seen == 2
    # And a measurement without work changes nothing
    empty = m.model_copy(update={"examples": 0})
    assert update_estimate(first, empty, COST) == first
