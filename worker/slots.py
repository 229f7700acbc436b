"""Elastic identity: a worker started without a device id claims a free device slot.

The orchestrator puts one ``DeviceSlot`` token per device slot in the ``lf.slots`` queue. A worker
takes one and holds it unacknowledged for as long as it lives, so the broker itself is the lease:
when the worker dies (its connection drops, or heartbeats stop), the token goes back to the queue
and the next replica that asks gets that slot. When the run finishes the worker acks the token, and
the slot is retired. Workers need nothing but the broker for this.

A lease lives as long as the connection that holds the token. When that connection is lost while the
worker lives on (a broker restart, a missed heartbeat), the broker returns the token to the queue and
the reconnected consumer is handed whichever token is free first, maybe another device's. A kept lease
(:meth:`SlotLease.keep`) notices, gives that back and takes its own device's token again, so a live
worker never holds another device's slot, and a dead worker's replacement gets the dead worker's slot.
(A replacement that starts in the few seconds while the tokens are back in the queue may still take a
live worker's token: the broker lease is not a lock.)
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from dataclasses import dataclass, field

from lorafleet.run.clock import SystemClock
from lorafleet.transport import topology
from lorafleet.transport.base import Delivery, QueueNotFound, Subscription, Transport, TransportError
from lorafleet.transport.messaging import receive
from lorafleet.transport.waiting import Reminder, wait_for_topology
from schemas.errors import MessageRefused, NoFreeSlot, Rejected
from schemas.messages import DeviceSlot

log = logging.getLogger(__name__)


@dataclass
class SlotLease:
    device_id: str
    delivery: Delivery
    subscription: Subscription
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _retired: bool = False
    _keeper: threading.Thread | None = field(default=None, repr=False)

    def retire(self) -> None:
        """The run is over: consume the token so nobody claims the slot again (and stop consuming, so
        that the freed prefetch does not take another token)."""
        self._stop.set()
        with self._lock:
            self._retired = True
            delivery, subscription = self.delivery, self.subscription
        delivery.ack()
        subscription.close()

    def release(self) -> None:
        """Give the slot back (the token returns to the queue)."""
        self._stop.set()
        with self._lock:
            subscription = self.subscription
        subscription.close()

    def keep(
        self, transport: Transport, run_id: str, *, poll_s: float = 1.0, max_bytes: int = 1 << 20
    ) -> None:
        """Hold this device's token across lost connections, from a daemon thread (until retire/release)."""
        self._keeper = threading.Thread(
            target=self._keep,
            args=(transport, run_id, poll_s, max_bytes),
            daemon=True,
            name=f"slot-lease-{self.device_id}",
        )
        self._keeper.start()

    def _keep(self, transport: Transport, run_id: str, poll_s: float, max_bytes: int) -> None:
        while not self._stop.is_set():
            try:
                # The consumer holds one token (prefetch 1): a delivery means it reconnected and the
                # broker handed it whatever token was free; an error means it gave up reconnecting.
                if self.subscription.get(poll_s) is None:
                    continue
            except TransportError as exc:
                if self._stop.is_set():
                    return  # retired or released: its subscription was closed
                log.warning("slot %s: lease connection gave up (%s)", self.device_id, exc)
            if self._stop.is_set():
                return
            log.warning("slot %s: lease connection was lost; claiming the slot again", self.device_id)
            with contextlib.suppress(TransportError):
                self.subscription.close()  # gives back the token it was handed
            lease = reclaim_slot(transport, run_id, self.device_id, self._stop, max_bytes=max_bytes)
            if lease is None:
                return  # stopped meanwhile
            with self._lock:
                self.delivery, self.subscription = lease.delivery, lease.subscription
                retired, stopped = self._retired, self._stop.is_set()
            if retired:
                lease.retire()  # the run finished while the slot was being taken back
                return
            if stopped:
                lease.release()  # released meanwhile
                return
            log.info("slot %s: holding it again", self.device_id)


def claim_slot(
    transport: Transport, run_id: str, *, timeout_s: float, max_bytes: int = 1 << 20, poll_s: float = 1.0
) -> SlotLease:
    """Hold the next free slot token of ``run_id``.

    Raises:
        NoFreeSlot: none within ``timeout_s`` (every slot is held by a live worker, or the run has
            not published its slots).
    """
    clock = SystemClock()
    deadline = clock.now() + timeout_s
    try:
        subscription = wait_for_topology(
            lambda: transport.subscribe(topology.SLOTS_QUEUE, prefetch=1),
            missing=(QueueNotFound,),
            what=f"the slots of run {run_id!r}",
            wait_s=timeout_s,
            poll_s=poll_s,
            clock=clock,
        )
    except QueueNotFound:
        raise NoFreeSlot(f"no slots queue for run {run_id!r} within {timeout_s:.0f} s") from None
    reminder = Reminder(f"a free device slot of run {run_id!r}", clock)
    while clock.now() < deadline:
        delivery = subscription.get(poll_s)
        if delivery is None:
            reminder.tick()
            continue
        try:
            message = receive(delivery, run_id=run_id, max_bytes=max_bytes)
            if not isinstance(message, DeviceSlot):
                raise Rejected("unexpected_kind", f"{type(message).__name__} in the slots queue")
        except MessageRefused as exc:
            log.warning("slots: dead-lettering a bad token: %s", exc)
            delivery.dead_letter(exc.reason, exc.detail)
            continue
        log.info("claimed device slot %s of run %s", message.device_id, run_id)
        return SlotLease(message.device_id, delivery, subscription)
    subscription.close()
    raise NoFreeSlot(f"no free device slot of run {run_id!r} within {timeout_s:.0f} s")


def reclaim_slot(
    transport: Transport,
    run_id: str,
    device_id: str,
    stop: threading.Event,
    *,
    probe_s: float = 1.0,
    backoff_s: float = 2.0,
    max_bytes: int = 1 << 20,
) -> SlotLease | None:
    """Hold ``device_id``'s token again; None if ``stop`` is set first.

    A consumer is handed the free token at the head of the queue, and a token given back returns to the
    head, so taking and giving back in a loop could spin on one foreign token. Instead each token taken
    is held (one subscription each) until ours comes; then the others are given back. When no token is
    free (ours is not back yet, or another worker holds it while it looks for its own), everything is
    given back and the search starts again after a random pause.
    """
    held: list[SlotLease] = []
    try:
        while not stop.is_set():
            try:
                # a free token arrives within milliseconds: wait briefly, others may need what we hold
                lease = claim_slot(transport, run_id, timeout_s=probe_s, max_bytes=max_bytes, poll_s=0.1)
            except (NoFreeSlot, TransportError) as exc:
                log.debug("slot %s: not free yet (%s)", device_id, exc)
                while held:
                    with contextlib.suppress(TransportError):
                        held.pop().release()
                stop.wait(random.uniform(0.1, 1.0) * backoff_s)
                continue
            if lease.device_id == device_id:
                return lease
            held.append(lease)
        return None
    finally:
        for other in held:
            with contextlib.suppress(TransportError):
                other.release()
