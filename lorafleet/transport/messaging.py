"""What every service does with a delivery before its own logic: decode, check sender, reject.

A message that fails any check is dead-lettered with its reason and counted; it never raises
into the service loop.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from lorafleet.transport import topology
from lorafleet.transport.base import Delivery, Transport
from lorafleet.transport.topology import ALLOWED_KINDS
from schemas.envelope import decode, encode, kind_of
from schemas.errors import DecodeError, MessageRefused, Rejected
from schemas.messages import Message

log = logging.getLogger(__name__)


def receive(delivery: Delivery, *, run_id: str, max_bytes: int) -> Message:
    """Decode a delivery and check that its kind may come through its exchange and its run is ours.

    A body over ``max_bytes`` is refused by its size before anything reads it (the transport may have
    dropped it unread: see ``Transport.subscribe``'s ``max_body_bytes``).

    Raises:
        DecodeError: ``too_large``, or any other envelope or schema failure.
        Rejected: ``wrong_sender`` (also: a routing key naming another device than the body) or
            ``wrong_run``.
    """
    if delivery.body_size > max_bytes:
        unread = "" if len(delivery.body) == delivery.body_size else " (its body was dropped unread)"
        raise DecodeError("too_large", f"message of {delivery.body_size} bytes exceeds {max_bytes}{unread}")
    message = decode(delivery.body, max_bytes=max_bytes)
    kind = kind_of(message)
    if kind not in ALLOWED_KINDS.get(delivery.exchange, frozenset()):
        raise Rejected("wrong_sender", f"{kind} may not arrive through exchange {delivery.exchange!r}")
    if message.run_id != run_id:
        raise Rejected("wrong_run", f"message of run {message.run_id!r}, this is run {run_id!r}")
    named = topology.routing_key_device(delivery.exchange, delivery.routing_key)
    sender = getattr(message, "device_id", None)
    if named is not None and named != sender:
        # the broker authorised the routing key for its device's user; the body must not claim another
        raise Rejected("wrong_sender", f"{kind} of {sender} published under {delivery.routing_key!r}")
    return message


class Rejections:
    """Dead-letters refused deliveries and counts them per reason (locally and through ``sink``)."""

    def __init__(self, service: str, sink: Callable[[str], object] | None = None) -> None:
        self.service = service
        self.counts: Counter[str] = Counter()
        self._sink = sink

    def reject(self, delivery: Delivery, error: MessageRefused) -> None:
        log.warning("%s: dead-lettering message %s: %s", self.service, delivery.message_id[:80], error)
        delivery.dead_letter(error.reason, error.detail)
        self.counts[error.reason] += 1
        if self._sink is not None:
            self._sink(f"rejected_{error.reason}")


def publish_message(transport: Transport, exchange: str, routing_key: str, message: Message) -> int:
    """Encode and publish (confirmed); returns the encoded size in bytes."""
    body = encode(message)
    transport.publish(exchange, routing_key, body, message_id=message.message_id)
    return len(body)
