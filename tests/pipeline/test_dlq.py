"""``lorafleet dlq``: list and count dead letters by reason without losing them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from lorafleet.app.dlq import count_by_reason, inspect_dead_letters
from lorafleet.transport import topology
from lorafleet.transport.base import (
    ORIGIN_QUEUE_HEADER,
    REASON_HEADER,
    ExchangeSpec,
    QueueSpec,
    Subscription,
    Transport,
)
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport


def _dead_letters(transport: InMemoryTransport, reasons: list[str]) -> None:
    topology.declare_static_topology(transport)
    for i, _ in enumerate(reasons):
        transport.publish(topology.UPDATES_EXCHANGE, topology.UPDATE_KEY, b"x" * (i + 1), message_id=f"m{i}")
    sub = transport.subscribe(topology.UPDATES_QUEUE, prefetch=len(reasons))
    for reason in reasons:
        delivery = sub.get(1.0)
        assert delivery is not None
        delivery.dead_letter(reason, f"detail of {reason}")
    sub.close()


def test_inspecting_counts_by_reason_and_leaves_the_messages() -> None:
    transport = InMemoryTransport(InMemoryBroker())
    _dead_letters(transport, ["non_finite", "undecodable", "non_finite"])
    letters = inspect_dead_letters(transport, wait_s=0.2)
    assert count_by_reason(letters) == {"non_finite": 2, "undecodable": 1}
    assert {x.queue for x in letters} == {topology.UPDATES_QUEUE}
    assert transport.queue_depth(topology.DEAD_LETTER_QUEUE) == 3  # still there
    purged = inspect_dead_letters(transport, purge=True, wait_s=0.2)
    assert len(purged) == 3 and transport.queue_depth(topology.DEAD_LETTER_QUEUE) == 0


def test_the_cli_lists_the_real_dead_letter_queue(rabbitmq_url: str) -> None:
    from lorafleet.transport.rabbitmq import PikaTransport

    transport = PikaTransport(rabbitmq_url)
    try:
        topology.declare_static_topology(transport)
        transport.publish(topology.UPDATES_EXCHANGE, topology.UPDATE_KEY, b"garbage", message_id="bad-1")
        sub = transport.subscribe(topology.UPDATES_QUEUE)
        delivery = sub.get(5.0)
        assert delivery is not None
        delivery.dead_letter("undecodable", "not msgpack")
        sub.close()
        out = subprocess.run(
            [sys.executable, "-m", "lorafleet", "dlq", "--broker", rabbitmq_url, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        listing = json.loads(out.stdout)
        assert listing["by_reason"] == {"undecodable": 1}
        assert listing["messages"][0]["message_id"] == "bad-1"
        assert transport.queue_depth(topology.DEAD_LETTER_QUEUE) == 1
    finally:
        transport.close()


# -- counting: every message exactly once, however many there are -------------------------------------

MANY = 2_500
REASONS = ("non_finite", "undecodable", "shape_mismatch")


def _publish_dead_letters(transport: Transport, count: int, *, first: int = 0) -> None:
    """``count`` dead letters as a service writes them (``Delivery.dead_letter`` publishes to the DLX)."""
    for i in range(first, first + count):
        transport.publish(
            topology.DEAD_LETTER_EXCHANGE,
            f"update.dev-{i % 7:04d}",
            b"x" * (i % 5 + 1),
            message_id=f"dead-{i}",
            headers={REASON_HEADER: REASONS[i % 3], ORIGIN_QUEUE_HEADER: topology.UPDATES_QUEUE},
        )


def _wait_for_depth(transport: Transport, depth: int, timeout_s: float = 30.0) -> None:
    """Returned deliveries reach the queue again shortly after their consumer closes."""
    deadline = time.monotonic() + timeout_s
    while transport.queue_depth(topology.DEAD_LETTER_QUEUE) != depth:
        assert time.monotonic() < deadline, transport.queue_depth(topology.DEAD_LETTER_QUEUE)
        time.sleep(0.05)


def _check_counts_each_once_and_leaves_them(transport: Transport) -> None:
    topology.declare_static_topology(transport)
    _publish_dead_letters(transport, MANY)
    _wait_for_depth(transport, MANY)

    letters = inspect_dead_letters(transport)
    assert len(letters) == MANY
    assert sorted(x.message_id for x in letters) == sorted(f"dead-{i}" for i in range(MANY))
    expected = {reason: MANY // 3 + (i < MANY % 3) for i, reason in enumerate(REASONS)}
    assert count_by_reason(letters) == expected
    _wait_for_depth(transport, MANY)  # looking is harmless: every message is still there

    # A second look sees the same; --purge then removes exactly what it listed.
    assert len(inspect_dead_letters(transport)) == MANY
    _wait_for_depth(transport, MANY)
    assert len(inspect_dead_letters(transport, purge=True)) == MANY
    _wait_for_depth(transport, 0)


class _PublishWhileListing:
    """The transport, plus a publisher of 500 more dead letters that starts as the listing subscribes
    (after it has read the queue's depth), so they arrive while it reads."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.publisher = threading.Thread(
            target=_publish_dead_letters, args=(transport, 500), kwargs={"first": MANY}
        )

    def declare_exchange(self, spec: ExchangeSpec) -> None:
        self.transport.declare_exchange(spec)

    def declare_queue(self, spec: QueueSpec) -> None:
        self.transport.declare_queue(spec)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
    ) -> None:
        self.transport.publish(exchange, routing_key, body, message_id=message_id, headers=headers)

    def subscribe(self, queue: str, *, prefetch: int = 1) -> Subscription:
        subscription = self.transport.subscribe(queue, prefetch=prefetch)
        if not self.publisher.is_alive() and self.publisher.ident is None:
            self.publisher.start()
        return subscription

    def queue_depth(self, queue: str) -> int:
        return self.transport.queue_depth(queue)

    def purge(self, queue: str) -> int:
        return self.transport.purge(queue)

    def close(self) -> None:
        self.transport.close()


