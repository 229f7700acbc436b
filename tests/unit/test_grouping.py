"""Near-IID grouping: decisions on hand-made device sets, and the objective against brute force."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from orchestrator.planners.grouping import (
    GroupingDevice,
    auto_group_devices,
    divergence,
    far_from_iid,
    group_devices,
    group_objective,
)
from schemas.config import HierConfig


def _dev(name: str, hist: list[int], slowdown: float | None = None) -> GroupingDevice:
    return GroupingDevice(name, tuple(hist), slowdown)


def _pooled(groups: list[list[str]], devices: list[GroupingDevice]) -> list[list[int]]:
    by_id = {d.device_id: d for d in devices}
    return [[sum(col) for col in zip(*(by_id[m].histogram for m in g), strict=True)] for g in groups]


def test_opposite_devices_are_paired_into_balanced_groups() -> None:
    # Given four single-class devices, two of each class
    devices = [_dev("a", [10, 0]), _dev("b", [10, 0]), _dev("c", [0, 10]), _dev("d", [0, 10])]
    # When grouped in two
    grouping = group_devices(devices, 2, speed_weight=0.0)
    # Then each group holds one device of each class: both match the fleet's distribution
    assert _pooled(grouping.groups, devices) == [[10, 10], [10, 10]]
    assert max(grouping.divergence) < 1e-9


def test_equal_labels_group_by_speed() -> None:
    devices = [_dev(f"d{i}", [5, 5], s) for i, s in enumerate([1.0, 6.0, 1.1, 6.5, 0.9, 5.5])]
    grouping = group_devices(devices, 2, speed_weight=1.0)
    assert sorted(map(sorted, grouping.groups)) == [["d0", "d2", "d4"], ["d1", "d3", "d5"]]


def test_speed_weight_trades_label_balance_for_similar_speeds() -> None:
    # Fast devices hold class 0, slow devices class 1
    devices = [
        _dev("f1", [10, 0], 1.0),
        _dev("f2", [10, 0], 1.0),
        _dev("s1", [0, 10], 6.0),
        _dev("s2", [0, 10], 6.0),
    ]
    by_labels = group_devices(devices, 2, speed_weight=0.0)
    by_speed = group_devices(devices, 2, speed_weight=10.0)
    assert all(set(g) in ({"f1", "s1"}, {"f1", "s2"}, {"f2", "s1"}, {"f2", "s2"}) for g in by_labels.groups)
    assert sorted(map(sorted, by_speed.groups)) == [["f1", "f2"], ["s1", "s2"]]


def test_unmeasured_devices_do_not_enter_the_speed_term() -> None:
    devices = [_dev("a", [10, 0]), _dev("b", [10, 0], 1.0), _dev("c", [0, 10], 9.0), _dev("d", [0, 10])]
    grouping = group_devices(devices, 2, speed_weight=100.0)
    # with only one measured device per group the spread is zero: labels decide alone
    assert _pooled(grouping.groups, devices) == [[10, 10], [10, 10]]


def _brute_force_best(devices: list[GroupingDevice], speed_weight: float) -> float:
    ids = [d.device_id for d in devices]
    best = float("inf")
    for first in itertools.combinations(ids, len(ids) // 2):
        if ids[0] not in first:
            continue
        second = [i for i in ids if i not in first]
        best = min(best, group_objective([list(first), second], devices, speed_weight=speed_weight))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_two_groups_reach_the_brute_force_optimum_or_close(seed: int) -> None:
    rng = random.Random(seed)
    devices = [
        _dev(f"d{i}", [rng.randint(0, 12) for _ in range(5)], rng.choice([1.0, 2.5, 6.0])) for i in range(8)
    ]
    grouping = group_devices(devices, 2, speed_weight=0.1)
    ours = group_objective(grouping.groups, devices, speed_weight=0.1)
    assert ours == pytest.approx(grouping.objective, rel=1e-6)
    best = _brute_force_best(devices, 0.1)
    assert ours <= best * 1.05 + 1e-9
    # and far better than a typical random split
    ids = [d.device_id for d in devices]
    rng.shuffle(ids)
    assert ours <= group_objective([ids[:4], ids[4:]], devices, speed_weight=0.1) + 1e-9


def test_groups_are_sized_nonempty_and_deterministic() -> None:
    rng = random.Random(0)
    devices = [_dev(f"d{i:02d}", [rng.randint(0, 9) for _ in range(4)], rng.uniform(1, 6)) for i in range(23)]
    grouping = group_devices(devices, 5)
    assert sorted(i for g in grouping.groups for i in g) == sorted(d.device_id for d in devices)
    assert all(1 <= len(g) <= 5 for g in grouping.groups)  # ceil(23 / 5)
    assert group_devices(list(reversed(devices)), 5) == grouping
    assert len(group_devices(devices[:3], 5).groups) == 3  # never more groups than devices


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="no devices"):
        group_devices([], 2)
    with pytest.raises(ValueError, match="num_groups"):
        group_devices([_dev("a", [1])], 0)
    with pytest.raises(ValueError, match="different lengths"):
        group_devices([_dev("a", [1, 2]), _dev("b", [1])], 1)


def test_divergence_is_zero_for_the_reference_and_grows_with_skew() -> None:
    assert divergence([5, 5], [1, 1]) == pytest.approx(0.0, abs=1e-9)
    assert 0 < divergence([6, 4], [1, 1]) < divergence([9, 1], [1, 1]) < divergence([10, 0], [1, 1])


def test_far_from_iid_names_the_groups_above_the_threshold_most_divergent_first() -> None:
    assert far_from_iid([0.01, 0.2, 0.05, 0.12], 0.05) == [1, 3]  # 0.05 itself is not above
    assert far_from_iid([0.3, 0.3], 0.05) == [0, 1]  # ties: the lower group first
    assert far_from_iid([0.0, 0.01], 0.05) == []


def test_auto_takes_the_most_groups_that_stay_near_iid() -> None:
    from orchestrator.planners.grouping import auto_group_devices

    # Given eight devices, four of each of two classes: split in two or four, every group can hold
    # both classes equally; in eight, each group is one skewed device
    devices = [_dev(f"a{i}", [10, 0]) for i in range(4)] + [_dev(f"b{i}", [0, 10]) for i in range(4)]
    grouping = auto_group_devices(devices, 8, threshold=0.05, min_group_size=1)
    assert len(grouping.groups) == 4 and max(grouping.divergence) <= 0.05
    # no group smaller than min_group_size: at most four groups of two
    assert len(auto_group_devices(devices, 8, threshold=0.05, min_group_size=3).groups) == 2
    # when no split keeps the labels near the fleet's, one group: the flat fleet
    skewed = [_dev("a", [30, 0]), _dev("b", [0, 1]), _dev("c", [0, 1]), _dev("d", [0, 1])]
    one = auto_group_devices(skewed, 4, threshold=0.05, min_group_size=1)
    assert one.groups == [["a", "b", "c", "d"]] and one.divergence == [pytest.approx(0.0, abs=1e-9)]


def test_hier_groups_auto_is_a_configuration() -> None:
    from schemas.config import parse_run_config

    config = parse_run_config({"strategy": "hierfedlora", "hier": {"groups": "auto", "max_groups": 5}})
    assert config.hier.groups == "auto" and config.hier.most_groups == 5
    assert parse_run_config({"strategy": "hierfedlora", "hier": {"groups": 3}}).hier.most_groups == 3


def test_by_default_the_group_count_follows_the_devices_alive_each_global_round() -> None:
    from lorafleet.devices.costmodel import CostModel
    from orchestrator.capacity import DeviceEstimate
    from orchestrator.planners.context import PlanningContext
    from orchestrator.planners.global_round import form_groups
    from orchestrator.planners.legend import DeviceInput, SizeModel
    from schemas.config import parse_run_config

    # Given the default configuration of a hierarchical run (hier.groups: auto) ...
    config = parse_run_config({"run_id": "auto-default", "strategy": "hierfedlora", "devices": {"count": 8}})
    assert config.hier.groups == "auto"
    cost = CostModel("test", 2, embed_s=0.0, prefix_block_s=0.0, train_block_s=1e-4, head_s=2e-5, step_s=5e-3)
    ids = config.device_ids()
    # ... devices of two classes, one class each, half of them per class
    histograms = {d: [10, 0] if i % 2 == 0 else [0, 10] for i, d in enumerate(ids)}

    def groups_of(alive: list[str]) -> list[list[str]]:
        devices = [DeviceInput(d, 10, DeviceEstimate(1.0, 1e7, 1e7, 30.0)) for d in alive]
        ctx = PlanningContext(
            round_no=1,
            devices=devices,
            num_blocks=2,
            config=config,
            cost=cost,
            sizes=SizeModel({0: 1, 1: 1}, 1),
        )
        return form_groups(ctx, {d: histograms[d] for d in alive})[0]

    # When four devices are alive, then two balanced groups (min_group_size 2) ...
    four = groups_of(ids[:4])
    assert len(four) == 2 and all(sorted(histograms[d][0] > 0 for d in g) == [False, True] for g in four)
    # ... when four more join, four groups of one device of each class
    assert len(groups_of(ids)) == 4
    # ... and when a class's devices leave but one, no split is near-IID: one flat group
    lopsided = ids[:1] + [d for i, d in enumerate(ids) if i % 2 == 1][:1] + [ids[2], ids[4], ids[6]]
    assert len(groups_of(lopsided)) == 1


def _mixed_tier_groups(groups: list[list[str]], tier: dict[str, int]) -> int:
    return sum(len({tier[m] for m in g}) > 1 for g in groups)


def test_the_default_speed_weight_keeps_groups_to_one_speed_tier_more_than_the_old_one() -> None:
    """The configuration's default (3) against the one before it (0.1), on a fleet like the 80-device
    benchmark's: label-skewed devices (Dirichlet 0.3 over 6 classes, 10 rows) in three speed tiers."""
    rng = np.random.default_rng(0)
    devices = [
        GroupingDevice(
            f"d{i:02d}",
            tuple(int(x) for x in rng.multinomial(10, rng.dirichlet([0.3] * 6))),
            (1.0, 2.5, 6.0)[i % 3] * rng.uniform(0.9, 1.1),
        )
        for i in range(48)
    ]
    tier = {d.device_id: i % 3 for i, d in enumerate(devices)}
    mixed = {}
    for weight in (HierConfig().speed_weight, 0.1):
        grouping = auto_group_devices(devices, 8, threshold=0.075, speed_weight=weight)
        assert max(grouping.divergence) <= 0.075  # near-IID either way
        mixed[weight] = _mixed_tier_groups(grouping.groups, tier)
    # a group moves at its slowest member's pace: the default mixes tiers in fewer groups
    assert mixed[HierConfig().speed_weight] < mixed[0.1]
