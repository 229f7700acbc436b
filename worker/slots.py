"""Elastic identity: a worker started without a device id claims a free device slot.

The orchestrator puts one ``DeviceSlot`` token per device slot in the ``lf.slots`` queue. A worker
takes one and holds it unacknowledged for as long as it lives, so the broker itself is the lease:
when the worker dies (its connection drops, or heartbeats stop), the token goes back to the queue
and the next replica that asks gets that slot. When the run finishes the worker acks the token, and
the slot is retired. Workers need nothing but the broker for this.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from lorafleet import topology
from lorafleet.messaging import receive
from lorafleet.transport.base import Delivery, QueueNotFound, Subscription, Transport
from schemas.errors import DecodeError
from schemas.messages import DeviceSlot

log = logging.getLogger(__name__)


class NoFreeSlot(RuntimeError):
    """No device slot became free in time."""


@dataclass
class SlotLease:
    device_id: str
    delivery: Delivery
    subscription: Subscription

    def retire(self) -> None:
        """The run is over: consume the token so nobody claims the slot again."""
        self.delivery.ack()

    def release(self) -> None:
        """Give the slot back (the token returns to the queue)."""
        self.subscription.close()


def claim_slot(
    transport: Transport, run_id: str, *, timeout_s: float, max_bytes: int = 1 << 20, poll_s: float = 1.0
) -> SlotLease:
    """Hold the next free slot token of ``run_id``.

    Raises:
        NoFreeSlot: none within ``timeout_s`` (every slot is held by a live worker, or the run has
            not published its slots).
    """
    deadline = time.monotonic() + timeout_s
    subscription: Subscription | None = None
    while time.monotonic() < deadline:
        if subscription is None:
            try:
                subscription = transport.subscribe(topology.SLOTS_QUEUE, prefetch=1)
            except QueueNotFound:
                time.sleep(poll_s)
                continue
        delivery = subscription.get(poll_s)
        if delivery is None:
            continue
        try:
            message = receive(delivery, run_id=run_id, max_bytes=max_bytes)
            if not isinstance(message, DeviceSlot):
                raise DecodeError("unexpected_kind", f"{type(message).__name__} in the slots queue")
        except DecodeError as exc:
            log.warning("slots: dead-lettering a bad token: %s", exc)
            delivery.dead_letter(exc.reason, exc.detail)
            continue
        log.info("claimed device slot %s of run %s", message.device_id, run_id)
        return SlotLease(message.device_id, delivery, subscription)
    if subscription is not None:
        subscription.close()
    raise NoFreeSlot(f"no free device slot of run {run_id!r} within {timeout_s:.0f} s")
