"""broker_config/definitions.json imported into the real RabbitMQ: each role can do its job, and no more.

``rabbitmqctl import_definitions`` applies to the vhost and users named in the file, so the test
imports a copy rewritten to the throwaway vhost of the ``rabbitmq_url`` fixture and to user names
with a random suffix (users are global; they are deleted afterwards). The admin user is left out.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet.transport.base import AccessRefused, Delivery, Subscription, dead_letter_reason
from lorafleet.transport.rabbitmq import PikaTransport
from lorafleet.transport.topology import (
    CONTROL_EXCHANGE,
    DEAD_LETTER_QUEUE,
    ORCHESTRATOR_QUEUE,
    REGISTER_KEY,
    ROUNDS_EXCHANGE,
    ROUNDS_KEY,
    TASKS_EXCHANGE,
    UPDATE_KEY,
    UPDATES_EXCHANGE,
    UPDATES_QUEUE,
    declare_static_topology,
    device_task_queue,
    task_queue_name,
)

pytestmark = pytest.mark.rabbitmq

DEFINITIONS = Path(__file__).resolve().parents[2] / "broker_config" / "definitions.json"
ROLES = ("lf-orchestrator", "lf-aggregator", "lf-worker")
DEVICE = "dev-0001"


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


@pytest.fixture
def role_urls(rabbitmq_url: str) -> Iterator[dict[str, str]]:
    """Role -> AMQP URL, after importing definitions.json into the fixture's vhost."""
    vhost = rabbitmq_url.rsplit("/", 1)[1].split("?", 1)[0]
    suffix = uuid.uuid4().hex[:8]
    users = {role: f"{role}-{suffix}" for role in ROLES}
    doc: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    doc["vhosts"] = [{"name": vhost}]
    doc["users"] = [dict(u, name=users[u["name"]]) for u in doc["users"] if u["name"] in users]
    doc["permissions"] = [
        dict(p, user=users[p["user"]], vhost=vhost) for p in doc["permissions"] if p["user"] in users
    ]
    for kind in ("queues", "exchanges", "bindings", "policies"):
        doc[kind] = [dict(item, vhost=vhost) for item in doc.get(kind, [])]
    # rabbitmqctl reads the file as the broker's user (Debian's wrapper), and 3.10 refuses "-" (stdin).
    fd, name = tempfile.mkstemp(prefix="lf-definitions-", suffix=".json", dir="/tmp")
    path = Path(name)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out)
        path.chmod(0o644)
        _rabbitmqctl("import_definitions", str(path))
        deadline = time.monotonic() + 30
        while True:  # the import finishes asynchronously
            granted = _rabbitmqctl("list_permissions", "-p", vhost)
            queues = _rabbitmqctl("list_queues", "-p", vhost, "name")
            if all(u in granted for u in users.values()) and DEAD_LETTER_QUEUE in queues:
                break
            assert time.monotonic() < deadline, "definitions were not imported"
            time.sleep(0.2)
        base = rabbitmq_url.split("://", 1)[1].split("@", 1)[1]
        yield {role: f"amqp://{user}:dev-{role.removeprefix('lf-')}@{base}" for role, user in users.items()}
    finally:
        path.unlink(missing_ok=True)
        for user in users.values():
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60)


def _get(sub: Subscription) -> Delivery:
    delivery = sub.get(timeout=5.0)
    assert delivery is not None
    return delivery


