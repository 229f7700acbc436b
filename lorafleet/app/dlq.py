"""Inspecting the dead-letter queue: what was refused, why, and from where.

:func:`inspect_dead_letters` lists the messages that are in ``lf.dead`` when it starts, each exactly
once, and leaves them there unless ``purge`` is set, so looking is harmless.

**Why it holds every message until the end.** A consumer cannot look at a message without taking it,
and a message it gives back (requeue, or its channel closing) returns to the *head* of the queue and is
delivered again at once. Giving messages back while still reading would therefore read the same ones
over and over (with 2,500 dead letters and a 1,000-message window the old loop listed 100,000, its
limit) and, on RabbitMQ 4.x, push each toward the quorum queue's delivery limit. So every delivery stays
unacknowledged until the listing is complete: the broker delivers a message at most once to consumers
that hold it, and only then are they all given back together (closing the subscriptions) or acked
(``purge``). Counting distinct message ids would not do: at-least-once delivery makes duplicate ids
legitimate (a message dead-lettered twice is two dead letters).

**Which messages.** The queue's depth is read first and exactly that many deliveries are taken. The
queue is FIFO, so these are the messages present at the start; dead letters published while the listing
runs queue up behind them and are neither listed nor purged. If fewer arrive within ``wait_s`` (another
consumer holds some), the listing ends with what it got.

**Cost.** The messages are held in this process until the end, so its memory grows with their total
size (``limit`` bounds the count). AMQP caps a consumer's prefetch at 65,535 unacknowledged messages, so
larger listings use several subscriptions.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lorafleet.transport import topology
from lorafleet.transport.base import (
    DETAIL_HEADER,
    ORIGIN_QUEUE_HEADER,
    Delivery,
    Subscription,
    Transport,
    TransportError,
    dead_letter_reason,
)

#: basic.qos prefetch-count is a 16-bit field: the most unacknowledged deliveries one consumer can hold.
MAX_PREFETCH = 65_535


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    reason: str
    queue: str
    detail: str
    size: int


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def _origin(headers: dict[str, Any]) -> str:
    if headers.get(ORIGIN_QUEUE_HEADER):
        return _text(headers[ORIGIN_QUEUE_HEADER])
    deaths = headers.get("x-death") or []
    return _text(deaths[0].get("queue")) if deaths and isinstance(deaths[0], dict) else ""


def _record(delivery: Delivery) -> DeadLetter:
    headers = delivery.headers
    return DeadLetter(
        delivery.message_id,
        dead_letter_reason(headers),
        _origin(headers),
        _text(headers.get(DETAIL_HEADER))[:200],
        len(delivery.body),
    )


def inspect_dead_letters(
    transport: Transport, *, purge: bool = False, limit: int = 100_000, wait_s: float = 5.0
) -> list[DeadLetter]:
    """The dead letters in the queue when called (at most ``limit``), each once; left there unless
    ``purge``, which removes exactly the ones listed.

    ``wait_s``: how long to wait for the next delivery before concluding that the rest are held by
    another consumer.

    Raises:
        QueueNotFound: there is no dead-letter queue.
    """
    queue = topology.DEAD_LETTER_QUEUE
    wanted = min(limit, transport.queue_depth(queue))
    seen: list[DeadLetter] = []
    held: list[Delivery] = []
    subscriptions: list[Subscription] = []
    try:
        while len(seen) < wanted:
            if len(held) % MAX_PREFETCH == 0:  # the current consumer holds all it can: add one
                prefetch = min(MAX_PREFETCH, wanted - len(seen))
                subscriptions.append(transport.subscribe(queue, prefetch=prefetch))
            delivery = _next(subscriptions, wait_s)
            if delivery is None:
                break  # fewer than the depth came: another consumer holds the rest
            seen.append(_record(delivery))
            held.append(delivery)
        if purge:
            for delivery in held:
                delivery.ack()
    finally:
        # Unsettled deliveries (all of them unless purging) go back to the queue together.
        for subscription in subscriptions:
            with contextlib.suppress(TransportError):
                subscription.close()
    return seen


def _next(subscriptions: list[Subscription], wait_s: float) -> Delivery | None:
    """The next delivery from any subscription (the newest is the one with room), or None after
    ``wait_s`` without one."""
    deadline = time.monotonic() + wait_s
    while True:
        for subscription in reversed(subscriptions):
            delivery = subscription.get(0.0)
            if delivery is not None:
                return delivery
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        delivery = subscriptions[-1].get(min(0.2, remaining))
        if delivery is not None:
            return delivery


def count_by_reason(letters: list[DeadLetter]) -> dict[str, int]:
    return dict(Counter(letter.reason for letter in letters).most_common())
