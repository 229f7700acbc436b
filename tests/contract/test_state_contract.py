"""One StateStore contract, run against the in-process twin and the real Redis adapter.

Redis cases need Redis on 127.0.0.1:6379 (skipped locally without it, failing under CI); each uses a
unique run id and deletes the run afterwards.
"""

from __future__ import annotations

import ast
import multiprocessing
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet.state.base import RecordResult, StateStore, StateStoreError
from lorafleet.state.memory import InMemoryStateStore

OUTCOMES = ("counted", "duplicate", "late", "unknown_task", "wrong_device")


def _redis_store(url: str) -> StateStore:
    from lorafleet.state.redis import RedisStateStore

    return RedisStateStore(url)


def _tasks(n: int, devices: int = 20, prefix: str = "t") -> dict[str, str]:
    return {f"{prefix}{i}": f"d{i % devices}" for i in range(n)}


def _open(
    store: StateStore, run_id: str, round_no: int = 1, n: int = 5, quorum: int = 3, **kw: Any
) -> dict[str, str]:
    tasks = _tasks(n)
    specs = {t: f'{{"task": "{t}"}}' for t in tasks}
    assert store.open_round(
        run_id, round_no, tasks, specs, quorum, kw.get("deadline_ms", 10_000), kw.get("now_ms", 1_000)
    )
    return tasks


# -- run, devices, leases -------------------------------------------------------------------------------
def test_run_fields_roundtrip(store: StateStore, run_id: str) -> None:
    assert store.get_run_fields(run_id) == {}
    store.put_run_field(run_id, "config", {"rounds": 3, "lr": 1e-4, "groups": [["a", "b"], []], "x": None})
    store.put_run_field(run_id, "status", "running")
    store.put_run_field(run_id, "cursor", 7)
    store.put_run_field(run_id, "name", "ünïcode ✓")
    store.put_run_field(run_id, "cursor", 8)  # overwrite
    assert store.get_run_fields(run_id) == {
        "config": {"rounds": 3, "lr": 1e-4, "groups": [["a", "b"], []], "x": None},
        "status": "running",
        "cursor": 8,
        "name": "ünïcode ✓",
    }


def test_register_device_new_then_again(store: StateStore, run_id: str) -> None:
    assert store.register_device(run_id, "d1", {"mem_gb": 4, "tier": "low"}) is True
    assert store.register_device(run_id, "d2", {"mem_gb": 16}) is True
    assert store.register_device(run_id, "d1", {"mem_gb": 8}) is False  # info replaced, not new
    assert store.get_devices(run_id) == {"d1": {"mem_gb": 8}, "d2": {"mem_gb": 16}}


def test_one_device_and_the_count_without_reading_them_all(store: StateStore, run_id: str) -> None:
    assert store.get_device(run_id, "d1") is None and store.count_devices(run_id) == 0
    store.register_device(run_id, "d1", {"mem_gb": 4})
    store.register_device(run_id, "d2", {"mem_gb": 16})
    store.register_device(run_id, "d1", {"mem_gb": 8})
    assert store.get_device(run_id, "d1") == {"mem_gb": 8}
    assert store.get_device(run_id, "d3") is None
    assert store.count_devices(run_id) == 2


def test_leases_and_expired_devices(store: StateStore, run_id: str) -> None:
    assert store.expired_devices(run_id, 10**12) == []
    store.touch_device(run_id, "b", 1_000)
    store.touch_device(run_id, "a", 1_000)
    store.touch_device(run_id, "c", 2_000)
    assert store.expired_devices(run_id, 999) == []
    assert store.expired_devices(run_id, 1_000) == ["a", "b"]  # at or before now, sorted
    store.touch_device(run_id, "a", 3_000)  # lease extended
    assert store.expired_devices(run_id, 2_000) == ["b", "c"]
    assert store.expired_devices(run_id, 3_000) == ["a", "b", "c"]


# -- rounds ---------------------------------------------------------------------------------------------
def test_open_round_is_idempotent(store: StateStore, run_id: str) -> None:
    assert store.get_round(run_id, 1) is None
    assert store.list_rounds(run_id) == []
    tasks = _open(store, run_id, 1, n=4, quorum=2, deadline_ms=5_000, now_ms=100)
    assert store.open_round(run_id, 1, {"other": "dx"}, {}, 1, 99, 200) is False
    info = store.get_round(run_id, 1)
    assert info is not None
    assert (info.tasks, info.quorum, info.deadline_ms, info.opened_ms) == (tasks, 2, 5_000, 100)
    assert store.get_task_spec(run_id, 1, "t0") == '{"task": "t0"}'
    assert store.get_task_spec(run_id, 1, "other") is None
    assert store.get_task_spec(run_id, 2, "t0") is None
    _open(store, run_id, 10)
    _open(store, run_id, 2)
    assert store.list_rounds(run_id) == [1, 2, 10]
    with pytest.raises(ValueError):
        store.open_round(run_id, 3, {"t": "d"}, {}, 0, 1, 0)
    assert store.list_rounds(run_id) == [1, 2, 10]