def _check_concurrent_publishers_do_not_change_the_count(transport: Transport) -> None:
    """What is listed is what was in the queue when the listing started, each message once; dead
    letters arriving meanwhile stay, unlisted (and untouched by --purge)."""
    topology.declare_static_topology(transport)
    _publish_dead_letters(transport, MANY)
    _wait_for_depth(transport, MANY)
    concurrent = _PublishWhileListing(transport)
    try:
        letters = inspect_dead_letters(concurrent, purge=True)
    finally:
        if concurrent.publisher.ident is not None:
            concurrent.publisher.join()
    assert concurrent.publisher.ident is not None
    assert sorted(x.message_id for x in letters) == sorted(f"dead-{i}" for i in range(MANY))
    _wait_for_depth(transport, 500)


def test_inspecting_2500_dead_letters_counts_each_once_in_process() -> None:
    _check_counts_each_once_and_leaves_them(InMemoryTransport(InMemoryBroker()))


def test_concurrent_dead_letters_are_not_counted_twice_in_process() -> None:
    _check_concurrent_publishers_do_not_change_the_count(InMemoryTransport(InMemoryBroker()))


@pytest.mark.rabbitmq
def test_inspecting_2500_dead_letters_counts_each_once_on_rabbitmq(rabbitmq_url: str) -> None:
    from lorafleet.transport.rabbitmq import PikaTransport

    transport = PikaTransport(rabbitmq_url)
    try:
        _check_counts_each_once_and_leaves_them(transport)
    finally:
        transport.close()


@pytest.mark.rabbitmq
def test_concurrent_dead_letters_are_not_counted_twice_on_rabbitmq(rabbitmq_url: str) -> None:
    from lorafleet.transport.rabbitmq import PikaTransport

    transport = PikaTransport(rabbitmq_url)
    try:
        _check_concurrent_publishers_do_not_change_the_count(transport)
    finally:
        transport.close()
