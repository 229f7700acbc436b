"""``lorafleet dlq``: list and count dead letters by reason without losing them."""

from __future__ import annotations

import json
import subprocess
import sys

from lorafleet.app.dlq import count_by_reason, inspect_dead_letters
from lorafleet.transport import topology
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport


def _dead_letters(transport: InMemoryTransport, reasons: list[str]) -> None:
    topology.declare_static_topology(transport)
    for i, _ in enumerate(reasons):
        transport.publish(topology.UPDATES_EXCHANGE, topology.UPDATE_KEY, b"x" * (i + 1), message_id=f"m{i}")
    sub = transport.subscribe(topology.UPDATES_QUEUE, prefetch=len(reasons))
    for reason in reasons:
        delivery = sub.get(1.0)
        assert delivery is not None
        delivery.dead_letter(reason, f"detail of {reason}")
    sub.close()


def test_inspecting_counts_by_reason_and_leaves_the_messages() -> None:
    transport = InMemoryTransport(InMemoryBroker())
    _dead_letters(transport, ["non_finite", "undecodable", "non_finite"])
    letters = inspect_dead_letters(transport, wait_s=0.2)
    assert count_by_reason(letters) == {"non_finite": 2, "undecodable": 1}
    assert {x.queue for x in letters} == {topology.UPDATES_QUEUE}
    assert transport.queue_depth(topology.DEAD_LETTER_QUEUE) == 3  # still there
    purged = inspect_dead_letters(transport, purge=True, wait_s=0.2)
    assert len(purged) == 3 and transport.queue_depth(topology.DEAD_LETTER_QUEUE) == 0


def test_the_cli_lists_the_real_dead_letter_queue(rabbitmq_url: str) -> None:
    from lorafleet.transport.rabbitmq import PikaTransport

    transport = PikaTransport(rabbitmq_url)
    try:
        topology.declare_static_topology(transport)
        transport.publish(topology.UPDATES_EXCHANGE, topology.UPDATE_KEY, b"garbage", message_id="bad-1")
        sub = transport.subscribe(topology.UPDATES_QUEUE)
        delivery = sub.get(5.0)
        assert delivery is not None
        delivery.dead_letter("undecodable", "not msgpack")
        sub.close()
        out = subprocess.run(
            [sys.executable, "-m", "lorafleet", "dlq", "--broker", rabbitmq_url, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        listing = json.loads(out.stdout)
        assert listing["by_reason"] == {"undecodable": 1}
        assert listing["messages"][0]["message_id"] == "bad-1"
        assert transport.queue_depth(topology.DEAD_LETTER_QUEUE) == 1
    finally:
        transport.close()
