"""Hostile devices on the real RabbitMQ and Redis: a made-up device, an inflated sample count.

The services run in this process (one thread each, each with its own connections) with fake
trainers whose updates are exactly checkable: the global adapter after the run must be exactly
what the honest devices make.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from lorafleet.state.redis import RedisStateStore
from lorafleet.transport import topology
from lorafleet.transport.base import dead_letter_reason
from lorafleet.transport.rabbitmq import PikaTransport
from orchestrator.planners.specs import global_spec
from schemas.envelope import encode
from schemas.messages import DeviceRegistered, Heartbeat, TrainTask
from schemas.tensors import tensors_from_bytes
from tests.pipeline.helpers import NUM_BLOCKS, Pipeline, build_pipeline, expected_global, make_config
from worker.trainer import FakeTrainer, TrainOutcome

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis]

FLEET = b"fleet-key-of-the-hostile-tests-0123"


@pytest.fixture
def servers(rabbitmq_url: str, redis_url: str, run_id: str) -> Iterator[tuple[str, RedisStateStore]]:
    state = RedisStateStore(redis_url)
    yield rabbitmq_url, state
    state.delete_run(run_id)
    state.close()


def _dead_letters(url: str) -> list[str]:
    transport = PikaTransport(url)
    try:
        subscription = transport.subscribe(topology.DEAD_LETTER_QUEUE, prefetch=100)
        reasons = []
        while (delivery := subscription.get(0.5)) is not None:
            reasons.append(dead_letter_reason(delivery.headers))
            delivery.ack()
        return sorted(reasons)
    finally:
        transport.close()


def _assert_global_is_the_honest_one(pipeline: Pipeline, state: RedisStateStore, expected: Any) -> None:
    stored = state.get_global_adapter(pipeline.config.run_id)
    assert stored is not None
    got = tensors_from_bytes(stored[1])
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.timeout(120)
def test_a_made_up_device_cannot_register_or_hold_a_round(
    servers: tuple[str, RedisStateStore], run_id: str
) -> None:
    url, state = servers
    # Given a run of two devices whose rounds wait for every task (quorum 1.0, deadline 900 s)
    config = make_config(run_id, devices=2, rounds=2)
    deltas, samples = [0.1, 0.3], [10, 30]
    pipeline = build_pipeline(
        config, [PikaTransport(url) for _ in range(4)], state, deltas=deltas, samples=samples
    )
    # When a device that is not one of the run's slots registers and heartbeats before round 1
    ghost = PikaTransport(url)
    try:
        register = DeviceRegistered(run_id=run_id, device_id="ghost-7", num_samples=10**6)
        beat = Heartbeat(run_id=run_id, device_id="ghost-7", seq=1)
        for key, message in ((topology.REGISTER_KEY, register), (topology.HEARTBEAT_KEY, beat)):
            ghost.publish(topology.CONTROL_EXCHANGE, key, encode(message), message_id=message.message_id)
        pipeline.run_threaded()
    finally:
        ghost.close()
    # Then it is refused (dead-lettered, named), never planned, and the rounds close on quorum
    assert _dead_letters(url) == ["unknown_device", "unknown_device"]
    assert "ghost-7" not in state.get_devices(run_id)
    for round_no in (1, 2):
        info = state.get_round(run_id, round_no)
        assert info is not None and sorted(info.tasks.values()) == ["dev-0000", "dev-0001"]
        assert info.close_reason == "quorum"
    expected = expected_global(global_spec(config, NUM_BLOCKS), 2, deltas, samples)
    _assert_global_is_the_honest_one(pipeline, state, expected)


class Inflating:
    """A compromised device: trains honestly, then claims 10**15 samples and scales its change by 50."""

    def __init__(self, inner: FakeTrainer) -> None:
        self.inner = inner

    def train(self, task: TrainTask, start: dict[str, Any]) -> TrainOutcome:
        outcome = self.inner.train(task, start)
        inflated = {k: start[k] + 50.0 * (v - start[k]) for k, v in outcome.tensors.items()}
        return TrainOutcome(inflated, outcome.metrics, 10**15)


@pytest.mark.timeout(120)
def test_an_update_claiming_more_samples_than_its_device_registered_is_refused(
    servers: tuple[str, RedisStateStore], run_id: str
) -> None:
    url, state = servers
    # Given three signed devices, rounds closing at 2 of 3 (quorum 0.6); dev-0002 is compromised
    config = make_config(
        run_id, devices=3, rounds=2, extra={"security": {"require_signatures": True}}, quorum_fraction=0.6
    )
    deltas, samples = [0.1, 0.3, 0.2], [10, 30, 20]
    pipeline = build_pipeline(
        config, [PikaTransport(url) for _ in range(5)], state, deltas=deltas, samples=samples, fleet_key=FLEET
    )
    evil = pipeline.workers[2]
    evil.trainer = Inflating(evil.trainer)  # type: ignore[arg-type]
    # When the run goes
    pipeline.run_threaded()
    # Then its signed updates are refused for claiming more samples than it registered (20), with a
    # counter, and the global adapter is exactly the honest devices' (before: counted, and it weighed
    # 10**15 samples: the global adapter became its inflated one)
    refused = _dead_letters(url)  # its round-2 update may come after the run ended: one or two
    assert set(refused) == {"samples_exceeded"} and 1 <= len(refused) <= 2
    assert state.get_counters(run_id)["rejected_samples_exceeded"] == len(refused)
    expected = expected_global(global_spec(config, NUM_BLOCKS), 2, deltas[:2], samples[:2])
    _assert_global_is_the_honest_one(pipeline, state, expected)
