"""First contact with the broker and the state store, bounded: a command that cannot reach one ends
within ``LORAFLEET_CONNECT_TIMEOUT`` seconds (15 by default) in one line naming the URL, password
masked, and the cause, instead of the adapters' long mid-run retries.

Both servers are tried at once, so a command that needs both waits at most one timeout. Imports only
the adapters' probes (pika, redis), never torch: the check comes before a service loads its model.
"""

from __future__ import annotations

import concurrent.futures
from typing import ClassVar

from lorafleet.app.urls import mask_url
from schemas.errors import ConfigError, LorafleetError

STATE_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")


class ServerUnreachable(LorafleetError):
    """The broker or the state store did not answer at start-up (exit status 69, EX_UNAVAILABLE)."""

    exit_code: ClassVar[int] = 69


def _broker(url: str, timeout_s: float) -> None:
    from lorafleet.transport.rabbitmq import probe_broker

    probe_broker(url, timeout_s)


def _state(url: str, timeout_s: float) -> None:
    from lorafleet.state.redis import probe_state

    probe_state(url, timeout_s)


def check_servers(*, broker: str | None = None, state: str | None = None, timeout_s: float) -> None:
    """Reach ``broker`` and ``state`` (those given), at once, each within ``timeout_s``.

    Raises:
        ServerUnreachable: one of them did not answer or refused us; the message names each that
            failed (``cannot reach the broker at amqp://guest:***@host:5672/ within 15 s: ...``).
        ConfigError: a URL of the wrong scheme.
    """
    if broker is not None and not broker.strip().startswith(("amqp://", "amqps://")):
        raise ConfigError(f"--broker must be an amqp:// or amqps:// URL, got {_masked(broker)!r}")
    if state is not None and not state.startswith(STATE_SCHEMES):
        raise ConfigError(
            f"--state must be a redis://, rediss:// or redis+sentinel:// URL, got {mask_url(state)!r}"
        )
    checks = {"broker": (broker, _broker), "state store": (state, _state)}
    targets = {what: (url, probe) for what, (url, probe) in checks.items() if url is not None}
    if not targets:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(targets)) as pool:
        futures = {what: pool.submit(probe, url, timeout_s) for what, (url, probe) in targets.items()}
    shown = {"broker": _masked(broker or ""), "state store": mask_url(state or "")}
    failures = []
    for what, future in futures.items():
        exc = future.exception()
        if isinstance(exc, LorafleetError):
            failures.append(f"cannot reach the {what} at {shown[what]} within {timeout_s:g} s: {exc}")
        elif exc is not None:
            raise exc
    if failures:
        raise ServerUnreachable("; ".join(failures))


def _masked(url: str) -> str:
    """A broker URL list with every password masked."""
    return ",".join(mask_url(part) for part in url.split(","))
