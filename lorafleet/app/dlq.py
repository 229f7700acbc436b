"""Inspecting the dead-letter queue: what was refused, why, and from where.

:func:`inspect_dead_letters` takes every message in ``lf.dead``, records it, and puts it back
(requeue) unless ``purge`` is set, so looking is harmless.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lorafleet.transport import topology
from lorafleet.transport.base import (
    DETAIL_HEADER,
    ORIGIN_QUEUE_HEADER,
    Delivery,
    Transport,
    dead_letter_reason,
)


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


def inspect_dead_letters(
    transport: Transport, *, purge: bool = False, limit: int = 100_000, wait_s: float = 1.0
) -> list[DeadLetter]:
    """Every dead letter (up to ``limit``), left in the queue unless ``purge``."""
    subscription = transport.subscribe(topology.DEAD_LETTER_QUEUE, prefetch=min(limit, 1000))
    seen: list[DeadLetter] = []
    held: list[Delivery] = []
    deadline = time.monotonic() + wait_s
    try:
        while len(seen) < limit:
            delivery = subscription.get(0.2)
            if delivery is None:
                if time.monotonic() > deadline:
                    break
                continue
            deadline = time.monotonic() + wait_s
            headers = delivery.headers
            seen.append(
                DeadLetter(
                    delivery.message_id,
                    dead_letter_reason(headers),
                    _origin(headers),
                    _text(headers.get(DETAIL_HEADER))[:200],
                    len(delivery.body),
                )
            )
            held.append(delivery)
            if len(held) >= 1000:  # do not hold more than the prefetch window
                _settle(held, purge)
                held = []
    finally:
        _settle(held, purge)
        subscription.close()
    return seen


def _settle(deliveries: list[Delivery], purge: bool) -> None:
    for delivery in deliveries:
        if purge:
            delivery.ack()
        else:
            delivery.requeue()


def count_by_reason(letters: list[DeadLetter]) -> dict[str, int]:
    return dict(Counter(letter.reason for letter in letters).most_common())
