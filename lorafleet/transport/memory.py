"""In-process twin of the RabbitMQ adapter (the embedded mode's broker).

:class:`InMemoryBroker` is the server: exchanges, bindings and queues with RabbitMQ's semantics
(direct, topic and fanout routing, at-least-once delivery, prefetch, requeue with a delivery count,
delivery limits, dead-lettering). :class:`InMemoryTransport` is one client connection to it;
closing a client puts its unsettled deliveries back, as a dropped AMQP connection does.
Thread-safe, so services may run in threads over one broker.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from lorafleet.transport.base import (
    BROKER_DEATH_HEADER,
    DETAIL_HEADER,
    ORIGIN_EXCHANGE_HEADER,
    ORIGIN_QUEUE_HEADER,
    ORIGIN_ROUTING_KEY_HEADER,
    REASON_HEADER,
    ExchangeNotFound,
    ExchangeSpec,
    QueueNotFound,
    QueueSpec,
    TransportClosed,
    TransportError,
    Unroutable,
)

#: Header a quorum queue sets on a redelivery: how many earlier deliveries failed.
DELIVERY_COUNT_HEADER = "x-delivery-count"


def amqp_header_problem(headers: dict[str, Any]) -> str | None:
    """Why ``headers`` cannot be carried in an AMQP 0-9-1 field table (pika's encoder), or None.

    Allowed values: str, bytes, bool, 64-bit int, Decimal, datetime, None, and lists / dicts of them.
    Floats in particular are not (pika 1.4 cannot encode them), so the twin refuses them as well.
    """

    def problem(value: Any, where: str) -> str | None:
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str) or len(key.encode()) > 255:
                    return f"{where}: key {key!r} is not a short string"
                found = problem(item, f"{where}.{key}")
                if found:
                    return found
            return None
        if isinstance(value, list):
            return next((p for i, v in enumerate(value) if (p := problem(v, f"{where}[{i}]"))), None)
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, int):
            return None if -(2**63) <= value < 2**63 else f"{where}: {value} does not fit in 64 bits"
        if isinstance(value, (str, bytes, Decimal, datetime)):
            return None
        return f"{where}: {type(value).__name__} is not an AMQP field type"

    return problem(headers, "headers")


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """RabbitMQ's topic matching: words are separated by dots, ``*`` is one word, ``#`` zero or more."""

    def match(pattern: list[str], words: list[str]) -> bool:
        if not pattern:
            return not words
        head, rest = pattern[0], pattern[1:]
        if head == "#":
            return any(match(rest, words[i:]) for i in range(len(words) + 1))
        return bool(words) and head in ("*", words[0]) and match(rest, words[1:])

    return match(binding_key.split("."), routing_key.split("."))


def _routes(exchange: ExchangeSpec, binding_key: str, routing_key: str) -> bool:
    """Whether a binding of ``exchange`` takes a message with ``routing_key``."""
    if exchange.type == "fanout":
        return True
    if exchange.type == "topic":
        return topic_matches(binding_key, routing_key)
    return binding_key == routing_key


@dataclass(frozen=True)
class _Message:
    body: bytes
    message_id: str
    headers: dict[str, Any]
    exchange: str
    routing_key: str
    delivery_count: int = 0
    redelivered: bool = False


@dataclass
class _Queue:
    spec: QueueSpec
    ready: deque[_Message] = field(default_factory=deque)


def _settings(spec: QueueSpec) -> tuple[Any, ...]:
    """What a redeclare must repeat exactly (RabbitMQ compares the queue's x-arguments)."""
    return (spec.quorum, spec.dead_letter_exchange, spec.delivery_limit, spec.max_length, spec.arguments)


def _broker_death_headers(
    queue_name: str, message: _Message, reason: str = "delivery_limit"
) -> dict[str, Any]:
    """Headers of a copy the broker itself dead-letters (past the delivery limit; ``maxlen``: dropped
    from the head of a full queue), as RabbitMQ writes them.

    RabbitMQ keeps the original headers, prepends an ``x-death`` entry and sets the
    ``x-first-death-*`` headers once; it adds no ``x-lorafleet-*`` header.
    """
    death = {
        "count": 1,
        "reason": reason,
        "queue": queue_name,
        "time": datetime.now(UTC).replace(microsecond=0),
        "exchange": message.exchange,
        "routing-keys": [message.routing_key],
    }
    headers = dict(message.headers)
    headers["x-death"] = [death, *headers.get("x-death", [])]
    headers.setdefault(BROKER_DEATH_HEADER, reason)
    headers.setdefault("x-first-death-queue", queue_name)
    headers.setdefault("x-first-death-exchange", message.exchange)
    return headers


class InMemoryBroker:
    """The in-process message broker shared by every :class:`InMemoryTransport` client."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._exchanges: dict[str, ExchangeSpec] = {}
        self._bindings: dict[str, list[tuple[str, str]]] = {}  # exchange -> [(routing_key, queue)]
        self._queues: dict[str, _Queue] = {}

    # -- topology -------------------------------------------------------------------------------
    def declare_exchange(self, spec: ExchangeSpec) -> None:
        with self._lock:
            existing = self._exchanges.get(spec.name)
            if existing is not None and existing != spec:
                raise TransportError(f"exchange {spec.name!r} redeclared with different settings")
            self._exchanges[spec.name] = spec
            self._bindings.setdefault(spec.name, [])

    def declare_queue(self, spec: QueueSpec) -> None:
        with self._lock:
            existing = self._queues.get(spec.name)
            if existing is None:
                self._queues[spec.name] = _Queue(spec)
            elif _settings(existing.spec) != _settings(spec):
                # RabbitMQ: 406 PRECONDITION_FAILED - inequivalent arg. New bindings are still added.
                raise TransportError(f"queue {spec.name!r} redeclared with different settings")
            for exchange, routing_key in spec.bindings:
                if exchange not in self._exchanges:
                    raise ExchangeNotFound(f"no exchange {exchange!r} to bind queue {spec.name!r} to")
                binding = (routing_key, spec.name)
                if binding not in self._bindings[exchange]:
                    self._bindings[exchange].append(binding)

    def has_queue(self, name: str) -> bool:
        with self._lock:
            return name in self._queues

    # -- messages -------------------------------------------------------------------------------
    def publish(self, message: _Message) -> None:
        with self._lock:
            exchange = self._exchanges.get(message.exchange)
            if exchange is None:
                raise ExchangeNotFound(f"no exchange {message.exchange!r}")
            targets = list(
                dict.fromkeys(  # a queue bound twice still gets one copy, as in RabbitMQ
                    queue
                    for binding_key, queue in self._bindings[message.exchange]
                    if _routes(exchange, binding_key, message.routing_key)
                )
            )
            if not targets:
                raise Unroutable(
                    f"no queue bound to {message.exchange!r} for routing key {message.routing_key!r}"
                )
            for queue in targets:
                self._enqueue(queue, message)
            self._lock.notify_all()

    def _enqueue(self, queue_name: str, message: _Message, *, front: bool = False) -> None:
        queue = self._queues[queue_name]
        if queue.spec.max_length is not None and len(queue.ready) >= queue.spec.max_length:
            if queue.spec.arguments.get("x-overflow") != "drop-head":
                raise TransportError(f"queue {queue_name!r} is full (max_length {queue.spec.max_length})")
            # RabbitMQ's drop-head: the oldest ready message makes room (a message going back to the
            # head is itself the oldest); it is dead-lettered where the queue has a dead-letter exchange
            dropped = message if front else queue.ready.popleft()
            headers = _broker_death_headers(queue_name, dropped, "maxlen")
            self._dead_letter_locked(queue_name, dropped, headers)
            if front:
                return
        if front:
            queue.ready.appendleft(message)
        else:
            queue.ready.append(message)

    def take(self, queue_name: str, timeout: float, may_take: Any) -> _Message | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            while True:
                queue = self._queues.get(queue_name)
                if queue is None:
                    raise QueueNotFound(f"no queue {queue_name!r}")
                if queue.ready and may_take():
                    return queue.ready.popleft()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)

    def give_back(self, queue_name: str, message: _Message) -> None:
        """A delivery that was not acked returns to the head of its queue, or dies past the limit."""
        with self._lock:
            queue = self._queues[queue_name]
            again = replace(message, delivery_count=message.delivery_count + 1, redelivered=True)
            limit = queue.spec.delivery_limit
            if limit is not None and again.delivery_count > limit:
                self._dead_letter_locked(queue_name, message, _broker_death_headers(queue_name, message))
            else:
                self._enqueue(queue_name, again, front=True)
            self._lock.notify_all()

    def dead_letter(self, queue_name: str, message: _Message, headers: dict[str, Any]) -> None:
        """A service dead-letters a message: it goes to the DLX with the reason and its origin."""
        origin = {
            ORIGIN_QUEUE_HEADER: queue_name,
            ORIGIN_EXCHANGE_HEADER: message.exchange,
            ORIGIN_ROUTING_KEY_HEADER: message.routing_key,
        }
        with self._lock:
            self._dead_letter_locked(queue_name, message, {**message.headers, **origin, **headers})
            self._lock.notify_all()

    def _dead_letter_locked(self, queue_name: str, message: _Message, headers: dict[str, Any]) -> None:
        dlx = self._queues[queue_name].spec.dead_letter_exchange
        if dlx is None:
            return  # like RabbitMQ: without a DLX a rejected message is dropped
        # The copy starts afresh: not redelivered, no delivery count (RabbitMQ drops x-delivery-count).
        dead = _Message(message.body, message.message_id, headers, dlx, message.routing_key)
        exchange = self._exchanges.get(dlx)
        if exchange is None:
            return
        bound = self._bindings[dlx]
        for queue in dict.fromkeys(q for key, q in bound if _routes(exchange, key, message.routing_key)):
            self._enqueue(queue, dead)

    def depth(self, queue_name: str) -> int:
        with self._lock:
            queue = self._queues.get(queue_name)
            if queue is None:
                raise QueueNotFound(f"no queue {queue_name!r}")
            return len(queue.ready)

    def purge(self, queue_name: str) -> int:
        with self._lock:
            queue = self._queues.get(queue_name)
            if queue is None:
                raise QueueNotFound(f"no queue {queue_name!r}")
            count = len(queue.ready)
            queue.ready.clear()
            return count

    def peek(self, queue_name: str) -> list[tuple[bytes, dict[str, Any]]]:
        """Bodies and headers ready in a queue, without consuming them (tests, ``lorafleet dlq``)."""
        with self._lock:
            return [(m.body, dict(m.headers)) for m in self._queues[queue_name].ready]


class _MemoryDelivery:
    def __init__(self, subscription: _MemorySubscription, message: _Message) -> None:
        self._subscription = subscription
        self._message = message
        self._settled = False
        limit = subscription._max_body_bytes
        #: over the subscription's limit: handed out (and dead-lettered) with an empty body, as RabbitMQ's
        self._dropped = limit is not None and len(message.body) > limit

    body = property(lambda self: b"" if self._dropped else self._message.body)
    body_size = property(lambda self: len(self._message.body))
    message_id = property(lambda self: self._message.message_id)
    headers = property(lambda self: self._delivered_headers())
    exchange = property(lambda self: self._message.exchange)
    routing_key = property(lambda self: self._message.routing_key)
    redelivered = property(lambda self: self._message.redelivered)
    delivery_count = property(lambda self: self._message.delivery_count)

    def _delivered_headers(self) -> dict[str, Any]:
        headers = dict(self._message.headers)
        if self._message.delivery_count:
            headers[DELIVERY_COUNT_HEADER] = self._message.delivery_count  # as a quorum queue adds it
        return headers

    def _settle(self) -> bool:
        if self._settled:
            raise TransportError("delivery already settled")  # RabbitMQ: 406 unknown delivery tag
        self._settled = True
        return self._subscription._release(self)

    def ack(self) -> None:
        self._settle()

    def requeue(self) -> None:
        if self._settle():
            self._subscription._broker.give_back(self._subscription.queue, self._message)

    def dead_letter(self, reason: str, detail: str = "") -> None:
        if self._settle():
            headers = {REASON_HEADER: reason, DETAIL_HEADER: detail[:500]}
            message = replace(self._message, body=b"") if self._dropped else self._message
            self._subscription._broker.dead_letter(self._subscription.queue, message, headers)


class _MemorySubscription:
    def __init__(
        self, broker: InMemoryBroker, queue: str, prefetch: int, max_body_bytes: int | None = None
    ) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if max_body_bytes is not None and max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        if not broker.has_queue(queue):
            raise QueueNotFound(f"no queue {queue!r}")
        self._broker = broker
        self.queue = queue
        self._prefetch = prefetch
        self._max_body_bytes = max_body_bytes
        self._open: set[_MemoryDelivery] = set()
        self._closed = False
        self._mutex = threading.Lock()

    @property
    def live_connection(self) -> int | None:
        """In process there is one connection, never lost."""
        return None if self._closed else 1

    def get(self, timeout: float = 0.0) -> _MemoryDelivery | None:
        if self._closed:
            raise TransportClosed(f"subscription to {self.queue!r} is closed")
        message = self._broker.take(self.queue, timeout, lambda: len(self._open) < self._prefetch)
        if message is None:
            return None
        delivery = _MemoryDelivery(self, message)
        with self._mutex:
            self._open.add(delivery)
        return delivery

    def _release(self, delivery: _MemoryDelivery) -> bool:
        """Forget an open delivery; False when the subscription already returned it (closed)."""
        with self._mutex:
            if delivery not in self._open:
                return False
            self._open.discard(delivery)
        with self._broker._lock:
            self._broker._lock.notify_all()  # a prefetch slot is free
        return True

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            pending, self._open = list(self._open), set()
        for delivery in pending:
            self._broker.give_back(self.queue, delivery._message)


class InMemoryTransport:
    """One client of an :class:`InMemoryBroker`."""

    _ids = itertools.count()

    def __init__(self, broker: InMemoryBroker | None = None) -> None:
        self.broker = broker if broker is not None else InMemoryBroker()
        self._subscriptions: list[_MemorySubscription] = []
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed("transport is closed")

    def declare_exchange(self, spec: ExchangeSpec) -> None:
        self._check_open()
        self.broker.declare_exchange(spec)

    def declare_queue(self, spec: QueueSpec) -> None:
        self._check_open()
        self.broker.declare_queue(spec)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
    ) -> None:
        self._check_open()
        problem = amqp_header_problem(headers or {})
        if problem is not None:
            raise TransportError(f"headers cannot travel over AMQP: {problem}")
        self.broker.publish(_Message(bytes(body), message_id, dict(headers or {}), exchange, routing_key))

    def subscribe(
        self, queue: str, *, prefetch: int = 1, max_body_bytes: int | None = None
    ) -> _MemorySubscription:
        self._check_open()
        subscription = _MemorySubscription(self.broker, queue, prefetch, max_body_bytes)
        self._subscriptions.append(subscription)
        return subscription

    def queue_depth(self, queue: str) -> int:
        return self.broker.depth(queue)

    def purge(self, queue: str) -> int:
        return self.broker.purge(queue)

    def close(self) -> None:
        """Close the client; unsettled deliveries go back to their queues."""
        if self._closed:
            return
        self._closed = True
        for subscription in self._subscriptions:
            subscription.close()
