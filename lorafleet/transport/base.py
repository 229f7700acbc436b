"""The Transport port: bytes plus headers between services, with broker semantics.

Two implementations hold to one contract (tests/contract/test_transport_contract.py):
:class:`lorafleet.transport.memory.InMemoryTransport` (embedded mode) and
:class:`lorafleet.transport.rabbitmq.PikaTransport` (RabbitMQ).

Semantics both honour:

* ``publish`` returns only once the broker has the message (publisher confirms), and raises
  :class:`Unroutable` when no queue is bound for it (mandatory publishing).
* A subscription hands out at most ``prefetch`` unacknowledged deliveries. Each delivery ends with
  exactly one of ``ack``, ``requeue`` or ``dead_letter``; a delivery still open when its
  subscription (or the process) dies is redelivered with ``redelivered=True``.
* ``requeue`` and lost deliveries count toward the queue's delivery limit; past it the message is
  dead-lettered with reason ``delivery_limit``.
* ``dead_letter(reason)`` moves the message to the dead-letter queue with the reason in the
  ``x-lorafleet-reason`` header, then acks it.
* ``subscribe(..., max_body_bytes=n)``: a message whose body is larger than ``n`` bytes is handed out
  with an empty ``body`` and its real size in ``body_size``; its body is never held by the consumer
  (RabbitMQ: its frames are counted and dropped as they arrive), and dead-lettering it moves an empty
  body with the reason. So a consumer holds at most ``prefetch x max_body_bytes`` bytes of bodies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.errors import TransportError as TransportError  # re-exported: the port names its errors

#: Header carrying why a message was dead-lettered by a service.
REASON_HEADER = "x-lorafleet-reason"
#: Header carrying a human-readable detail (truncated) next to the reason.
DETAIL_HEADER = "x-lorafleet-detail"
#: Headers recording where a dead-lettered message came from.
ORIGIN_QUEUE_HEADER = "x-lorafleet-queue"
ORIGIN_EXCHANGE_HEADER = "x-lorafleet-exchange"
ORIGIN_ROUTING_KEY_HEADER = "x-lorafleet-routing-key"
#: What RabbitMQ itself sets when it dead-letters (delivery limit, expiry, rejection).
BROKER_DEATH_HEADER = "x-first-death-reason"


class TransportClosed(TransportError):
    """The transport or subscription is closed, or the connection could not be re-established."""


class QueueNotFound(TransportError):
    """The queue named does not exist (yet)."""


class ExchangeNotFound(TransportError):
    """The exchange named does not exist."""


class Unroutable(TransportError):
    """A mandatory publish that no queue was bound to receive."""


class AccessRefused(TransportError):
    """The broker refused the operation for this user (permissions)."""


def dead_letter_reason(headers: dict[str, Any]) -> str:
    """The reason a dead-lettered message carries: ours if a service set it, else the broker's."""
    reason = headers.get(REASON_HEADER) or headers.get(BROKER_DEATH_HEADER) or "unknown"
    return reason.decode() if isinstance(reason, bytes) else str(reason)


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str = "direct"  # direct | topic | fanout


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue; ``dead_letter_exchange`` and ``delivery_limit`` send poison messages to the DLQ."""

    name: str
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, routing_key)
    dead_letter_exchange: str | None = None
    delivery_limit: int | None = None
    quorum: bool = True
    max_length: int | None = None
    arguments: dict[str, Any] = field(default_factory=dict)


class Delivery(Protocol):
    """One message handed to a consumer. Call exactly one of ack / requeue / dead_letter."""

    @property
    def body(self) -> bytes: ...
    @property
    def body_size(self) -> int:
        """Bytes of the body as published: ``len(body)``, unless it was over the subscription's
        ``max_body_bytes`` and dropped unread (``body`` is then empty)."""
        ...

    @property
    def message_id(self) -> str: ...
    @property
    def headers(self) -> dict[str, Any]: ...
    @property
    def exchange(self) -> str: ...
    @property
    def routing_key(self) -> str: ...
    @property
    def redelivered(self) -> bool: ...
    @property
    def delivery_count(self) -> int:
        """How many earlier deliveries of this message failed (0 the first time)."""
        ...

    def ack(self) -> None: ...
    def requeue(self) -> None: ...
    def dead_letter(self, reason: str, detail: str = "") -> None: ...


class Subscription(Protocol):
    @property
    def live_connection(self) -> int | None:
        """Which connection to the broker is consuming now, numbered from 1 and counting up with every
        reconnection; None while there is none (the broker is away). A change means a gap."""
        ...

    def get(self, timeout: float = 0.0) -> Delivery | None:
        """The next delivery, waiting up to ``timeout`` seconds; ``None`` if none came."""
        ...

    def close(self) -> None:
        """Stop consuming; deliveries not yet settled go back to the queue."""
        ...


class Transport(Protocol):
    def declare_exchange(self, spec: ExchangeSpec) -> None: ...
    def declare_queue(self, spec: QueueSpec) -> None: ...
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
    ) -> None: ...
    def subscribe(
        self, queue: str, *, prefetch: int = 1, max_body_bytes: int | None = None
    ) -> Subscription: ...
    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting unacknowledged ones)."""
        ...

    def purge(self, queue: str) -> int: ...
    def close(self) -> None: ...
