"""One contract, two transports: the in-process twin must behave like RabbitMQ through PikaTransport.

Every test runs against ``InMemoryTransport`` and against ``PikaTransport`` on a fresh vhost of the
real broker. A test never branches on the backend; where the real broker is asynchronous (an ack or a
requeue travels to the broker after the call returns), the assertions wait with ``get(timeout)``.

Known difference, not covered here: with ``prefetch > 1`` RabbitMQ pushes up to ``prefetch``
messages to the subscription's client-side buffer; closing the subscription returns the ones the
service never took with ``redelivered=True`` and the quorum queue's delivery count raised by one.
The twin hands messages out only on ``get``, so those come back untouched. Hence the close test
uses ``prefetch=1``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lorafleet.transport.base import (
    DETAIL_HEADER,
    ORIGIN_EXCHANGE_HEADER,
    ORIGIN_QUEUE_HEADER,
    ORIGIN_ROUTING_KEY_HEADER,
    REASON_HEADER,
    Delivery,
    ExchangeNotFound,
    QueueNotFound,
    QueueSpec,
    Subscription,
    Transport,
    TransportClosed,
    TransportError,
    Unroutable,
    dead_letter_reason,
)
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from lorafleet.transport.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVAL_EXCHANGE,
    EVAL_KEY,
    TASKS_EXCHANGE,
    UPDATE_KEY,
    UPDATES_EXCHANGE,
    UPDATES_QUEUE,
    declare_static_topology,
    device_eval_queue,
    eval_queue_name,
)

KEY = "contract"
QUEUE = QueueSpec(
    "lf.tasks.contract",
    ((TASKS_EXCHANGE, KEY),),
    dead_letter_exchange=DEAD_LETTER_EXCHANGE,
    delivery_limit=2,
)
WAIT = 5.0  # upper bound for something that should arrive; a passing test never waits this long
QUIET = 0.5  # how long "nothing arrives" is watched


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    t: Transport
    if request.param == "memory":
        t = InMemoryTransport(InMemoryBroker())
    else:
        from lorafleet.transport.rabbitmq import PikaTransport

        t = PikaTransport(request.getfixturevalue("rabbitmq_url"), max_reconnect_s=5.0)
    declare_static_topology(t)
    t.declare_queue(QUEUE)
    try:
        yield t
    finally:
        t.close()


def _publish(t: Transport, message_id: str, body: bytes | None = None, **headers: object) -> None:
    t.publish(
        TASKS_EXCHANGE,
        KEY,
        body if body is not None else message_id.encode(),
        message_id=message_id,
        headers=dict(headers),
    )


def _get(sub: Subscription) -> Delivery:
    delivery = sub.get(timeout=WAIT)
    assert delivery is not None, "expected a delivery"
    return delivery


def test_roundtrip_preserves_body_id_headers_and_route(transport: Transport) -> None:
    body = bytes(range(256)) * 3
    headers = {"kind": "train_task", "attempt": 3, "flag": True, "nested": {"round": 7}}
    transport.publish(TASKS_EXCHANGE, KEY, body, message_id="task:1", headers=headers)
    sub = transport.subscribe(QUEUE.name)
    d = _get(sub)
    assert d.body == body
    assert d.message_id == "task:1"
    assert d.headers == headers
    assert (d.exchange, d.routing_key) == (TASKS_EXCHANGE, KEY)
    assert (d.redelivered, d.delivery_count) == (False, 0)
    d.ack()
    sub.close()


def test_get_returns_none_after_timeout_on_empty_queue(transport: Transport) -> None:
    sub = transport.subscribe(QUEUE.name)
    assert sub.get() is None
    start = time.monotonic()
    assert sub.get(timeout=0.3) is None
    assert time.monotonic() - start >= 0.25
    sub.close()
    with pytest.raises(TransportClosed):
        sub.get()


def test_fifo_order(transport: Transport) -> None:
    ids = [f"m{i}" for i in range(6)]
    for message_id in ids:
        _publish(transport, message_id)
    sub = transport.subscribe(QUEUE.name, prefetch=len(ids))
    got = []
    for _ in ids:
        d = _get(sub)
        got.append(d.message_id)
        d.ack()
    assert got == ids
    sub.close()


def test_ack_removes_the_message(transport: Transport) -> None:
    _publish(transport, "a")
    sub = transport.subscribe(QUEUE.name)
    _get(sub).ack()
    sub.close()
    again = transport.subscribe(QUEUE.name)
    assert again.get(timeout=QUIET) is None
    assert transport.queue_depth(QUEUE.name) == 0
    again.close()


def test_requeue_redelivers_with_count(transport: Transport) -> None:
    _publish(transport, "r")
    sub = transport.subscribe(QUEUE.name)
    first = _get(sub)
    assert (first.redelivered, first.delivery_count) == (False, 0)
    first.requeue()
    second = _get(sub)
    assert second.message_id == "r" and second.body == b"r"
    assert (second.redelivered, second.delivery_count) == (True, 1)
    assert second.headers.get("x-delivery-count") == 1  # the quorum queue's own header
    second.ack()
    assert sub.get(timeout=QUIET) is None
    sub.close()


def test_delivery_limit_sends_message_to_dead_letter_queue(transport: Transport) -> None:
    _publish(transport, "poison", kind="train_task")
    sub = transport.subscribe(QUEUE.name)
    counts = []
    for _ in range(3):  # delivery_limit=2: the first delivery and two redeliveries
        d = _get(sub)
        counts.append(d.delivery_count)
        d.requeue()
    assert counts == [0, 1, 2]
    assert sub.get(timeout=QUIET) is None
    sub.close()

    dead_sub = transport.subscribe(DEAD_LETTER_QUEUE)
    dead = _get(dead_sub)
    assert dead.message_id == "poison" and dead.body == b"poison"
    assert dead_letter_reason(dead.headers) == "delivery_limit"
    # What the broker records about the origin (RabbitMQ's own headers; the twin sets the same).
    assert dead.headers["x-first-death-queue"] == QUEUE.name
    assert dead.headers["x-first-death-exchange"] == TASKS_EXCHANGE
    assert dead.headers["kind"] == "train_task"
    assert (dead.exchange, dead.routing_key) == (DEAD_LETTER_EXCHANGE, KEY)
    dead.ack()
    dead_sub.close()


def test_dead_letter_moves_message_with_reason_and_origin(transport: Transport) -> None:
    _publish(transport, "bad", body=b"\xff\xfe", kind="train_task")
    sub = transport.subscribe(QUEUE.name)
    _get(sub).dead_letter("bad_input", "x" * 600)
    assert sub.get(timeout=QUIET) is None
    assert transport.queue_depth(QUEUE.name) == 0
    sub.close()

    dead_sub = transport.subscribe(DEAD_LETTER_QUEUE)
    dead = _get(dead_sub)
    assert dead.message_id == "bad" and dead.body == b"\xff\xfe"
    headers = dead.headers
    assert dead_letter_reason(headers) == "bad_input"
    assert headers[REASON_HEADER] == "bad_input"
    assert headers[DETAIL_HEADER] == "x" * 500
    assert headers[ORIGIN_QUEUE_HEADER] == QUEUE.name
    assert headers[ORIGIN_EXCHANGE_HEADER] == TASKS_EXCHANGE
    assert headers[ORIGIN_ROUTING_KEY_HEADER] == KEY
    assert headers["kind"] == "train_task"
    assert (dead.exchange, dead.routing_key) == (DEAD_LETTER_EXCHANGE, KEY)
    assert dead.delivery_count == 0
    dead.ack()
    assert dead_sub.get(timeout=QUIET) is None
    dead_sub.close()


def test_a_body_over_the_subscriptions_limit_is_handed_out_empty_with_its_size(transport: Transport) -> None:
    # Given messages at the limit, one byte over it, far over it (3 MB: many body frames) and a small
    # one after them, for a subscription that takes bodies of at most 1,000 bytes
    limit = 1_000
    far = bytes(range(256)) * 12_000
    bodies = {"at": b"a" * limit, "over": b"o" * (limit + 1), "far": far, "after": b"x"}
    for message_id, body in bodies.items():
        _publish(transport, message_id, body=body)
    sub = transport.subscribe(QUEUE.name, prefetch=4, max_body_bytes=limit)
    got = {d.message_id: d for d in (_get(sub) for _ in bodies)}
    # Then those within it arrive whole, the others empty with their size, and nothing after them is lost
    assert (got["at"].body, got["at"].body_size) == (bodies["at"], limit)
    assert (got["over"].body, got["over"].body_size) == (b"", limit + 1)
    assert (got["far"].body, got["far"].body_size) == (b"", 3_072_000)
    assert (got["after"].body, got["after"].body_size) == (b"x", 1)
    # and dead-lettering an emptied one moves an empty body with the reason
    got["far"].dead_letter("too_large", "3072000 bytes")
    for message_id in ("at", "over", "after"):
        got[message_id].ack()
    sub.close()
    dead_sub = transport.subscribe(DEAD_LETTER_QUEUE)
    dead = _get(dead_sub)
    assert (dead.message_id, dead.body, dead_letter_reason(dead.headers)) == ("far", b"", "too_large")
    dead.ack()
    dead_sub.close()


def test_unroutable_publish_raises(transport: Transport) -> None:
    with pytest.raises(Unroutable):
        transport.publish(TASKS_EXCHANGE, "no-such-device", b"x", message_id="u")
    # The transport stays usable.
    transport.publish(UPDATES_EXCHANGE, UPDATE_KEY, b"ok", message_id="after")
    assert transport.queue_depth(UPDATES_QUEUE) == 1


def test_headers_that_amqp_cannot_carry_are_refused(transport: Transport) -> None:
    with pytest.raises(TransportError):
        _publish(transport, "f", score=0.5)  # AMQP tables via pika carry no floats
    with pytest.raises(TransportError):
        _publish(transport, "big", n=2**64)
    _publish(transport, "ok", n=2**40, blob=b"\x00", when=None, items=["a", 1])
    sub = transport.subscribe(QUEUE.name)
    d = _get(sub)
    assert d.message_id == "ok"
    assert d.headers == {"n": 2**40, "blob": b"\x00", "when": None, "items": ["a", 1]}
    d.ack()
    sub.close()


def test_publish_to_missing_exchange_raises(transport: Transport) -> None:
    with pytest.raises(ExchangeNotFound):
        transport.publish("lf.nope", KEY, b"x", message_id="e")
    _publish(transport, "after")
    assert transport.queue_depth(QUEUE.name) == 1


def test_missing_queue_raises_queue_not_found(transport: Transport) -> None:
    with pytest.raises(QueueNotFound):
        transport.subscribe("lf.tasks.nobody")
    with pytest.raises(QueueNotFound):
        transport.queue_depth("lf.tasks.nobody")


def test_prefetch_one_hands_out_one_unsettled_delivery(transport: Transport) -> None:
    _publish(transport, "p1")
    _publish(transport, "p2")
    sub = transport.subscribe(QUEUE.name, prefetch=1)
    first = _get(sub)
    assert first.message_id == "p1"
    assert sub.get(timeout=QUIET) is None  # p2 waits until p1 is settled
    assert transport.queue_depth(QUEUE.name) == 1
    first.ack()
    second = _get(sub)
    assert second.message_id == "p2"
    second.ack()
    sub.close()


def test_closing_subscription_returns_unsettled_delivery(transport: Transport) -> None:
    _publish(transport, "c")
    sub = transport.subscribe(QUEUE.name)
    held = _get(sub)
    sub.close()
    held.ack()  # its subscription is gone: silently ignored, the message stays queued
    again = transport.subscribe(QUEUE.name)
    d = _get(again)
    assert d.message_id == "c"
    assert (d.redelivered, d.delivery_count) == (True, 1)
    d.ack()
    again.close()


def test_settling_twice_raises(transport: Transport) -> None:
    _publish(transport, "twice")
    sub = transport.subscribe(QUEUE.name)
    d = _get(sub)
    d.ack()
    with pytest.raises(TransportError):
        d.ack()
    with pytest.raises(TransportError):
        d.requeue()
    with pytest.raises(TransportError):
        d.dead_letter("again")
    assert sub.get(timeout=QUIET) is None  # and the subscription still works
    _publish(transport, "next")
    _get(sub).ack()
    sub.close()


def test_queue_depth_and_purge(transport: Transport) -> None:
    assert transport.queue_depth(QUEUE.name) == 0
    for i in range(3):
        _publish(transport, f"d{i}")
    assert transport.queue_depth(QUEUE.name) == 3
    assert transport.purge(QUEUE.name) == 3
    assert transport.queue_depth(QUEUE.name) == 0
    assert transport.purge(QUEUE.name) == 0


def test_redeclare_is_idempotent_and_conflicts_are_refused(transport: Transport) -> None:
    declare_static_topology(transport)
    transport.declare_queue(QUEUE)
    _publish(transport, "still-routed")
    assert transport.queue_depth(QUEUE.name) == 1
    with pytest.raises(TransportError):
        transport.declare_queue(
            QueueSpec(QUEUE.name, dead_letter_exchange=DEAD_LETTER_EXCHANGE, delivery_limit=9)
        )


def test_closed_transport_refuses_work(transport: Transport) -> None:
    transport.close()
    with pytest.raises(TransportClosed):
        _publish(transport, "late")
    with pytest.raises(TransportClosed):
        transport.subscribe(QUEUE.name)


def test_an_evaluation_queue_keeps_only_the_newest_task(transport: Transport) -> None:
    # Given two devices' evaluation queues on the lf.eval fanout (one waiting task each, drop-head)
    devices = ("dev-0001", "dev-0002")
    for device in devices:
        transport.declare_queue(device_eval_queue(device))

    def publish(n: int) -> None:
        transport.publish(EVAL_EXCHANGE, EVAL_KEY, f"eval {n}".encode(), message_id=f"eval:{n}")

    # When three tasks go out before anyone takes one
    for n in range(3):
        publish(n)
    # Then each device has one copy of the newest waiting
    assert [transport.queue_depth(eval_queue_name(d)) for d in devices] == [1, 1]
    subs = [transport.subscribe(eval_queue_name(d)) for d in devices]
    taken = [_get(sub) for sub in subs]
    assert [d.message_id for d in taken] == ["eval:2", "eval:2"]
    # and a task being evaluated is not dropped by newer ones, which replace each other behind it
    publish(3)
    publish(4)
    assert [transport.queue_depth(eval_queue_name(d)) for d in devices] == [1, 1]
    for sub, delivery in zip(subs, taken, strict=True):
        delivery.ack()
        newest = _get(sub)
        assert (newest.message_id, newest.body) == ("eval:4", b"eval 4")
        newest.ack()
        assert sub.get(timeout=QUIET) is None
        sub.close()
    # superseded tasks are dropped, not dead letters
    assert transport.queue_depth(DEAD_LETTER_QUEUE) == 0
