"""Non-IID partitioners: disjoint, sized, seeded, and skewed as their parameters say."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from lorafleet.data.partition import (
    label_histogram,
    partition_classes,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
)

LABELS = [i % 10 for i in range(5000)]  # 10 balanced classes


def _disjoint(shards: list[list[int]]) -> bool:
    seen = [i for s in shards for i in s]
    return len(seen) == len(set(seen))


def _tv_from_uniform(shard: list[int], labels: list[int], classes: int) -> float:
    """Total-variation distance of a shard's label distribution from the (uniform) global one."""
    hist = label_histogram([labels[i] for i in shard], classes)
    total = sum(hist)
    return 0.5 * sum(abs(h / total - 1 / classes) for h in hist)


def test_dirichlet_shards_are_disjoint_sized_and_seeded() -> None:
    shards = partition_dirichlet(LABELS, 20, 0.5, 100, seed=3)
    sizes = [len(s) for s in shards]
    assert sum(sizes) == 2000 and min(sizes) >= 20  # the total, and at least a fifth of per_device each
    assert _disjoint(shards)
    assert shards == partition_dirichlet(LABELS, 20, 0.5, 100, seed=3)
    assert shards != partition_dirichlet(LABELS, 20, 0.5, 100, seed=4)


def test_smaller_alpha_gives_more_skewed_shards() -> None:
    def mean_tv(alpha: float) -> float:
        shards = partition_dirichlet(LABELS, 30, alpha, 100, seed=0)
        return sum(_tv_from_uniform(s, LABELS, 10) for s in shards) / len(shards)

    skewed, mild, iid = mean_tv(0.1), mean_tv(1.0), mean_tv(1000.0)
    assert skewed > mild > iid
    assert skewed > 0.6  # alpha 0.1: a device is dominated by one or two classes
    assert iid < 0.15


def test_the_fleet_keeps_the_data_sets_label_distribution_however_skewed_its_devices() -> None:
    # Given an unbalanced data set (class 0 is half of it)
    labels = [0] * 3000 + [c % 4 + 1 for c in range(3000)]
    shards = partition_dirichlet(labels, 25, 0.1, 80, seed=1)
    # Then each device is skewed, but together they hold the data set's proportions
    fleet = Counter(labels[i] for s in shards for i in s)
    assert fleet == {0: 1000, 1: 250, 2: 250, 3: 250, 4: 250}
    assert sum(_tv_from_uniform(s, labels, 5) for s in shards) / 25 > 0.4


def test_dirichlet_gives_every_device_its_minimum() -> None:
    shards = partition_dirichlet([i % 2 for i in range(5000)], 21, 0.05, 50, seed=0, min_size=20)
    assert min(len(s) for s in shards) >= 20 and sum(len(s) for s in shards) == 1050
    with pytest.raises(ValueError, match="cannot give"):
        partition_dirichlet(LABELS, 20, 0.1, 50, seed=0, min_size=60)


def test_dirichlet_without_per_device_deals_out_every_row() -> None:
    shards = partition_dirichlet(LABELS, 12, 0.3, None, seed=2)
    assert sorted(i for s in shards for i in s) == list(range(len(LABELS)))
    assert all(shards)


def test_classes_gives_each_device_exactly_k_classes_and_uses_every_class() -> None:
    shards = partition_classes(LABELS, 10, 2, 60, seed=0)
    assert _disjoint(shards)
    for shard in shards:
        counts = Counter(LABELS[i] for i in shard)
        assert len(counts) == 2 and sorted(counts.values()) == [30, 30]
    used = {LABELS[i] for s in shards for i in s}
    assert used == set(range(10))


def test_classes_refuses_an_impossible_k() -> None:
    with pytest.raises(ValueError, match="k must be in 1..10"):
        partition_classes(LABELS, 4, 11, 10, seed=0)


def test_quantity_skew_keeps_the_total_and_the_minimum_and_varies_sizes() -> None:
    shards = partition_quantity(len(LABELS), 20, 0.3, 100, seed=5, min_size=8)
    sizes = [len(s) for s in shards]
    assert sum(sizes) == 2000 and min(sizes) >= 8
    assert _disjoint(shards)
    mean = sum(sizes) / len(sizes)
    spread = math.sqrt(sum((x - mean) ** 2 for x in sizes) / len(sizes)) / mean
    assert spread > 0.5  # Dir(0.3) over 20 devices: very unequal
    even = [len(s) for s in partition_quantity(len(LABELS), 20, 1e4, 100, seed=5)]
    assert max(even) - min(even) <= 10


@pytest.mark.parametrize(
    "call",
    [
        lambda: partition_dirichlet(LABELS, 4, 0.0, 10, seed=0),
        lambda: partition_dirichlet(LABELS, 0, 0.5, 10, seed=0),
        lambda: partition_dirichlet(LABELS[:30], 4, 0.5, 10, seed=0),
        lambda: partition_quantity(100, 4, -1.0, 10, seed=0),
        lambda: partition_iid(10, 4, 3, seed=0),
    ],
)
def test_bad_parameters_are_refused(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]