def test_a_real_update_replaces_an_empty_report_while_the_round_is_open(
    store: StateStore, run_id: str
) -> None:
    # Given a round of 3 tasks (quorum 3) in which t0's device was dropped (reported empty)
    _open(store, run_id, 1, n=3, quorum=3)
    assert store.record_update(run_id, 1, "t0", "d0", b"", 10).outcome == "counted"
    assert store.record_update(run_id, 1, "t1", "d1", b"u1", 11).outcome == "counted"
    # When t0's real update arrives while the round is still open
    result = store.record_update(run_id, 1, "t0", "d0", b"u0", 12)
    # Then it replaces the empty report without counting the task twice
    assert (result.outcome, result.reported, result.closed_now) == ("recovered", 2, False)
    assert store.get_updates(run_id, 1) == {"t0": b"u0", "t1": b"u1"}
    # ... a second copy is a duplicate, an empty report cannot undo it
    assert store.record_update(run_id, 1, "t0", "d0", b"u0", 13).outcome == "duplicate"
    assert store.record_update(run_id, 1, "t0", "d0", b"", 14).outcome == "duplicate"
    assert store.get_updates(run_id, 1)["t0"] == b"u0"
    # ... and the round still closes on its third task
    assert store.record_update(run_id, 1, "t2", "d2", b"u2", 15).closed_now
    counters = store.get_counters(run_id)
    counts = [counters[f"update_{o}"] for o in ("counted", "recovered", "duplicate")]
    assert counts == [3, 1, 2]


def test_a_real_update_of_a_task_reported_empty_after_the_close_is_late(
    store: StateStore, run_id: str
) -> None:
    _open(store, run_id, 1, n=2, quorum=2)
    store.record_update(run_id, 1, "t0", "d0", b"", 10)
    assert store.record_update(run_id, 1, "t1", "d1", b"u1", 11).closed_now
    assert store.record_update(run_id, 1, "t0", "d0", b"u0", 12).outcome == "late"
    assert store.get_updates(run_id, 1) == {"t0": b"", "t1": b"u1"}
    assert store.get_counters(run_id).get("update_late") == 1


def test_only_an_aggregated_round_is_compacted_and_only_its_real_updates(
    store: StateStore, run_id: str
) -> None:
    _open(store, run_id, 1, n=3, quorum=3)
    for task, body in (("t0", b"update-0" * 100), ("t1", b""), ("t2", b"update-2" * 100)):
        store.record_update(run_id, 1, task, f"d{task[1]}", body, 10)
    receipts = {"t0": b"r0", "t1": b"r1", "t2": b"", "nope": b"rx"}
    # a closed round not yet aggregated keeps its updates (a restarted aggregator merges them)
    assert store.compact_updates(run_id, 1, receipts) is False
    assert store.get_updates(run_id, 1)["t0"] == b"update-0" * 100
    assert store.mark_aggregated(run_id, 1, 1)
    assert store.compact_updates(run_id, 1, receipts) is True
    # an empty report stays empty, an empty receipt changes nothing, an unknown task is not added
    assert store.get_updates(run_id, 1) == {"t0": b"r0", "t1": b"", "t2": b"update-2" * 100}
    assert store.compact_updates(run_id, 2, receipts) is False


def test_open_round_with_no_tasks_or_specs(store: StateStore, run_id: str) -> None:
    assert store.open_round(run_id, 1, {}, {}, 1, 50, 0)
    info = store.get_round(run_id, 1)
    assert info is not None and info.tasks == {} and info.status == "open"
    assert store.close_expired_rounds(run_id, 50) == [1]


def test_open_round_many_tasks(store: StateStore, run_id: str) -> None:
    tasks = _tasks(3_000, devices=300)
    specs = {t: "s" * 20 for t in tasks}
    assert store.open_round(run_id, 1, tasks, specs, 2_500, 10, 0)
    info = store.get_round(run_id, 1)
    assert info is not None and info.tasks == tasks
    assert store.get_task_spec(run_id, 1, "t2999") == "s" * 20


def test_get_round_fields_through_the_life_of_a_round(store: StateStore, run_id: str) -> None:
    tasks = _open(store, run_id, 4, n=3, quorum=2, deadline_ms=9_000, now_ms=1_500)
    info = store.get_round(run_id, 4)
    assert info is not None
    assert info.run_id == run_id and info.round == 4
    assert (info.status, info.reported, info.closed_ms, info.close_reason, info.global_version) == (
        "open", 0, None, None, None,
    )  # fmt: skip
    assert info.tasks == tasks
    store.record_update(run_id, 4, "t0", "d0", b"u0", 2_000)
    store.record_update(run_id, 4, "t1", "d1", b"u1", 2_500)
    info = store.get_round(run_id, 4)
    assert info is not None
    assert (info.status, info.reported, info.closed_ms, info.close_reason) == ("closed", 2, 2_500, "quorum")
    assert store.mark_aggregated(run_id, 4, 17)
    info = store.get_round(run_id, 4)
    assert info is not None
    assert (info.status, info.global_version, info.closed_ms) == ("aggregated", 17, 2_500)


