"""wait_for_topology: retries what is missing on the clock, up to its deadline, and nothing else."""

from __future__ import annotations

import pytest

from lorafleet.run.clock import FakeClock
from lorafleet.transport.base import ExchangeNotFound, QueueNotFound
from lorafleet.transport.waiting import wait_for_topology


def test_returns_once_the_topology_appears_having_waited_on_the_clock() -> None:
    # Given a queue that appears on the third attempt
    clock, attempts = FakeClock(start=100.0), []

    def subscribe() -> str:
        attempts.append(clock.now())
        if len(attempts) < 3:
            raise QueueNotFound("lf.updates")
        return "subscription"

    # When the caller waits for it
    got = wait_for_topology(subscribe, missing=(QueueNotFound,), what="q", wait_s=60, poll_s=2, clock=clock)
    # Then it got the subscription, polling every 2 s of the clock
    assert got == "subscription"
    assert attempts == [100.0, 102.0, 104.0]


def test_gives_up_after_wait_s_with_the_last_error() -> None:
    clock, calls = FakeClock(start=0.0), []

    def never() -> None:
        calls.append(clock.now())
        raise ExchangeNotFound(f"lf.control at {clock.now():.0f}")

    with pytest.raises(ExchangeNotFound, match="lf.control at 10"):
        wait_for_topology(never, missing=(ExchangeNotFound,), what="x", wait_s=10, poll_s=1, clock=clock)
    assert calls == [float(t) for t in range(11)]


def test_other_errors_are_not_retried() -> None:
    clock, calls = FakeClock(), []

    def refused() -> None:
        calls.append(1)
        raise QueueNotFound("not what this caller waits for")

    with pytest.raises(QueueNotFound):
        wait_for_topology(refused, missing=(ExchangeNotFound,), what="x", wait_s=60, clock=clock)
    assert calls == [1]


def test_says_it_is_still_waiting_every_30_s(caplog: pytest.LogCaptureFixture) -> None:
    # Given a run whose topology does not appear for 100 s of the clock
    clock = FakeClock(start=0.0)

    def missing() -> None:
        raise QueueNotFound("lf.slots")

    # When a service waits for it, polling every second
    with pytest.raises(QueueNotFound):
        wait_for_topology(missing, missing=(QueueNotFound,), what="the run", wait_s=100, clock=clock)
    # Then it said so at WARNING at 30, 60 and 90 s, and no more often
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [f"still waiting for the run ({s} s)" for s in (30, 60, 90)]
