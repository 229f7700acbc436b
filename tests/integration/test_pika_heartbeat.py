"""PikaTransport against the real RabbitMQ: long handling on the service thread, publishing from threads.

The subscription's connection lives on its own I/O thread, so a delivery held for several heartbeat
intervals on the service thread neither kills the connection nor gets the message redelivered.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from lorafleet.topology import TASKS_EXCHANGE, declare_static_topology, device_task_queue, task_queue_name
from lorafleet.transport.rabbitmq import PikaTransport

pytestmark = pytest.mark.rabbitmq

DEVICE = "dev-hb"
QUEUE = task_queue_name(DEVICE)
HEARTBEAT_S = 2
HOLD_S = 9.0  # more than three heartbeat intervals; the broker gives up after about two to three


def _vhost(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def _negotiated_heartbeats(vhost: str) -> list[int]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "vhost", "timeout"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    return [int(timeout) for name, timeout in rows if name == vhost]


@pytest.fixture
def transport(rabbitmq_url: str) -> Iterator[PikaTransport]:
    url = rabbitmq_url.replace("heartbeat=30", f"heartbeat={HEARTBEAT_S}")
    assert f"heartbeat={HEARTBEAT_S}" in url
    t = PikaTransport(url, max_reconnect_s=10.0)
    declare_static_topology(t)
    t.declare_queue(device_task_queue(DEVICE))
    try:
        yield t
    finally:
        t.close()


def test_holding_a_delivery_for_many_heartbeats_keeps_it(transport: PikaTransport, rabbitmq_url: str) -> None:
    transport.publish(TASKS_EXCHANGE, DEVICE, b"long task", message_id="task:long")
    sub = transport.subscribe(QUEUE, prefetch=1)
    delivery = sub.get(timeout=5.0)
    assert delivery is not None and delivery.message_id == "task:long"
    assert (delivery.redelivered, delivery.delivery_count) == (False, 0)
    heartbeats = _negotiated_heartbeats(_vhost(rabbitmq_url))
    assert heartbeats and set(heartbeats) == {HEARTBEAT_S}, heartbeats

    time.sleep(HOLD_S)  # the service thread "trains": no pika call at all from this thread
    delivery.ack()

    # Handed out exactly once: no redelivery on the same subscription, which never reconnected.
    assert sub.get(timeout=1.0) is None
    assert sub.connection_count == 1
    sub.close()
    # The ack took effect: nothing ready, nothing comes back to a fresh consumer.
    assert transport.queue_depth(QUEUE) == 0
    fresh = transport.subscribe(QUEUE)
    assert fresh.get(timeout=1.5) is None
    fresh.close()


def test_publishing_from_several_threads_while_consuming(transport: PikaTransport) -> None:
    per_thread = 15
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def publish_batch(name: str) -> None:
        try:
            start.wait(timeout=10)
            for i in range(per_thread):
                transport.publish(TASKS_EXCHANGE, DEVICE, f"{name}-{i}".encode(), message_id=f"{name}-{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    sub = transport.subscribe(QUEUE, prefetch=5)
    threads = [threading.Thread(target=publish_batch, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    start.wait(timeout=10)
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while len(seen) < 2 * per_thread and time.monotonic() < deadline:
        delivery = sub.get(timeout=1.0)
        if delivery is not None:
            assert delivery.body.decode() == delivery.message_id
            seen.append(delivery.message_id)
            delivery.ack()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert sorted(seen) == sorted(f"{n}-{i}" for n in ("a", "b") for i in range(per_thread))
    for name in ("a", "b"):  # each publisher's own order is kept
        mine = [m for m in seen if m.startswith(f"{name}-")]
        assert mine == [f"{name}-{i}" for i in range(per_thread)]
    assert sub.get(timeout=0.5) is None
    sub.close()
