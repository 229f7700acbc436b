"""Splitting a labelled training set among devices (pure, seeded): IID and three kinds of skew.

Every partitioner returns disjoint lists of row indices, one per device, and is deterministic given
its seed. ``per_device`` fixes how many rows a device holds (its mean, under quantity skew); ``None``
splits every row.

* :func:`partition_iid`: uniformly random shards.
* :func:`partition_dirichlet`: label skew (Hsu et al. 2019): each class's rows are divided among
  the devices in proportions ``q ~ Dir(alpha)`` drawn per class, so the fleet as a whole keeps the
  data set's label distribution while each device sees a few classes. Small ``alpha`` (0.1) gives
  each device one or two dominant classes (and unequal sizes); large ``alpha`` approaches IID.
* :func:`partition_classes`: each device holds rows of exactly ``k`` classes (pathological non-IID,
  McMahan et al. 2017), the classes dealt out so that every class is used.
* :func:`partition_quantity`: IID labels, device sizes proportional to ``Dir(alpha)`` over devices
  (at least ``min_size`` rows each).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np


def _check(n_items: int, n_devices: int, per_device: int | None) -> None:
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if per_device is not None and per_device < 1:
        raise ValueError(f"per_device must be >= 1, got {per_device}")
    needed = n_devices * (per_device if per_device is not None else 1)
    if n_items < needed:
        raise ValueError(
            f"not enough items: {n_devices} devices x {per_device or 1} need {needed}, have {n_items}"
        )


def partition_iid(n_items: int, n_devices: int, per_device: int | None, seed: int) -> list[list[int]]:
    """Disjoint random shards of ``range(n_items)``, one per device, deterministic given ``seed``.

    ``per_device`` items each, or (``None``) all items split evenly (sizes differ by at most one).

    Raises:
        ValueError: ``n_devices < 1``, ``per_device < 1``, or not enough items.
    """
    _check(n_items, n_devices, per_device)
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    if per_device is not None:
        return [order[d * per_device : (d + 1) * per_device] for d in range(n_devices)]
    base, extra = divmod(n_items, n_devices)
    bounds = [d * base + min(d, extra) for d in range(n_devices + 1)]
    return [order[bounds[d] : bounds[d + 1]] for d in range(n_devices)]


def _class_pools(labels: Sequence[int], rng: np.random.Generator) -> dict[int, list[int]]:
    """Row indices per class, each pool in a seeded random order."""
    pools: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        pools.setdefault(int(label), []).append(index)
    return {c: [pool[i] for i in rng.permutation(len(pool))] for c, pool in sorted(pools.items())}


def partition_dirichlet(
    labels: Sequence[int],
    n_devices: int,
    alpha: float,
    per_device: int | None,
    seed: int,
    min_size: int | None = None,
) -> list[list[int]]:
    """Label-skewed shards: each class's rows divided among the devices in Dir(``alpha``) proportions
    (Hsu et al. 2019), so that the fleet as a whole keeps the data set's label distribution.

    With ``per_device``, a stratified sample of ``per_device * n_devices`` rows is divided (device
    sizes then vary around ``per_device``); without it, every row. A device left with fewer than
    ``min_size`` rows (default: a fifth of ``per_device``, at least 1) takes random rows from the
    largest devices until it has them.

    Raises:
        ValueError: ``alpha <= 0``, ``n_devices < 1``, ``per_device < 1``, or fewer than ``min_size``
            rows per device.
    """
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    _check(len(labels), n_devices, per_device)
    rng = np.random.default_rng(seed)
    pools = _class_pools(labels, rng)
    if per_device is not None:
        pools = _stratified(pools, per_device * n_devices)
    floor = max(1, (per_device or 0) // 5) if min_size is None else min_size
    total = sum(len(p) for p in pools.values())
    if total < floor * n_devices:
        raise ValueError(f"{total} rows cannot give {n_devices} devices {floor} each")
    shards: list[list[int]] = [[] for _ in range(n_devices)]
    for pool in pools.values():
        proportions = rng.dirichlet(np.full(n_devices, alpha))
        cuts = (np.cumsum(proportions) * len(pool)).astype(int)[:-1]
        for device, part in enumerate(np.split(np.array(pool, dtype=np.int64), cuts)):
            shards[device] += part.tolist()
    # devices below the minimum take rows from the largest ones (the fleet's labels stay as they are)
    for device in range(n_devices):
        while len(shards[device]) < floor:
            donor = max(range(n_devices), key=lambda d: (len(shards[d]), -d))
            shards[device].append(shards[donor].pop(int(rng.integers(len(shards[donor])))))
    return [sorted(s) for s in shards]


def _stratified(pools: dict[int, list[int]], count: int) -> dict[int, list[int]]:
    """``count`` rows taken class by class in the data set's proportions (largest remainders)."""
    total = sum(len(p) for p in pools.values())
    shares = {c: len(p) * count / total for c, p in pools.items()}
    take = {c: int(math.floor(v)) for c, v in shares.items()}
    for c in sorted(shares, key=lambda c: (take[c] - shares[c], c))[: count - sum(take.values())]:
        take[c] += 1
    return {c: pool[: take[c]] for c, pool in pools.items()}