def test_roles_can_do_their_job_and_nothing_else(role_urls: dict[str, str], rabbitmq_url: str) -> None:
    orchestrator = PikaTransport(role_urls["lf-orchestrator"], max_reconnect_s=3.0)
    worker = PikaTransport(role_urls["lf-worker"], max_reconnect_s=3.0)
    aggregator = PikaTransport(role_urls["lf-aggregator"], max_reconnect_s=3.0)
    admin = PikaTransport(rabbitmq_url, max_reconnect_s=3.0)  # guest, full rights on the vhost
    task_queue = task_queue_name(DEVICE)
    try:
        # Every role may "declare" the static topology: what it may not configure, it finds by a
        # passive declare (definitions.json created it with the very same arguments).
        for transport in (orchestrator, worker, aggregator):
            declare_static_topology(transport)

        # Orchestrator: declares and binds a device's task queue, publishes a task.
        orchestrator.declare_queue(device_task_queue(DEVICE))
        orchestrator.publish(TASKS_EXCHANGE, DEVICE, b"task", message_id="task:1")
        assert orchestrator.queue_depth(task_queue) == 1
        with pytest.raises(AccessRefused):
            orchestrator.publish(UPDATES_EXCHANGE, UPDATE_KEY, b"forged", message_id="forged:1")
        with pytest.raises(AccessRefused):
            orchestrator.subscribe(UPDATES_QUEUE)

        # Worker: takes its task, reports, registers; may not forge tasks or read updates.
        with pytest.raises(AccessRefused):
            worker.declare_queue(device_task_queue("dev-0002"))  # no configure rights
        tasks = worker.subscribe(task_queue)
        task = _get(tasks)
        assert task.message_id == "task:1"
        worker.publish(UPDATES_EXCHANGE, UPDATE_KEY, b"update", message_id="upd:1")
        worker.publish(UPDATES_EXCHANGE, UPDATE_KEY, b"update", message_id="upd:2")
        worker.publish(CONTROL_EXCHANGE, REGISTER_KEY, b"hello", message_id="reg:1")
        with pytest.raises(AccessRefused):
            worker.publish(TASKS_EXCHANGE, DEVICE, b"forged", message_id="forged:2")
        with pytest.raises(AccessRefused):
            worker.publish(ROUNDS_EXCHANGE, ROUNDS_KEY, b"forged", message_id="forged:3")
        with pytest.raises(AccessRefused):
            worker.subscribe(UPDATES_QUEUE)
        with pytest.raises(AccessRefused):
            worker.purge(UPDATES_QUEUE)
        task.dead_letter("bad_input", "worker")  # needs write on lf.dlx
        tasks.close()

        # Aggregator: consumes updates, announces rounds; may not send tasks or read control traffic.
        updates = aggregator.subscribe(UPDATES_QUEUE)
        _get(updates).ack()
        _get(updates).dead_letter("bad_input", "aggregator")
        updates.close()
        aggregator.publish(ROUNDS_EXCHANGE, ROUNDS_KEY, b"round", message_id="round:1")
        with pytest.raises(AccessRefused):
            aggregator.publish(TASKS_EXCHANGE, DEVICE, b"forged", message_id="forged:4")
        with pytest.raises(AccessRefused):
            aggregator.subscribe(ORCHESTRATOR_QUEUE)

        # Orchestrator: consumes registrations and round events, dead-letters one.
        inbox = orchestrator.subscribe(ORCHESTRATOR_QUEUE, prefetch=2)
        first, second = _get(inbox), _get(inbox)
        assert {first.message_id, second.message_id} == {"reg:1", "round:1"}
        first.ack()
        second.dead_letter("bad_input", "orchestrator")
        inbox.close()

        assert admin.queue_depth(task_queue) == 0
        assert admin.queue_depth(UPDATES_QUEUE) == 0
        dead = admin.subscribe(DEAD_LETTER_QUEUE, prefetch=3)
        details = set()
        for _ in range(3):
            d = _get(dead)
            assert dead_letter_reason(d.headers) == "bad_input"
            details.add(d.headers["x-lorafleet-detail"])
            d.ack()
        assert details == {"worker", "aggregator", "orchestrator"}
        dead.close()
    finally:
        for transport in (orchestrator, worker, aggregator, admin):
            transport.close()


def test_wrong_password_is_refused(role_urls: dict[str, str]) -> None:
    url = role_urls["lf-worker"].replace(":dev-worker@", ":wrong@")
    transport = PikaTransport(url, connection_attempts=1, max_reconnect_s=1.0)
    with pytest.raises(AccessRefused):
        transport.queue_depth(UPDATES_QUEUE)
    transport.close()
