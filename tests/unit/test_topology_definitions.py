"""broker_config/definitions.json declares exactly the topology module, with least-privilege roles."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from lorafleet.transport import topology
from lorafleet.transport.base import QueueSpec

DEFINITIONS = Path(__file__).resolve().parents[2] / "broker_config" / "definitions.json"
ROLES = ("lf-orchestrator", "lf-aggregator", "lf-worker")


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    return json.loads(DEFINITIONS.read_text())


def _expected_arguments(spec: QueueSpec) -> dict[str, Any]:
    """Written out independently of PikaTransport.queue_arguments, which must agree with it."""
    args: dict[str, Any] = {"x-queue-type": "quorum"} if spec.quorum else {}
    if spec.dead_letter_exchange:
        args["x-dead-letter-exchange"] = spec.dead_letter_exchange
        if spec.quorum:  # at-least-once dead-lettering exists for quorum queues only
            args |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    if spec.delivery_limit is not None and spec.quorum:
        args["x-delivery-limit"] = spec.delivery_limit
    return args


def _permissions(definitions: dict[str, Any], user: str) -> dict[str, str]:
    (entry,) = [p for p in definitions["permissions"] if p["user"] == user]
    assert entry["vhost"] == topology.VHOST
    return entry


def _allows(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None  # RabbitMQ matches unanchored, like re.search


def test_vhost(definitions: dict[str, Any]) -> None:
    assert definitions["vhosts"] == [{"name": topology.VHOST}]


def test_exchanges_match_topology(definitions: dict[str, Any]) -> None:
    got = {
        (e["name"], e["type"], e["durable"], e["auto_delete"], e["internal"], e["vhost"])
        for e in definitions["exchanges"]
    }
    assert got == {(e.name, e.type, True, False, False, topology.VHOST) for e in topology.EXCHANGES}


def test_queues_match_topology_with_arguments(definitions: dict[str, Any]) -> None:
    got = {q["name"]: q for q in definitions["queues"]}
    assert set(got) == {q.name for q in topology.STATIC_QUEUES}
    for spec in topology.STATIC_QUEUES:
        queue = got[spec.name]
        assert (queue["vhost"], queue["durable"], queue["auto_delete"]) == (topology.VHOST, True, False)
        assert queue["arguments"] == _expected_arguments(spec), spec.name
    work = got[topology.UPDATES_QUEUE]["arguments"]
    assert work["x-delivery-limit"] == topology.DELIVERY_LIMIT
    assert work["x-dead-letter-exchange"] == topology.DEAD_LETTER_EXCHANGE


def test_queue_arguments_equal_what_the_adapter_declares(definitions: dict[str, Any]) -> None:
    from lorafleet.transport.rabbitmq import queue_arguments

    got = {q["name"]: q["arguments"] for q in definitions["queues"]}
    for spec in topology.STATIC_QUEUES:
        assert got[spec.name] == queue_arguments(spec)
    # The per-device queues the orchestrator declares use the same shape.
    assert queue_arguments(topology.device_task_queue("dev-0001")) == got[topology.UPDATES_QUEUE]


def test_bindings_match_topology(definitions: dict[str, Any]) -> None:
    got = {
        (b["source"], b["destination"], b["routing_key"], b["destination_type"], b["vhost"])
        for b in definitions["bindings"]
    }
    want = {
        (exchange, spec.name, key, "queue", topology.VHOST)
        for spec in topology.STATIC_QUEUES
        for exchange, key in spec.bindings
    }
    assert got == want


def test_users_have_sha256_hashes_of_the_documented_dev_passwords(definitions: dict[str, Any]) -> None:
    users = {u["name"]: u for u in definitions["users"]}
    assert set(ROLES) <= set(users) and "guest" not in users
    assert "regenerate" in definitions["_comment"].lower()
    for name, user in users.items():
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        raw = base64.b64decode(user["password_hash"])
        salt, digest = raw[:4], raw[4:]
        assert digest == hashlib.sha256(salt + f"dev-{name.removeprefix('lf-')}".encode()).digest(), name
    assert users["lf-admin"]["tags"] == ["administrator"]
    assert all(users[role]["tags"] == [] for role in ROLES)


def test_orchestrator_permissions(definitions: dict[str, Any]) -> None:
    p = _permissions(definitions, "lf-orchestrator")
    task_queue = topology.task_queue_name("dev-0001")
    assert _allows(p["configure"], task_queue)
    for name in (
        topology.TASKS_EXCHANGE,
        topology.UPDATES_QUEUE,
        topology.ORCHESTRATOR_QUEUE,
        topology.DEAD_LETTER_QUEUE,
    ):
        assert not _allows(p["configure"], name), name
    # Publishes tasks, binds task queues (write on the queue), dead-letters.
    for name in (topology.TASKS_EXCHANGE, task_queue, topology.DEAD_LETTER_EXCHANGE):
        assert _allows(p["write"], name), name
    for name in (topology.UPDATES_EXCHANGE, topology.CONTROL_EXCHANGE, topology.ROUNDS_EXCHANGE, "lf.tasksX"):
        assert not _allows(p["write"], name), name
    # Consumes its queue; binding needs read on the tasks exchange; declaring a queue with a DLX
    # needs read on that queue.
    for name in (topology.ORCHESTRATOR_QUEUE, topology.TASKS_EXCHANGE, task_queue):
        assert _allows(p["read"], name), name
    for name in (topology.UPDATES_QUEUE, topology.DEAD_LETTER_QUEUE, topology.CONTROL_EXCHANGE):
        assert not _allows(p["read"], name), name


def test_aggregator_permissions(definitions: dict[str, Any]) -> None:
    p = _permissions(definitions, "lf-aggregator")
    assert p["configure"] == "^$"
    assert _allows(p["write"], topology.ROUNDS_EXCHANGE)
    assert _allows(p["write"], topology.DEAD_LETTER_EXCHANGE)
    for name in (topology.TASKS_EXCHANGE, topology.UPDATES_EXCHANGE, topology.CONTROL_EXCHANGE):
        assert not _allows(p["write"], name), name
    assert _allows(p["read"], topology.UPDATES_QUEUE)
    for name in (
        topology.ORCHESTRATOR_QUEUE,
        topology.task_queue_name("dev-0001"),
        topology.DEAD_LETTER_QUEUE,
    ):
        assert not _allows(p["read"], name), name


def test_worker_permissions(definitions: dict[str, Any]) -> None:
    p = _permissions(definitions, "lf-worker")
    assert p["configure"] == "^$"
    for name in (topology.UPDATES_EXCHANGE, topology.CONTROL_EXCHANGE, topology.DEAD_LETTER_EXCHANGE):
        assert _allows(p["write"], name), name
    for name in (topology.TASKS_EXCHANGE, topology.ROUNDS_EXCHANGE, "lf.updatesX", "xlf.control"):
        assert not _allows(p["write"], name), name
    assert _allows(p["read"], topology.task_queue_name("dev-0001"))
    for name in (
        topology.UPDATES_QUEUE,
        topology.ORCHESTRATOR_QUEUE,
        topology.TASKS_EXCHANGE,
        topology.DEAD_LETTER_QUEUE,
    ):
        assert not _allows(p["read"], name), name