def partition_classes(
    labels: Sequence[int], n_devices: int, k: int, per_device: int | None, seed: int
) -> list[list[int]]:
    """Shards holding rows of exactly ``k`` classes each (as evenly as the pools allow).

    Classes are dealt to devices from a seeded shuffle, cycling, so every class is used when
    ``n_devices * k >= classes``; a device's rows are split evenly over its ``k`` classes, and the
    rows of a class are shared among the devices that hold it. ``per_device=None`` gives every row
    of a class to the devices holding it, in equal parts.

    Raises:
        ValueError: ``k`` outside ``1..classes``, or a class cannot supply its devices' rows.
    """
    _check(len(labels), n_devices, per_device)
    rng = np.random.default_rng(seed)
    pools = _class_pools(labels, rng)
    classes = list(pools)
    if not 1 <= k <= len(classes):
        raise ValueError(f"k must be in 1..{len(classes)} (the classes present), got {k}")
    deck = [classes[i] for i in rng.permutation(len(classes))]
    holdings = [[deck[(d * k + j) % len(deck)] for j in range(k)] for d in range(n_devices)]
    holders: dict[int, list[int]] = {c: [] for c in classes}
    for device, held in enumerate(holdings):
        for c in held:
            holders[c].append(device)
    shards: list[list[int]] = [[] for _ in range(n_devices)]
    for c, devices in holders.items():
        if not devices:
            continue
        pool = pools[c]
        if per_device is None:
            parts = np.array_split(np.array(pool, dtype=np.int64), len(devices))
            for device, part in zip(devices, parts, strict=True):
                shards[device] += part.tolist()
            continue
        start = 0
        for device in devices:
            j = holdings[device].index(c)
            want = per_device // k + (1 if j < per_device % k else 0)
            if start + want > len(pool):
                raise ValueError(
                    f"class {c} has {len(pool)} rows, fewer than its {len(devices)} devices need"
                )
            shards[device] += pool[start : start + want]
            start += want
    return [sorted(s) for s in shards]


def partition_quantity(
    n_items: int, n_devices: int, alpha: float, per_device: int | None, seed: int, min_size: int = 1
) -> list[list[int]]:
    """IID rows, device sizes proportional to Dir(``alpha``) over devices, at least ``min_size`` each.

    The total is ``per_device * n_devices`` (or every row).

    Raises:
        ValueError: ``alpha <= 0``, not enough rows for ``min_size`` each, or the usual checks.
    """
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    _check(n_items, n_devices, per_device)
    total = n_items if per_device is None else per_device * n_devices
    if total < min_size * n_devices:
        raise ValueError(f"{total} rows cannot give {n_devices} devices {min_size} each")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_items)[:total].tolist()
    spare = total - min_size * n_devices
    shares = rng.dirichlet(np.full(n_devices, alpha)) * spare
    extra = np.floor(shares).astype(int)
    # the rows floor() left over go to the largest remainders
    for device in np.argsort(-(shares - extra), kind="stable")[: spare - int(extra.sum())]:
        extra[device] += 1
    sizes = (extra + min_size).tolist()
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [sorted(order[bounds[d] : bounds[d + 1]]) for d in range(n_devices)]


def label_histogram(labels: Sequence[int], num_labels: int) -> list[int]:
    """Rows per class, ``num_labels`` entries."""
    counts = [0] * num_labels
    for label in labels:
        counts[int(label)] += 1
    return counts
