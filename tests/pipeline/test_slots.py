"""Elastic identity: workers without a device id claim distinct slots; a dead worker's slot is reused."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from lorafleet.transport import topology
from lorafleet.transport.base import Transport
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from lorafleet.transport.messaging import publish_message
from schemas.errors import NoFreeSlot
from schemas.messages import DeviceSlot
from worker.slots import claim_slot


@pytest.fixture(params=["memory", "rabbitmq"])
def connect(request: pytest.FixtureRequest) -> Iterator[Callable[[], Transport]]:
    opened: list[Transport] = []
    if request.param == "memory":
        broker = InMemoryBroker()

        def make() -> Transport:
            opened.append(InMemoryTransport(broker))
            return opened[-1]
    else:
        url = request.getfixturevalue("rabbitmq_url")
        from lorafleet.transport.rabbitmq import PikaTransport

        def make() -> Transport:
            opened.append(PikaTransport(url))
            return opened[-1]

    yield make
    for t in opened:
        t.close()


def _publish_slots(transport: Transport, run_id: str, count: int) -> None:
    topology.declare_static_topology(transport)
    for i in range(count):
        publish_message(
            transport,
            topology.SLOTS_EXCHANGE,
            topology.SLOT_KEY,
            DeviceSlot(run_id=run_id, device_id=f"dev-{i:04d}"),
        )


def test_workers_claim_distinct_slots_and_a_dead_workers_slot_is_taken_over(
    connect: Callable[[], Transport], run_id: str
) -> None:
    # Given a run with three device slots
    _publish_slots(connect(), run_id, 3)
    # When three workers claim one each
    workers = [connect() for _ in range(3)]
    leases = [claim_slot(w, run_id, timeout_s=10, poll_s=0.2) for w in workers]
    # Then they hold three distinct slots, and a fourth finds none free
    assert sorted(lease.device_id for lease in leases) == ["dev-0000", "dev-0001", "dev-0002"]
    with pytest.raises(NoFreeSlot):
        claim_slot(connect(), run_id, timeout_s=1.5, poll_s=0.2)
    # When the worker holding dev-0001 dies (its connection goes away) ...
    dead = next(i for i, lease in enumerate(leases) if lease.device_id == "dev-0001")
    workers[dead].close()
    # ... a replacement takes over exactly that slot
    replacement = claim_slot(connect(), run_id, timeout_s=10, poll_s=0.2)
    assert replacement.device_id == "dev-0001"


def test_a_retired_slot_is_not_claimed_again_and_foreign_tokens_are_dead_lettered(
    connect: Callable[[], Transport], run_id: str
) -> None:
    admin = connect()
    _publish_slots(admin, run_id, 1)
    publish_message(
        admin,
        topology.SLOTS_EXCHANGE,
        topology.SLOT_KEY,
        DeviceSlot(run_id="other-run", device_id="dev-0009"),
    )
    worker = connect()
    lease = claim_slot(worker, run_id, timeout_s=10, poll_s=0.2)
    assert lease.device_id == "dev-0000"
    # When the run finishes the worker retires the token; after it leaves nobody can claim the slot
    lease.retire()
    worker.close()
    with pytest.raises(NoFreeSlot):
        claim_slot(connect(), run_id, timeout_s=1.5, poll_s=0.2)
    # And the other run's token went to the dead-letter queue as wrong_run
    assert admin.queue_depth(topology.DEAD_LETTER_QUEUE) == 1
