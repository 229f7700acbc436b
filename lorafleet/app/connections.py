"""Server URLs to adapters: ``--broker`` to a :class:`Transport`, ``--state`` to a :class:`StateStore`.

Kept apart from :mod:`lorafleet.app.wiring` (which builds services and imports torch) so that what
only connects (the launcher of ``lorafleet run --broker``, ``status``, ``stop``, ``dlq``) stays light.
"""

from __future__ import annotations

from lorafleet.app.urls import mask_url
from lorafleet.state.base import StateStore
from lorafleet.transport.base import Transport
from schemas.errors import ConfigError


def open_transport(url: str) -> Transport:
    """A transport for ``amqp://``/``amqps://`` URLs (RabbitMQ)."""
    if url.startswith(("amqp://", "amqps://")):
        from lorafleet.transport.rabbitmq import PikaTransport

        return PikaTransport(url)
    raise ConfigError(f"--broker must be an amqp:// or amqps:// URL, got {mask_url(url)!r}")


def open_state(url: str) -> StateStore:
    """A state store for ``redis://``/``rediss://``/``unix://`` and ``redis+sentinel://`` URLs
    (lorafleet/state/redis_url.py)."""
    if url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
        from lorafleet.state.redis import RedisStateStore

        return RedisStateStore(url)
    raise ConfigError(
        f"--state must be a redis://, rediss:// or redis+sentinel:// URL, got {mask_url(url)!r}"
    )
