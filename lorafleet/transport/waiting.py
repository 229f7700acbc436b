"""Waiting for topology that another service declares: one bounded loop, on the :class:`Clock`.

Where the broker did not load ``broker_config/definitions.json``, the orchestrator declares the
exchanges and queues; a service that starts first retries the operation that needs them until
they exist or ``wait_s`` has passed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from lorafleet.run.clock import Clock, SystemClock
from schemas.errors import TransportError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how often a service that waits says so (at WARNING, the default level: a person sees it)
SAY_EVERY_S = 30.0


class Reminder:
    """Says ``still waiting for WHAT (N s)`` once every ``every_s`` while a wait lasts."""

    def __init__(self, what: str, clock: Clock, every_s: float = SAY_EVERY_S) -> None:
        self.what = what
        self._clock = clock
        self._every_s = every_s
        self._started = clock.now()
        self._next = self._started + every_s

    def tick(self) -> None:
        """Call in the waiting loop; logs when the next reminder is due."""
        now = self._clock.now()
        if now >= self._next:
            log.warning("still waiting for %s (%.0f s)", self.what, now - self._started)
            self._next = now + self._every_s


def wait_for_topology(
    attempt: Callable[[], T],
    *,
    missing: tuple[type[TransportError], ...],
    what: str,
    wait_s: float,
    poll_s: float = 1.0,
    clock: Clock | None = None,
) -> T:
    """``attempt()``, retried every ``poll_s`` while it raises one of ``missing``, for up to ``wait_s``.

    Raises:
        TransportError: the last of ``missing`` once ``wait_s`` has passed; anything else at once.
    """
    clock = clock or SystemClock()
    deadline = clock.now() + wait_s
    reminder = Reminder(what, clock)
    while True:
        try:
            return attempt()
        except missing as exc:
            if clock.now() >= deadline:
                raise
            log.info("waiting for %s (%s)", what, exc)
            reminder.tick()
            clock.sleep(poll_s)
