"""What a device shares of its label histogram (lorafleet/data/privacy.py, privacy.label_histogram):
exact counts, Laplace noise (seeded per device and run, non-negative, of scale 1/epsilon), or nothing;
and the grouping's one warning when histograms are missing."""

from __future__ import annotations

import logging
import random
import statistics

import pytest

from lorafleet.data.privacy import laplace, noise_seed, shared_histogram
from schemas.config import parse_run_config
from schemas.errors import ConfigError

COUNTS = [40, 3, 0, 120, 7]


def test_exact_and_off() -> None:
    assert shared_histogram(COUNTS, "exact", epsilon=1.0, seed="s") == COUNTS
    assert shared_histogram(COUNTS, "off", epsilon=1.0, seed="s") == []


def test_noisy_is_seeded_per_device_and_run() -> None:
    a = shared_histogram(COUNTS, "noisy", epsilon=0.5, seed=noise_seed("run", 0, "dev-0000"))
    again = shared_histogram(COUNTS, "noisy", epsilon=0.5, seed=noise_seed("run", 0, "dev-0000"))
    assert a == again  # a restarted worker shares the same histogram
    others = [
        shared_histogram(COUNTS, "noisy", epsilon=0.5, seed=noise_seed(run, seed, dev))
        for run, seed, dev in [("run", 0, "dev-0001"), ("other", 0, "dev-0000"), ("run", 1, "dev-0000")]
    ]
    assert all(o != a for o in others)
    assert len(a) == len(COUNTS) and all(isinstance(c, int) for c in a)


def test_noisy_counts_are_never_negative() -> None:
    zeros = [0] * 200
    shared = shared_histogram(zeros, "noisy", epsilon=0.1, seed="zeros")
    assert min(shared) == 0  # about half the draws are negative: clamped at zero
    assert max(shared) > 0


def test_noise_scale_is_one_over_epsilon() -> None:
    # Laplace(b): mean absolute deviation b, variance 2 b^2
    for epsilon in (0.25, 1.0, 4.0):
        rng = random.Random(7)
        draws = [laplace(rng, 1.0 / epsilon) for _ in range(20_000)]
        assert statistics.fmean(abs(x) for x in draws) == pytest.approx(1.0 / epsilon, rel=0.05)
        assert statistics.fmean(draws) == pytest.approx(0.0, abs=0.05 / epsilon)
        assert statistics.pvariance(draws) == pytest.approx(2.0 / epsilon**2, rel=0.1)
    # on counts far from zero (no clamping) the shared counts deviate by about 1/epsilon
    big = [10_000] * 5_000
    shared = shared_histogram(big, "noisy", epsilon=0.5, seed="big")
    assert statistics.fmean(abs(s - 10_000) for s in shared) == pytest.approx(2.0, rel=0.1)
    assert shared_histogram(big, "noisy", epsilon=1e6, seed="big") == big  # tiny noise rounds away


def test_noisy_needs_a_positive_epsilon() -> None:
    with pytest.raises(ValueError, match="epsilon must be positive"):
        shared_histogram(COUNTS, "noisy", epsilon=0.0, seed="s")
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        parse_run_config({"privacy": {"label_histogram": "noisy", "epsilon": 0}})
    with pytest.raises(ConfigError, match="privacy.label_histogram"):
        parse_run_config({"privacy": {"label_histogram": "blurred"}})
    assert parse_run_config({}).privacy.label_histogram == "exact"


def test_grouping_warns_once_naming_the_setting(caplog: pytest.LogCaptureFixture) -> None:
    from lorafleet.devices.costmodel import CostModel
    from orchestrator.capacity import DeviceEstimate
    from orchestrator.planners.context import PlanningContext
    from orchestrator.planners.global_round import form_groups
    from orchestrator.planners.legend import DeviceInput, SizeModel

    config = parse_run_config(
        {
            "run_id": "privacy-warning",
            "strategy": "hierfedlora",
            "devices": {"count": 4},
            "hier": {"groups": 2},
            "privacy": {"label_histogram": "off"},
        }
    )
    cost = CostModel("test", 2, embed_s=0.0, prefix_block_s=0.0, train_block_s=1e-4, head_s=2e-5, step_s=5e-3)
    slowdowns = [1.0, 1.0, 10.0, 10.0]
    devices = [
        DeviceInput(d, 64, DeviceEstimate(s, 1e7, 1e7, 30.0))
        for d, s in zip(config.device_ids(), slowdowns, strict=True)
    ]
    ctx = PlanningContext(
        round_no=1, devices=devices, num_blocks=2, config=config, cost=cost, sizes=SizeModel({0: 1, 1: 1}, 1)
    )
    with caplog.at_level(logging.WARNING, logger="orchestrator.planners.global_round"):
        groups, _ = form_groups(ctx, {})
        form_groups(ctx, {d: [] for d in config.device_ids()})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "4 of 4 devices shared no label histogram (privacy.label_histogram is off)" in warnings[0]
    # speed alone: the two fast devices together, the two slow ones together
    assert sorted(sorted(g) for g in groups) == [["dev-0000", "dev-0001"], ["dev-0002", "dev-0003"]]
    caplog.clear()
    exact = config.model_copy(update={"run_id": "privacy-exact"})
    with caplog.at_level(logging.WARNING, logger="orchestrator.planners.global_round"):
        form_groups(ctx.__class__(**{**vars(ctx), "config": exact}), {d: [5, 5] for d in config.device_ids()})
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
