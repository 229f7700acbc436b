"""The StateStore's hierarchy contract (global rounds over groups), on the twin and the real Redis."""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections import Counter
from typing import Any

import pytest

from lorafleet.state.base import GroupProgress, StateStore


def test_open_global_round_is_idempotent_and_refuses_bad_targets(store: StateStore, run_id: str) -> None:
    assert store.open_global_round(run_id, 1, {0: 2, 1: 3})
    assert not store.open_global_round(run_id, 1, {0: 9})
    info = store.get_global_round(run_id, 1)
    assert info is not None
    assert (info.status, info.targets, info.counts) == ("open", {0: 2, 1: 3}, {0: 0, 1: 0})
    assert store.get_global_round(run_id, 2) is None
    assert store.list_global_rounds(run_id) == [1]
    for bad in ({}, {0: 0}, {0: 2, 1: -1}):
        with pytest.raises(ValueError, match="targets >= 1"):
            store.open_global_round(run_id, 2, bad)


def test_group_aggregations_count_once_and_make_the_round_ready_exactly_once(
    store: StateStore, run_id: str
) -> None:
    # Given a global round in which group 0 aggregates twice and group 1 once
    assert store.open_global_round(run_id, 3, {0: 2, 1: 1})
    # When group 0's first intra-group round is recorded (twice: a redelivery)
    first = store.record_group_aggregation(run_id, 3, 0, 30001)
    again = store.record_group_aggregation(run_id, 3, 0, 30001)
    # Then it counts once
    assert first == GroupProgress(3, 0, 1, 2, True, False)
    assert again == GroupProgress(3, 0, 1, 2, False, False)
    # When group 1 reaches its target, the round is not ready (group 0 has not) ...
    assert store.record_group_aggregation(run_id, 3, 1, 30101) == GroupProgress(3, 1, 1, 1, True, False)
    assert store.pending_global_aggregations(run_id) == []
    # ... and when group 0 reaches its own, this very call makes it ready, and no later one does
    last = store.record_group_aggregation(run_id, 3, 0, 30002)
    assert last == GroupProgress(3, 0, 2, 2, True, True)
    assert not store.record_group_aggregation(run_id, 3, 0, 30002).ready_now
    info = store.get_global_round(run_id, 3)
    assert info is not None and info.status == "ready" and info.counts == {0: 2, 1: 1}
    assert store.pending_global_aggregations(run_id) == [3]
    # Then marking it aggregated counts one global aggregation, once
    assert store.global_aggregations(run_id) == 0
    assert store.mark_global_aggregated(run_id, 3)
    assert not store.mark_global_aggregated(run_id, 3)
    assert store.global_aggregations(run_id) == 1
    assert store.pending_global_aggregations(run_id) == []
    info = store.get_global_round(run_id, 3)
    assert info is not None and info.status == "aggregated"


def test_unknown_rounds_and_groups_count_nothing(store: StateStore, run_id: str) -> None:
    assert store.record_group_aggregation(run_id, 1, 0, 10001) == GroupProgress(1, 0, 0, 0, False, False)
    assert store.open_global_round(run_id, 1, {0: 1})
    assert store.record_group_aggregation(run_id, 1, 5, 10501) == GroupProgress(1, 5, 0, 0, False, False)
    assert not store.mark_global_aggregated(run_id, 1)  # not ready
    assert not store.mark_global_aggregated(run_id, 2)  # no such round
    info = store.get_global_round(run_id, 1)
    assert info is not None and info.counts == {0: 0}


def test_set_group_target_never_goes_below_the_count_and_can_make_the_round_ready(
    store: StateStore, run_id: str
) -> None:
    assert store.open_global_round(run_id, 1, {0: 4, 1: 1})
    store.record_group_aggregation(run_id, 1, 0, 10001)
    store.record_group_aggregation(run_id, 1, 0, 10002)
    store.record_group_aggregation(run_id, 1, 1, 10101)
    # Raising a target keeps the round open
    assert store.set_group_target(run_id, 1, 1, 3) == GroupProgress(1, 1, 1, 3, False, False)
    # Lowering one below its count stops at the count; with every group there, the round is ready
    store.record_group_aggregation(run_id, 1, 1, 10102)
    store.record_group_aggregation(run_id, 1, 1, 10103)
    assert store.set_group_target(run_id, 1, 0, 1) == GroupProgress(1, 0, 2, 2, False, True)
    assert store.pending_global_aggregations(run_id) == [1]
    # A ready round's targets no longer change
    assert store.set_group_target(run_id, 1, 0, 7).target == 2


