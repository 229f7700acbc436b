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
    while True:
        try:
            return attempt()
        except missing as exc:
            if clock.now() >= deadline:
                raise
            log.info("waiting for %s (%s)", what, exc)
            clock.sleep(poll_s)
