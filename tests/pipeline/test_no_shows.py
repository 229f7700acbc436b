"""A device that holds its task without reporting shortens its own next deadline, not everyone's."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from lorafleet.state.base import StateStore
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport.base import Transport
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from orchestrator.no_shows import next_no_shows, task_deadlines_ms
from tests.pipeline.helpers import build_pipeline, make_config


def test_a_device_is_a_no_show_only_when_its_round_closed_on_its_deadline_without_its_report() -> None:
    tasks = {"t0": "d0", "t1": "d1", "t2": "d2"}
    # d1 reported, d2 did not, in a round that closed on its deadline: d2 is marked
    assert next_no_shows(set(), tasks, {"t0": b"u", "t1": b"u"}, "deadline") == {"d2"}
    # a round that closed on quorum marks nobody (d2 may only be slow)
    assert next_no_shows(set(), tasks, {"t0": b"u", "t1": b"u"}, "quorum") == set()
    # a report clears the mark; a task counted empty for its short deadline keeps it
    assert next_no_shows({"d0", "d2"}, tasks, {"t0": b"u", "t1": b"u", "t2": b""}, "quorum") == {"d2"}
    assert task_deadlines_ms(tasks, {"d2"}, 1_000, 0.25) == {"t2": 1_250}


@pytest.fixture(params=["memory", pytest.param("real", marks=[pytest.mark.rabbitmq, pytest.mark.redis])])
def servers(request: pytest.FixtureRequest, run_id: str) -> Iterator[tuple[list[Transport], StateStore]]:
    """The in-process twins, or the real RabbitMQ and Redis (a transport per service)."""
    if request.param == "memory":
        broker = InMemoryBroker()
        yield [InMemoryTransport(broker) for _ in range(5)], InMemoryStateStore()
        return
    from lorafleet.state.redis import RedisStateStore
    from lorafleet.transport.rabbitmq import PikaTransport

    url = request.getfixturevalue("rabbitmq_url")
    state = RedisStateStore(request.getfixturevalue("redis_url"))
    transports: list[Transport] = [PikaTransport(url) for _ in range(5)]
    try:
        yield transports, state
    finally:
        for transport in transports:
            transport.close()
        state.delete_run(run_id)
        state.close()


def test_a_no_show_device_gets_a_short_deadline_and_the_rounds_after_close_on_quorum(
    run_id: str, servers: tuple[list[Transport], StateStore]
) -> None:
    # Given three devices, of which dev-0002 registers and keeps its lease but never trains its tasks
    config = make_config(
        run_id, devices=3, rounds=3, round_deadline_s=3.0, no_show_deadline_s=0.3, lease_s=120.0
    )
    transports, state = servers
    pipeline = build_pipeline(config, transports, state, deltas=[0.1, 0.3, 0.5], samples=[1, 2, 3])
    stop = threading.Event()
    threads = [
        threading.Thread(target=s.run_forever, args=(stop,), kwargs={"poll_s": 0.05}, daemon=True)
        for s in pipeline.services[:4]  # the orchestrator, the aggregator, dev-0000 and dev-0001
    ]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (pipeline.orchestrator.finished and pipeline.aggregator.finished):
            assert time.monotonic() < deadline, "the run did not finish"
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    # Then round 1 waited for its deadline (nobody knew dev-0002 would not report), but the rounds
    # after it gave dev-0002's task only its short deadline and closed on quorum, dev-0002 counted empty
    reasons = [state.get_round(run_id, r).close_reason for r in (1, 2, 3)]  # type: ignore[union-attr]
    assert reasons == ["deadline", "quorum", "quorum"], reasons
    assert state.get_counters(run_id)["task_no_show"] == 2
    assert state.get_run_fields(run_id)["no_shows"] == ["dev-0002"]
    for r in (2, 3):
        updates = state.get_updates(run_id, r)
        others = [body for task, body in updates.items() if not task.endswith("dev-0002")]
        assert updates[f"{run_id}:{r}:dev-0002"] == b"" and len(others) == 2 and all(others)