def test_record_update_outcomes_and_counters(store: StateStore, run_id: str) -> None:
    _open(store, run_id, 1, n=5, quorum=3)
    rec = store.record_update
    assert rec(run_id, 1, "t0", "d0", b"a", 1) == RecordResult("counted", 1, False)
    assert rec(run_id, 1, "t0", "d0", b"a-again", 2) == RecordResult("duplicate", 1, False)
    assert rec(run_id, 1, "nope", "d0", b"x", 3) == RecordResult("unknown_task", 1, False)
    assert rec(run_id, 99, "t0", "d0", b"x", 3) == RecordResult("unknown_task", 0, False)
    assert rec(run_id, 1, "t1", "d0", b"x", 4) == RecordResult("wrong_device", 1, False)
    assert rec(run_id, 1, "t1", "d1", b"b", 5) == RecordResult("counted", 2, False)
    assert rec(run_id, 1, "t2", "d2", b"c", 6) == RecordResult("counted", 3, True)
    assert rec(run_id, 1, "t3", "d3", b"d", 7) == RecordResult("late", 3, False)
    assert rec(run_id, 1, "t2", "d2", b"c", 8) == RecordResult("duplicate", 3, False)  # duplicate before late
    assert rec(run_id, 1, "t4", "dX", b"e", 9) == RecordResult("wrong_device", 3, False)  # before late
    assert store.get_counters(run_id) == {
        "update_counted": 3,
        "update_duplicate": 2,
        "update_unknown_task": 2,
        "update_wrong_device": 2,
        "update_late": 1,
    }
    assert store.get_updates(run_id, 1) == {"t0": b"a", "t1": b"b", "t2": b"c"}
    store.mark_aggregated(run_id, 1, 1)
    assert rec(run_id, 1, "t4", "d4", b"e", 10) == RecordResult("late", 3, False)  # aggregated is late too


def test_quorum_closes_exactly_on_the_quorum_th_update(store: StateStore, run_id: str) -> None:
    _open(store, run_id, 1, n=10, quorum=6)
    results = [store.record_update(run_id, 1, f"t{i}", f"d{i}", bytes([i]), 100 + i) for i in range(10)]
    assert [r.outcome for r in results] == ["counted"] * 6 + ["late"] * 4
    assert [r.closed_now for r in results] == [False] * 5 + [True] + [False] * 4
    assert [r.reported for r in results] == [1, 2, 3, 4, 5, 6, 6, 6, 6, 6]
    info = store.get_round(run_id, 1)
    assert info is not None and (info.closed_ms, info.close_reason, info.reported) == (105, "quorum", 6)
    assert store.close_expired_rounds(run_id, 10**9) == []  # already closed: never closed twice
    info = store.get_round(run_id, 1)
    assert info is not None and info.close_reason == "quorum"
    assert store.pending_aggregations(run_id) == [1]


def test_close_expired_rounds_closes_only_expired_open_rounds_once(store: StateStore, run_id: str) -> None:
    _open(store, run_id, 1, deadline_ms=1_000)
    _open(store, run_id, 2, deadline_ms=2_000)
    _open(store, run_id, 3, deadline_ms=3_000)
    _open(store, run_id, 4, n=1, quorum=1, deadline_ms=500)
    assert store.record_update(run_id, 4, "t0", "d0", b"x", 10).closed_now  # closed by quorum
    assert store.close_expired_rounds(run_id, 999) == []
    assert store.close_expired_rounds(run_id, 2_000) == [1, 2]  # deadline == now counts as expired
    assert store.close_expired_rounds(run_id, 2_500) == []
    for n in (1, 2):
        info = store.get_round(run_id, n)
        assert info is not None and (info.status, info.close_reason, info.closed_ms) == (
            "closed",
            "deadline",
            2_000,
        )
    info = store.get_round(run_id, 3)
    assert info is not None and info.status == "open"
    info = store.get_round(run_id, 4)
    assert info is not None and info.close_reason == "quorum"
    assert store.record_update(run_id, 1, "t0", "d0", b"late", 2_100) == RecordResult("late", 0, False)
    assert store.pending_aggregations(run_id) == [1, 2, 4]
    assert store.close_expired_rounds(run_id, 5_000) == [3]
    assert store.close_expired_rounds(run_id, 5_000) == []


def test_pending_aggregations_and_mark_aggregated(store: StateStore, run_id: str) -> None:
    assert store.pending_aggregations(run_id) == []
    _open(store, run_id, 1, deadline_ms=100)
    _open(store, run_id, 2, deadline_ms=100)
    _open(store, run_id, 3, deadline_ms=10**6)
    assert store.mark_aggregated(run_id, 1, 1) is False  # still open
    assert store.mark_aggregated(run_id, 9, 1) is False  # no such round
    assert store.close_expired_rounds(run_id, 100) == [1, 2]
    assert store.pending_aggregations(run_id) == [1, 2]
    assert store.mark_aggregated(run_id, 2, 5) is True
    assert store.mark_aggregated(run_id, 2, 6) is False  # idempotent: first version wins
    assert store.pending_aggregations(run_id) == [1]
    info = store.get_round(run_id, 2)
    assert info is not None and (info.status, info.global_version) == ("aggregated", 5)
    assert store.mark_aggregated(run_id, 1, 6) is True
    assert store.pending_aggregations(run_id) == []


def test_get_updates_returns_exactly_the_counted_bytes(store: StateStore, run_id: str) -> None:
    assert store.get_updates(run_id, 1) == {}
    _open(store, run_id, 1, n=4, quorum=3)
    blob = bytes(range(256)) * 1_000  # binary, NULs included, 256 kB
    store.record_update(run_id, 1, "t0", "d0", blob, 1)
    store.record_update(run_id, 1, "t0", "d0", b"second copy", 2)  # duplicate: not stored
    store.record_update(run_id, 1, "t1", "d0", b"wrong device", 3)
    store.record_update(run_id, 1, "t1", "d1", b"", 4)  # empty payload is still a payload
    store.record_update(run_id, 1, "t2", "d2", b"\x00", 5)
    store.record_update(run_id, 1, "t3", "d3", b"late", 6)
    assert store.get_updates(run_id, 1) == {"t0": blob, "t1": b"", "t2": b"\x00"}