def test_group_adapters_keep_the_newest_version(store: StateStore, run_id: str) -> None:
    assert store.get_group_adapter(run_id, 0) is None
    store.put_group_adapter(run_id, 0, 10001, b"a")
    store.put_group_adapter(run_id, 1, 10101, b"b")
    store.put_group_adapter(run_id, 0, 10002, b"c")
    store.put_group_adapter(run_id, 0, 10001, b"stale")
    assert store.get_group_adapter(run_id, 0) == (10002, b"c")
    assert store.get_group_adapter(run_id, 1) == (10101, b"b")


def _record_group_rounds(
    store: StateStore, run_id: str, calls: list[tuple[int, int]]
) -> list[tuple[int, int, GroupProgress]]:
    return [(g, r, store.record_group_aggregation(run_id, 1, g, r)) for g, r in calls]


def _calls(targets: dict[int, int], seed: int) -> list[tuple[int, int]]:
    """Every intra-group round of every group, plus some redelivered ones, in a seeded order."""
    calls = [(g, 10_000 + 100 * g + k) for g, t in targets.items() for k in range(1, t + 1)]
    rng = random.Random(seed)
    calls += rng.sample(calls, len(calls) // 4)
    rng.shuffle(calls)
    return calls


def _check_concurrent(store: StateStore, run_id: str, results: list[tuple[int, int, GroupProgress]]) -> None:
    targets = {0: 40, 1: 25}
    counted = Counter((g, r) for g, r, p in results if p.counted)
    every_round = {(g, 10_000 + 100 * g + k) for g, t in targets.items() for k in range(1, t + 1)}
    assert set(counted) == every_round and set(counted.values()) == {1}  # none lost, none doubled
    assert sum(p.ready_now for _, _, p in results) == 1  # one caller made the round ready
    info = store.get_global_round(run_id, 1)
    assert info is not None and info.status == "ready" and info.counts == targets
    assert store.pending_global_aggregations(run_id) == [1]


def test_two_groups_closing_rounds_concurrently_lose_and_double_no_count(
    store: StateStore, run_id: str
) -> None:
    # Given two groups with their targets, and 8 threads each recording every intra-group round of
    # both groups (with redeliveries) in its own order
    targets = {0: 40, 1: 25}
    assert store.open_global_round(run_id, 1, targets)
    per_thread: dict[int, list[tuple[int, int, GroupProgress]]] = {}
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait(timeout=30)
        per_thread[i] = _record_group_rounds(store, run_id, _calls(targets, seed=i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    # Then every intra-group round counted exactly once, and the round became ready once
    _check_concurrent(store, run_id, [r for rs in per_thread.values() for r in rs])


def _process_recorder(url: str, run_id: str, seed: int, barrier: Any, out: Any) -> None:
    from lorafleet.state.redis import RedisStateStore

    store = RedisStateStore(url)
    try:
        store.get_global_round(run_id, 1)  # connect before the start line
        barrier.wait(timeout=60)
        results = _record_group_rounds(store, run_id, _calls({0: 40, 1: 25}, seed))
        out.put([(g, r, (p.count, p.target, p.counted, p.ready_now)) for g, r, p in results])
    finally:
        store.close()


@pytest.mark.redis
@pytest.mark.slow
def test_two_groups_closing_rounds_from_separate_processes_on_redis(redis_url: str, run_id: str) -> None:
    from lorafleet.state.redis import RedisStateStore

    store = RedisStateStore(redis_url)
    ctx = multiprocessing.get_context("spawn")
    try:
        assert store.open_global_round(run_id, 1, {0: 40, 1: 25})
        barrier, out = ctx.Barrier(4), ctx.Queue()
        procs = [
            ctx.Process(target=_process_recorder, args=(redis_url, run_id, i, barrier, out)) for i in range(4)
        ]
        for p in procs:
            p.start()
        raw = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        results = [(g, r, GroupProgress(1, g, *fields)) for chunk in raw for g, r, fields in chunk]
        _check_concurrent(store, run_id, results)
    finally:
        store.delete_run(run_id)
        store.close()


@pytest.mark.redis
def test_a_replayed_group_record_returns_the_first_answer(redis_url: str, run_id: str) -> None:
    from lorafleet.state.redis import RedisStateStore

    store = RedisStateStore(redis_url)
    try:
        assert store.open_global_round(run_id, 1, {0: 1})
        first = store._record_group_with(run_id, 1, 0, 10001, "nonce-a")
        replay = store._record_group_with(run_id, 1, 0, 10001, "nonce-a")
        other = store._record_group_with(run_id, 1, 0, 10001, "nonce-b")
        assert first == replay == GroupProgress(1, 0, 1, 1, True, True)
        assert other == GroupProgress(1, 0, 1, 1, False, False)
    finally:
        store.delete_run(run_id)
        store.close()
