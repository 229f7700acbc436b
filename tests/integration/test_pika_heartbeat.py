"""PikaTransport against the real RabbitMQ: connection liveness.

The subscription's connection lives on its own I/O thread, so a delivery held for several heartbeat
intervals on the service thread neither kills the connection nor gets the message redelivered.
Publishing works from several threads at once, and a connection the broker closes is re-established
(the held delivery's stale ack is skipped; the broker redelivers the message).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from lorafleet.transport.base import TransportClosed, TransportError
from lorafleet.transport.rabbitmq import PikaTransport
from lorafleet.transport.topology import (
    TASKS_EXCHANGE,
    declare_static_topology,
    device_task_queue,
    task_queue_name,
)

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


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_subscription_reconnects_when_the_broker_closes_its_connection(
    transport: PikaTransport, rabbitmq_url: str
) -> None:
    transport.publish(TASKS_EXCHANGE, DEVICE, b"t", message_id="task:held")
    sub = transport.subscribe(QUEUE)
    held = sub.get(timeout=5.0)
    assert held is not None and held.message_id == "task:held"
    assert sub.live_connection == 1

    vhost = _vhost(rabbitmq_url)
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "vhost"], check=True, capture_output=True, text=True
    ).stdout
    pids = [line.split("\t")[0] for line in out.splitlines() if line.endswith(f"\t{vhost}")]
    assert pids
    for pid in pids:  # the consumer's and this thread's publishing connection
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "test"], check=True, capture_output=True
        )

    _wait_for(lambda: sub.connection_count == 2)
    assert sub.live_connection == 2  # the gap shows: a service can tell it was cut off
    held.ack()  # its channel is gone: skipped, never sent on the new channel
    again = sub.get(timeout=5.0)
    assert again is not None and again.message_id == "task:held"
    assert (again.redelivered, again.delivery_count) == (True, 1)
    again.ack()
    # The publishing connection was closed too; the next publish reconnects by itself.
    transport.publish(TASKS_EXCHANGE, DEVICE, b"t", message_id="task:after")
    after = sub.get(timeout=5.0)
    assert after is not None and after.message_id == "task:after"
    after.ack()
    assert sub.get(timeout=0.5) is None
    sub.close()


def test_subscription_reports_a_vhost_that_went_away(transport: PikaTransport, rabbitmq_url: str) -> None:
    sub = transport.subscribe(QUEUE)
    subprocess.run(
        ["rabbitmqctl", "-q", "delete_vhost", _vhost(rabbitmq_url)], check=True, capture_output=True
    )
    deadline = time.monotonic() + 15.0
    with pytest.raises(TransportError):
        while time.monotonic() < deadline:
            sub.get(timeout=0.5)
    sub.close()


class _Proxy:
    """A TCP relay to RabbitMQ that a test can cut (the broker "goes away") and start again."""

    def __init__(self, port: int = 0) -> None:
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", 5672))
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _via(proxy: _Proxy, rabbitmq_url: str) -> PikaTransport:
    url = rabbitmq_url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}")
    return PikaTransport(url, connection_attempts=1, retry_delay=0.1, socket_timeout=1.0, max_reconnect_s=2.5)


def test_subscription_and_publish_give_up_when_the_broker_stays_away(
    transport: PikaTransport, rabbitmq_url: str
) -> None:
    proxy = _Proxy()
    remote = _via(proxy, rabbitmq_url)
    try:
        remote.publish(TASKS_EXCHANGE, DEVICE, b"t", message_id="task:cut")
        sub = remote.subscribe(QUEUE)
        held = sub.get(timeout=5.0)
        assert held is not None
        proxy.stop()
        deadline = time.monotonic() + 20.0
        with pytest.raises(TransportClosed):
            while time.monotonic() < deadline:
                sub.get(timeout=0.5)
        held.ack()  # stale: silently skipped
        with pytest.raises(TransportClosed):
            remote.publish(TASKS_EXCHANGE, DEVICE, b"t", message_id="task:lost")
    finally:
        remote.close()
        proxy.stop()
    # Nothing was lost: the broker put the held message back.
    _wait_for(lambda: transport.queue_depth(QUEUE) == 1)


def test_subscription_recovers_when_the_broker_comes_back(
    transport: PikaTransport, rabbitmq_url: str
) -> None:
    proxy = _Proxy()
    remote = _via(proxy, rabbitmq_url)
    try:
        transport.publish(TASKS_EXCHANGE, DEVICE, b"t", message_id="task:restart")
        sub = remote.subscribe(QUEUE)
        held = sub.get(timeout=5.0)
        assert held is not None
        proxy.stop()
        time.sleep(0.5)  # the broker is "down" for a moment
        proxy = _Proxy(proxy.port)
        again = sub.get(timeout=10.0)
        assert again is not None and again.message_id == "task:restart"
        assert (again.redelivered, sub.connection_count) == (True, 2)
        held.ack()  # the first copy's channel is gone: skipped
        again.ack()
        assert sub.get(timeout=0.5) is None
        sub.close()
    finally:
        remote.close()
        proxy.stop()
    assert transport.queue_depth(QUEUE) == 0