def test_get_update_returns_one_counted_update(store: StateStore, run_id: str) -> None:
    assert store.get_update(run_id, 1, "t0") is None
    _open(store, run_id, 1, n=3, quorum=3)
    blob = bytes(range(256)) * 1_000
    store.record_update(run_id, 1, "t0", "d0", blob, 1)
    store.record_update(run_id, 1, "t1", "d1", b"", 2)
    store.record_update(run_id, 1, "t0", "d0", b"a later copy", 3)  # duplicate: not stored
    assert store.get_update(run_id, 1, "t0") == blob
    assert store.get_update(run_id, 1, "t1") == b""  # reported empty
    assert store.get_update(run_id, 1, "t2") is None  # not reported
    assert store.get_update(run_id, 2, "t0") is None  # no such round


def test_global_adapter_versioning(store: StateStore, run_id: str) -> None:
    assert store.get_global_adapter(run_id) is None
    store.put_global_adapter(run_id, 2, b"v2")
    assert store.get_global_adapter(run_id) == (2, b"v2")
    store.put_global_adapter(run_id, 1, b"v1")  # older: ignored
    assert store.get_global_adapter(run_id) == (2, b"v2")
    store.put_global_adapter(run_id, 2, b"v2-again")  # same version: replaced
    assert store.get_global_adapter(run_id) == (2, b"v2-again")
    store.put_global_adapter(run_id, 10, b"\x00" * 1_000)
    assert store.get_global_adapter(run_id) == (10, b"\x00" * 1_000)


def test_round_metrics_merge(store: StateStore, run_id: str) -> None:
    assert store.get_round_metrics(run_id) == {}
    precise = 0.12345678901234567
    store.put_round_metrics(
        run_id, 2, {"loss": 1.5, "acc": precise, "big": 2**60, "hist": [], "nested": {"a": 1}}
    )
    store.put_round_metrics(run_id, 1, {"loss": 3.0})
    store.put_round_metrics(run_id, 2, {"loss": 1.25, "nested": {"b": 2}, "keys": {3: "int key"}})
    store.put_round_metrics(run_id, 3, {})
    assert store.get_round_metrics(run_id) == {
        1: {"loss": 3.0},
        2: {
            "loss": 1.25,
            "acc": precise,
            "big": 2**60,
            "hist": [],
            "nested": {"b": 2},
            "keys": {"3": "int key"},
        },
        3: {},
    }
    assert list(store.get_round_metrics(run_id)) == [1, 2, 3]


def test_round_metrics_concurrent_merges_lose_nothing(store: StateStore, run_id: str) -> None:
    def writer(w: int) -> None:
        for i in range(15):
            store.put_round_metrics(run_id, 1, {f"w{w}_{i}": i})

    _run_threads(6, writer)
    assert store.get_round_metrics(run_id) == {1: {f"w{w}_{i}": i for w in range(6) for i in range(15)}}


def test_counters(store: StateStore, run_id: str) -> None:
    assert store.get_counters(run_id) == {}
    assert store.incr_counter(run_id, "rejected_shape") == 1
    assert store.incr_counter(run_id, "rejected_shape", 4) == 5
    assert store.incr_counter(run_id, "rejected_nan", 2) == 2
    assert store.incr_counter(run_id, "rejected_nan", -1) == 1
    assert store.get_counters(run_id) == {"rejected_shape": 5, "rejected_nan": 1}


def test_delete_run_removes_every_record_and_only_that_run(store: StateStore, run_id: str) -> None:
    other = f"{run_id}-other"
    try:
        for rid in (run_id, other):
            store.put_run_field(rid, "status", "running")
            store.register_device(rid, "d0", {})
            store.touch_device(rid, "d0", 5)
            _open(store, rid, 1, n=2, quorum=1, deadline_ms=100)
            _open(store, rid, 2, n=2, quorum=2, deadline_ms=100)
            store.record_update(rid, 1, "t0", "d0", b"u", 1)
            store.put_global_adapter(rid, 1, b"g")
            store.put_round_metrics(rid, 1, {"loss": 1.0})
            store.incr_counter(rid, "x")
        store.delete_run(run_id)
        assert store.get_run_fields(run_id) == {}
        assert store.get_devices(run_id) == {}
        assert store.expired_devices(run_id, 10**9) == []
        assert store.list_rounds(run_id) == []
        assert store.get_round(run_id, 1) is None
        assert store.get_updates(run_id, 1) == {}
        assert store.pending_aggregations(run_id) == []
        assert store.close_expired_rounds(run_id, 10**9) == []
        assert store.get_global_adapter(run_id) is None
        assert store.get_round_metrics(run_id) == {}
        assert store.get_counters(run_id) == {}
        assert store.list_rounds(other) == [1, 2]  # the other run is untouched
        assert store.get_updates(other, 1) == {"t0": b"u"}
        store.delete_run(run_id)  # deleting twice is fine
    finally:
        store.delete_run(other)


def test_expire_run_and_list_runs(store: StateStore, run_id: str) -> None:
    kept, gone = f"{run_id}-kept", f"{run_id}-gone"
    try:
        for rid in (kept, gone):
            store.put_run_field(rid, "status", "finished")
            _open(store, rid, 1, n=2, quorum=1, deadline_ms=100)
            store.incr_counter(rid, "x")
        assert {kept, gone} <= set(store.list_runs())
        # a retention in the future keeps the run readable; 0 removes every record now
        store.expire_run(kept, 3600.0)
        store.expire_run(gone, 0)
        assert store.get_run_fields(kept) == {"status": "finished"}
        assert store.list_rounds(kept) == [1] and store.get_counters(kept) == {"x": 1}
        assert store.get_run_fields(gone) == {} and store.list_rounds(gone) == []
        runs = store.list_runs()
        assert kept in runs and gone not in runs and runs == sorted(runs)
    finally:
        store.delete_run(kept)
        store.delete_run(gone)


def test_redis_expire_run_sets_a_ttl_on_every_key(redis_url: str, run_id: str) -> None:
    import redis

    from lorafleet.state import keys

    store = _redis_store(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        store.put_run_field(run_id, "status", "finished")
        _open(store, run_id, 1, n=2, quorum=1, deadline_ms=100)
        store.expire_run(run_id, 3600.0)
        names = list(client.scan_iter(match=keys.run_pattern(run_id)))
        ttls = [client.ttl(name) for name in names]
        assert len(names) >= 3 and all(3500 < t <= 3600 for t in ttls), ttls
    finally:
        store.delete_run(run_id)
        store.close()
        client.close()


# -- concurrency (threads) ------------------------------------------------------------------------------
def _run_threads(n: int, target: Callable[[int], None]) -> None:
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            target(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def _shuffled_calls(tasks: dict[str, str], seed: int, extra_duplicates: int = 25) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    calls = list(tasks.items()) + rng.choices(list(tasks.items()), k=extra_duplicates)
    rng.shuffle(calls)
    return calls


Call = tuple[int, str, RecordResult]  # (worker, task id, result)


def _check_race(store: StateStore, run_id: str, round_no: int, results: list[Call], quorum: int) -> None:
    """Exactly one closer, exactly `quorum` counted (one per task), stored bytes from the counted call."""
    assert sum(r.closed_now for _, _, r in results) == 1
    counted = [(w, t) for w, t, r in results if r.outcome == "counted"]
    assert len(counted) == quorum
    assert len({t for _, t in counted}) == quorum
    assert {r.outcome for _, _, r in results} <= {"counted", "duplicate", "late"}
    closer = next(r for _, _, r in results if r.closed_now)
    assert closer.outcome == "counted" and closer.reported == quorum
    assert sorted(r.reported for _, _, r in results if r.outcome == "counted") == list(range(1, quorum + 1))
    assert store.get_updates(run_id, round_no) == {t: _payload(w, t) for w, t in counted}
    info = store.get_round(run_id, round_no)
    assert info is not None and (info.status, info.reported, info.close_reason) == (
        "closed",
        quorum,
        "quorum",
    )


def _payload(worker: int, task: str) -> bytes:
    return f"{worker}:{task}".encode()


def _record_all(
    store: StateStore, run_id: str, round_no: int, worker: int, calls: list[tuple[str, str]]
) -> list[Call]:
    return [
        (worker, task, store.record_update(run_id, round_no, task, dev, _payload(worker, task), 5_000))
        for task, dev in calls
    ]


def test_threads_race_to_quorum_one_closer_exact_counts(store: StateStore, run_id: str) -> None:
    tasks = _tasks(200)
    assert store.open_round(run_id, 1, tasks, {}, 150, 10**9, 0)
    per_thread: dict[int, list[Call]] = {}

    def worker(i: int) -> None:
        per_thread[i] = _record_all(store, run_id, 1, i, _shuffled_calls(tasks, seed=i))

    started = time.perf_counter()
    _run_threads(8, worker)
    elapsed = time.perf_counter() - started
    results = [c for i in sorted(per_thread) for c in per_thread[i]]
    assert len(results) == 8 * 225
    _check_race(store, run_id, 1, results, quorum=150)
    counters = store.get_counters(run_id)
    assert sum(counters.values()) == len(results)
    assert counters == dict(Counter(f"update_{r.outcome}" for _, _, r in results))
    assert store.pending_aggregations(run_id) == [1]
    print(f"\n8 threads x 225 record_update: {elapsed * 1000:.0f} ms")


def test_two_rounds_close_concurrently_each_exactly_once(store: StateStore, run_id: str) -> None:
    """Two groups' rounds filling up at the same time from the same threads close independently."""
    tasks = {1: _tasks(100, prefix="a"), 2: _tasks(100, prefix="b")}
    for n in (1, 2):
        assert store.open_round(run_id, n, tasks[n], {}, 80, 10**9, 0)
    per_thread: dict[int, list[tuple[int, Call]]] = {}

    def worker(i: int) -> None:
        rng = random.Random(100 + i)
        calls = [
            (n, task, dev)
            for n in (1, 2)
            for task, dev in _shuffled_calls(tasks[n], seed=10 * i + n, extra_duplicates=10)
        ]
        rng.shuffle(calls)
        per_thread[i] = [
            (n, (i, task, store.record_update(run_id, n, task, dev, _payload(i, task), 7)))
            for n, task, dev in calls
        ]

    started = time.perf_counter()
    _run_threads(8, worker)
    elapsed = time.perf_counter() - started
    for n in (1, 2):
        _check_race(
            store, run_id, n, [c for calls in per_thread.values() for m, c in calls if m == n], quorum=80
        )
    assert store.pending_aggregations(run_id) == [1, 2]
    assert sum(store.get_counters(run_id).values()) == 8 * 2 * 110
    print(f"\n2 rounds x 8 threads x 220 record_update: {elapsed * 1000:.0f} ms")


def test_racing_close_expired_rounds_closes_each_round_once(store: StateStore, run_id: str) -> None:
    for n in range(1, 21):
        _open(store, run_id, n, deadline_ms=1_000 + n)  # 1..20, all expired at 2_000
    _open(store, run_id, 21, deadline_ms=10**9)  # not expired
    returned: dict[int, list[int]] = {}

    def sweeper(i: int) -> None:
        got: list[int] = []
        for _ in range(5):
            got += store.close_expired_rounds(run_id, 2_000)
        returned[i] = got

    _run_threads(8, sweeper)
    closed = [n for got in returned.values() for n in got]
    assert sorted(closed) == list(range(1, 21))  # each expired round closed by exactly one call
    assert store.pending_aggregations(run_id) == list(range(1, 21))
    info = store.get_round(run_id, 21)
    assert info is not None and info.status == "open"


def test_quorum_and_deadline_racing_close_once(store: StateStore, run_id: str) -> None:
    """Recorders reaching quorum while sweepers see the deadline pass: one close, by one of them."""
    for attempt in range(5):
        round_no = attempt + 1
        tasks = _tasks(40)
        assert store.open_round(run_id, round_no, tasks, {}, 30, 1_000, 0)
        closers: list[str] = []

        def body(
            i: int, round_no: int = round_no, tasks: dict[str, str] = tasks, closers: list[str] = closers
        ) -> None:
            if i < 2:
                for _ in range(20):
                    if round_no in store.close_expired_rounds(run_id, 1_000):
                        closers.append("deadline")
                return
            for task, dev in _shuffled_calls(tasks, seed=i, extra_duplicates=0):
                if store.record_update(run_id, round_no, task, dev, b"u", 1_000).closed_now:
                    closers.append("quorum")

        _run_threads(6, body)
        info = store.get_round(run_id, round_no)
        assert info is not None and info.status == "closed"
        assert closers == [info.close_reason]
        assert len(store.get_updates(run_id, round_no)) == info.reported


# -- Redis only -----------------------------------------------------------------------------------------
def _process_worker(
    url: str, run_id: str, worker: int, calls: list[tuple[str, str]], barrier: Any, out: Any
) -> None:
    from lorafleet.state.redis import RedisStateStore

    store = RedisStateStore(url)  # its own pool, created in the child
    try:
        store.get_counters(run_id)  # connect (and load nothing) before the start line
        barrier.wait(timeout=60)
        started = time.perf_counter()
        results = _record_all(store, run_id, 1, worker, calls)
        elapsed = time.perf_counter() - started
        out.put(([(w, t, (r.outcome, r.reported, r.closed_now)) for w, t, r in results], elapsed))
    finally:
        store.close()


@pytest.mark.redis
@pytest.mark.slow
def test_processes_race_to_quorum_one_closer_exact_counts(redis_url: str, run_id: str) -> None:
    store = _redis_store(redis_url)
    ctx = multiprocessing.get_context("spawn")
    try:
        tasks = _tasks(200)
        assert store.open_round(run_id, 1, tasks, {}, 150, 10**9, 0)
        barrier, out = ctx.Barrier(4), ctx.Queue()
        procs = [
            ctx.Process(
                target=_process_worker,
                args=(redis_url, run_id, i, _shuffled_calls(tasks, seed=i), barrier, out),
            )
            for i in range(4)
        ]
        for p in procs:
            p.start()
        raw, times = zip(*[out.get(timeout=120) for _ in procs], strict=True)
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        results = [(w, t, RecordResult(*r)) for chunk in raw for w, t, r in chunk]
        assert len(results) == 4 * 225
        _check_race(store, run_id, 1, results, quorum=150)
        assert sum(store.get_counters(run_id).values()) == len(results)
        assert store.get_counters(run_id)["update_counted"] == 150
        print(f"\n4 processes x 225 record_update, slowest one after the barrier: {max(times) * 1000:.0f} ms")
    finally:
        store.delete_run(run_id)
        store.close()


@pytest.fixture
def redis_store(redis_url: str, run_id: str) -> Iterator[Any]:
    from lorafleet.state.redis import RedisStateStore

    store = RedisStateStore(redis_url)
    try:
        yield store
    finally:
        store.delete_run(run_id)
        store.close()


@pytest.mark.redis
def test_replayed_calls_return_the_first_answer(redis_store: Any, run_id: str) -> None:
    """A pool retry resends a script whose reply was lost: same nonce, so same answer and no second effect."""
    s = redis_store
    _open(s, run_id, 1, n=3, quorum=2)
    first = s._record(run_id, 1, "t0", "d0", b"a", 5, "n1")
    assert s._record(run_id, 1, "t0", "d0", b"a", 5, "n1") == first == RecordResult("counted", 1, False)
    closing = s._record(run_id, 1, "t1", "d1", b"b", 6, "n2")
    assert closing == RecordResult("counted", 2, True)
    assert s._record(run_id, 1, "t1", "d1", b"b", 6, "n2") == closing  # closed_now is not lost
    assert s._record(run_id, 1, "t1", "d1", b"b", 6, "n3") == RecordResult("duplicate", 2, False)
    assert s.get_counters(run_id) == {"update_counted": 2, "update_duplicate": 1}
    _open(s, run_id, 2, deadline_ms=100)
    assert s._close_expired_with(run_id, 100, "c1") == [2]
    assert s._close_expired_with(run_id, 100, "c1") == []  # candidates gone from the deadline index
    assert s._mark_with(run_id, 2, 3, "m1") is True
    assert s._mark_with(run_id, 2, 3, "m1") is True
    assert s._mark_with(run_id, 2, 3, "m2") is False
    assert s.mark_aggregated(run_id, 1, 4) is True
    assert s.pending_aggregations(run_id) == []


@pytest.mark.redis
def test_close_expired_replay_with_same_candidates(redis_store: Any, run_id: str) -> None:
    """The script's replay path: same KEYS/ARGV resent after the first run closed the rounds."""
    from lorafleet.state import keys

    s = redis_store
    _open(s, run_id, 1, deadline_ms=100)
    _open(s, run_id, 2, deadline_ms=100)
    args = dict(
        keys=[keys.open_deadlines(run_id), keys.pending_aggregations(run_id)]
        + [keys.round_state(run_id, n) for n in (1, 2)],
        args=[100, "nonce-a", 1, 2],
    )
    assert sorted(s._close_expired(**args)) == [b"1", b"2"]
    assert sorted(s._close_expired(**args)) == [b"1", b"2"]  # the replay reports what it closed
    args["args"] = [100, "nonce-b", 1, 2]
    assert s._close_expired(**args) == []  # another caller gets nothing


@pytest.mark.redis
def test_redis_errors_become_state_store_errors() -> None:
    from lorafleet.state.redis import RedisStateStore

    dead = RedisStateStore("redis://127.0.0.1:1/0", socket_connect_timeout=0.2, outage_s=0.1)
    try:
        with pytest.raises(StateStoreError):
            dead.get_run_fields("x")
        with pytest.raises(StateStoreError):
            dead.record_update("x", 1, "t", "d", b"u", 0)
        with pytest.raises(StateStoreError):
            dead.delete_run("x")
    finally:
        dead.close()


@pytest.mark.redis
def test_the_outage_retry_is_configured_on_the_pool(redis_store: Any) -> None:
    from lorafleet.state.redis import OUTAGE_S

    conn = redis_store._r.connection_pool.get_connection()
    try:
        assert conn.retry.outage_s == OUTAGE_S  # every command, scripts included, rides out an outage
    finally:
        redis_store._r.connection_pool.release(conn)


@pytest.mark.redis
def test_from_client_rejects_decoded_responses(redis_url: str) -> None:
    import redis

    from lorafleet.state.redis import RedisStateStore

    with pytest.raises(ValueError):
        RedisStateStore.from_client(redis.Redis.from_url(redis_url, decode_responses=True))
    client = redis.Redis.from_url(redis_url)
    try:
        store = RedisStateStore.from_client(client)
        rid = f"t-{uuid.uuid4().hex[:12]}"
        store.put_run_field(rid, "a", 1)
        assert store.get_run_fields(rid) == {"a": 1}
        store.delete_run(rid)
    finally:
        client.close()


@pytest.mark.redis
def test_delete_run_leaves_no_key(redis_store: Any, run_id: str) -> None:
    from lorafleet.state import keys

    s = redis_store
    _open(s, run_id, 1, n=2, quorum=1)
    s.record_update(run_id, 1, "t0", "d0", b"u", 1)
    s.put_round_metrics(run_id, 1, {"a": 1})
    assert list(s._r.scan_iter(match=keys.run_pattern(run_id)))
    s.delete_run(run_id)
    assert list(s._r.scan_iter(match=keys.run_pattern(run_id))) == []


@pytest.mark.redis
def test_random_operation_sequences_match_the_twin(redis_store: Any, run_id: str) -> None:
    """Differential check: the same random sequence of calls gives the same answers on both stores."""
    twin = InMemoryStateStore()
    rng = random.Random(1234)
    ops = ["open", "sweep", "mark", "metrics", "global", "counter"] + ["record"] * 6
    for step in range(600):
        op, now = rng.choice(ops), step * 10
        rnd = rng.randint(max(1, step // 50), step // 50 + 2)  # a few rounds in flight at a time
        call: Callable[[StateStore], Any]
        if op == "open":
            n, q, dl = rng.randint(0, 6), rng.randint(1, 5), now + rng.randint(20, 600)
            call = lambda s, rnd=rnd, n=n, q=q, dl=dl, now=now: s.open_round(  # noqa: E731
                run_id, rnd, _tasks(n, devices=3), {}, q, dl, now
            )
        elif op == "record":
            i = rng.randint(0, 6)
            t, d, b = f"t{i}", f"d{i % 3 if rng.random() < 0.85 else 3}", rng.randbytes(rng.randint(0, 8))
            call = lambda s, rnd=rnd, t=t, d=d, b=b, now=now: s.record_update(run_id, rnd, t, d, b, now)  # noqa: E731
        elif op == "sweep":
            call = lambda s, now=now: s.close_expired_rounds(run_id, now)  # noqa: E731
        elif op == "mark":
            call = lambda s, rnd=rnd, step=step: s.mark_aggregated(run_id, rnd, step)  # noqa: E731
        elif op == "metrics":
            m = {rng.choice("abc"): rng.random()}
            call = lambda s, rnd=rnd, m=m: s.put_round_metrics(run_id, rnd, m)  # noqa: E731
        elif op == "global":
            v, data = rng.randint(0, 5), rng.randbytes(3)
            call = lambda s, v=v, data=data: s.put_global_adapter(run_id, v, data)  # noqa: E731
        else:
            call = lambda s: s.incr_counter(run_id, "c", 2)  # noqa: E731
        assert call(redis_store) == call(twin), (step, op)
    counters = twin.get_counters(run_id)
    assert all(counters.get(f"update_{o}", 0) >= 5 for o in OUTCOMES), counters  # not vacuous
    infos = [twin.get_round(run_id, n) for n in twin.list_rounds(run_id)]
    assert {(i.status, i.close_reason) for i in infos if i is not None} >= {
        ("aggregated", "quorum"), ("aggregated", "deadline"), ("open", None)
    }  # fmt: skip
    assert redis_store.list_rounds(run_id) == twin.list_rounds(run_id)
    for n in twin.list_rounds(run_id):
        assert redis_store.get_round(run_id, n) == twin.get_round(run_id, n)
        assert redis_store.get_updates(run_id, n) == twin.get_updates(run_id, n)
    assert redis_store.pending_aggregations(run_id) == twin.pending_aggregations(run_id)
    assert redis_store.get_global_adapter(run_id) == twin.get_global_adapter(run_id)
    assert redis_store.get_round_metrics(run_id) == twin.get_round_metrics(run_id)
    assert redis_store.get_counters(run_id) == twin.get_counters(run_id)


# -- static ---------------------------------------------------------------------------------------------
def test_only_the_redis_adapter_imports_redis() -> None:
    root = Path(__file__).resolve().parents[2]
    skip = {"tests", "build", "dist", "node_modules"}
    paths = [p for p in root.glob("*.py")]
    for top in root.iterdir():
        if top.is_dir() and not top.name.startswith((".", "_")) and top.name not in skip:
            paths += top.rglob("*.py")
    offenders = []
    for path in paths:
        rel = path.relative_to(root)
        if rel == Path("lorafleet/state/redis.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(rel))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            if any(n == "redis" or n.startswith("redis.") for n in names):
                offenders.append(str(rel))
    assert offenders == [], f"only lorafleet/state/redis.py may import redis: {offenders}"


# -- snapshots --------------------------------------------------------------------------------------------
def _observed(store: StateStore, run_id: str) -> dict[str, Any]:
    """Everything the protocol shows of a run."""
    return {
        "fields": store.get_run_fields(run_id),
        "devices": store.get_devices(run_id),
        "rounds": {r: store.get_round(run_id, r) for r in store.list_rounds(run_id)},
        "updates": {r: store.get_updates(run_id, r) for r in store.list_rounds(run_id)},
        "pending": store.pending_aggregations(run_id),
        "global": store.get_global_adapter(run_id),
        "group": store.get_group_adapter(run_id, 1),
        "global_rounds": {g: store.get_global_round(run_id, g) for g in store.list_global_rounds(run_id)},
        "metrics": store.get_round_metrics(run_id),
        "counters": store.get_counters(run_id),
        "expired": store.expired_devices(run_id, 5_000),
    }


def test_an_imported_snapshot_brings_back_exactly_the_exported_run(store: StateStore, run_id: str) -> None:
    # Given a run with every kind of record
    store.put_run_field(run_id, "epoch", "e1")
    store.register_device(run_id, "d0", {"num_samples": 10})
    store.touch_device(run_id, "d0", 4_000)
    tasks = _open(store, run_id, 1, n=3, quorum=2)
    for task, device in list(tasks.items())[:2]:
        store.record_update(run_id, 1, task, device, b"\x00\xffbody", 1_500)
    assert store.pending_aggregations(run_id) == [1]
    store.mark_aggregated(run_id, 1, 1)
    store.put_global_adapter(run_id, 1, b"adapter-1")
    store.put_group_adapter(run_id, 1, 3, b"group")
    store.open_global_round(run_id, 1, {1: 2})
    store.put_round_metrics(run_id, 1, {"accuracy": 0.5, "devices": {"d0": {"x": 1.25}}})
    store.incr_counter(run_id, "update_counted", 2)
    _open(store, run_id, 2, n=3, quorum=3)
    snapshot = store.export_run(run_id)
    before = _observed(store, run_id)
    # When the run moves on, and is then lost, and the snapshot is imported
    store.record_update(run_id, 2, "t0", "d0", b"later", 2_000)
    store.put_global_adapter(run_id, 2, b"adapter-2")
    store.incr_counter(run_id, "update_counted")
    store.put_run_field(run_id, "round", 3)
    store.delete_run(run_id)
    store.put_run_field(run_id, "written_after_the_loss", True)
    store.import_run(run_id, snapshot)
    # Then the store shows the run exactly as it was exported, and nothing written since
    assert _observed(store, run_id) == before
    # ... and it goes on from there as before (round 2 still counts its first update)
    assert store.record_update(run_id, 2, "t0", "d0", b"later", 2_000).outcome == "counted"


def test_import_refuses_what_is_not_a_snapshot_of_the_run(store: StateStore, run_id: str) -> None:
    store.put_run_field(run_id, "epoch", "e1")
    snapshot = store.export_run(run_id)
    for blob in (b"", b"not a snapshot", snapshot[: len(snapshot) // 2]):
        with pytest.raises(StateStoreError):
            store.import_run(run_id, blob)
    with pytest.raises(StateStoreError):
        store.import_run(run_id + "-other", snapshot)
    assert store.get_run_fields(run_id) == {"epoch": "e1"}  # a refused import changed nothing


def test_a_memory_snapshot_cannot_carry_code() -> None:
    import pickle

    from lorafleet.state.memory import _SNAPSHOT_TAG

    hostile = _SNAPSHOT_TAG + pickle.dumps(print)
    with pytest.raises(StateStoreError, match=r"may not hold builtins\.print"):
        InMemoryStateStore().import_run("run", hostile)
