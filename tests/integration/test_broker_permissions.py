"""broker_config/definitions.json imported into the real RabbitMQ: each role can do its job, and no more.

``rabbitmqctl import_definitions`` applies to the vhost and users named in the file, so the module
imports a copy rewritten to a throwaway vhost (tests/conftest.py ``throwaway_vhost``) and to user names
with a random suffix (users are global; they are deleted afterwards). The admin user is left out.
Each attack runs on a fresh connection and must be refused with ACCESS_REFUSED; a test lists every
attack the broker let through.

Routing keys are written out here (``update.dev-0001``), not taken from the topology module: they are
the wire contract the topic permissions of definitions.json authorise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet.transport.base import (
    AccessRefused,
    Delivery,
    QueueSpec,
    Subscription,
    TransportError,
    dead_letter_reason,
)
from lorafleet.transport.rabbitmq import PikaTransport
from lorafleet.transport.topology import (
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVAL_EXCHANGE,
    ORCHESTRATOR_QUEUE,
    ROUNDS_EXCHANGE,
    SLOTS_EXCHANGE,
    SLOTS_QUEUE,
    TASKS_EXCHANGE,
    UPDATES_EXCHANGE,
    UPDATES_QUEUE,
    declare_static_topology,
    device_eval_queue,
    device_task_queue,
    eval_queue_name,
    task_queue_name,
)
from tests.conftest import RABBITMQ_HOST, RABBITMQ_PORT, _port_open, _unavailable, throwaway_vhost

pytestmark = pytest.mark.rabbitmq

DEFINITIONS = Path(__file__).resolve().parents[2] / "broker_config" / "definitions.json"
ADMIN = "lf-admin"
DEVICE, OTHER = "dev-0001", "dev-0002"
DEVICE_USER = f"lf-{DEVICE}"  # a provisioned device's own user
ELASTIC_USER = "lf-worker"  # shared by replicas that claim a device slot


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def _dev_password(user: str) -> str:
    """The documented development password of a user of the committed file: dev-<name without lf->."""
    return f"dev-{user.removeprefix('lf-')}"


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    """User name in definitions.json -> AMQP URL, after importing the file into a throwaway vhost;
    ``"guest"``: the vhost's administrator (full rights). One import for the module: the tests use
    disjoint queues, and an attack the broker refuses changes nothing."""
    if not _port_open(RABBITMQ_HOST, RABBITMQ_PORT) or shutil.which("rabbitmqctl") is None:
        _unavailable(f"RabbitMQ on {RABBITMQ_HOST}:{RABBITMQ_PORT}")
    with throwaway_vhost() as vhost_url:
        yield from _imported(vhost_url)


def _imported(vhost_url: str) -> Iterator[dict[str, str]]:
    vhost = vhost_url.rsplit("/", 1)[1].split("?", 1)[0]
    suffix = uuid.uuid4().hex[:8]
    doc: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    users = {u["name"]: f"{u['name']}-{suffix}" for u in doc["users"] if u["name"] != ADMIN}
    doc["vhosts"] = [{"name": vhost}]
    doc["users"] = [dict(u, name=users[u["name"]]) for u in doc["users"] if u["name"] in users]
    for kind in ("permissions", "topic_permissions"):
        doc[kind] = [
            dict(p, user=users[p["user"]], vhost=vhost) for p in doc.get(kind, []) if p["user"] in users
        ]
    for kind in ("queues", "exchanges", "bindings", "policies"):
        doc[kind] = [dict(item, vhost=vhost) for item in doc.get(kind, [])]
    topic_users = {p["user"] for p in doc["topic_permissions"]}
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
            topics = _rabbitmqctl("list_topic_permissions", "-p", vhost)
            queues = _rabbitmqctl("list_queues", "-p", vhost, "name")
            if (
                all(u in granted for u in users.values())
                and all(u in topics for u in topic_users)
                and DEAD_LETTER_QUEUE in queues
            ):
                break
            assert time.monotonic() < deadline, "definitions were not imported"
            time.sleep(0.2)
        base = vhost_url.split("://", 1)[1].split("@", 1)[1]
        found = {user: f"amqp://{renamed}:{_dev_password(user)}@{base}" for user, renamed in users.items()}
        yield {**found, "guest": vhost_url}
    finally:
        path.unlink(missing_ok=True)
        deleting = [
            subprocess.Popen(
                ["rabbitmqctl", "-q", "delete_user", user],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for user in users.values()
        ]
        for process in deleting:
            process.wait(timeout=120)


def _transport(url: str) -> PikaTransport:
    return PikaTransport(url, max_reconnect_s=3.0)


def _get(sub: Subscription) -> Delivery:
    delivery = sub.get(timeout=5.0)
    assert delivery is not None
    return delivery


Attack = Callable[[PikaTransport], object]


def _publish(exchange: str, key: str) -> Attack:
    return lambda t: t.publish(exchange, key, b"forged", message_id=f"forged:{uuid.uuid4().hex}")


def _subscribe(queue: str) -> Attack:
    return lambda t: t.subscribe(queue).close()


def _purge(queue: str) -> Attack:
    return lambda t: t.purge(queue)


def _declare(name: str) -> Attack:
    return lambda t: t.declare_queue(QueueSpec(name))


def _not_refused(url: str, attacks: dict[str, Attack]) -> list[str]:
    """The attacks the broker did not refuse with ACCESS_REFUSED (each on a fresh connection)."""
    allowed = []
    for what, attack in attacks.items():
        transport = _transport(url)
        try:
            attack(transport)
            allowed.append(f"{what}: allowed")
        except AccessRefused:
            pass
        except TransportError as exc:
            allowed.append(f"{what}: not refused but {type(exc).__name__}: {exc}")
        finally:
            transport.close()
    return allowed


def _setup_device_queues(urls: dict[str, str], *devices: str) -> None:
    orchestrator = _transport(urls["lf-orchestrator"])
    try:
        declare_static_topology(orchestrator)
        for device in devices:
            orchestrator.declare_queue(device_task_queue(device))
            orchestrator.declare_queue(device_eval_queue(device))
    finally:
        orchestrator.close()


def test_roles_can_do_their_job(urls: dict[str, str]) -> None:
    orchestrator = _transport(urls["lf-orchestrator"])
    device = _transport(urls[DEVICE_USER])
    elastic = _transport(urls[ELASTIC_USER])
    aggregator = _transport(urls["lf-aggregator"])
    admin = _transport(urls["guest"])
    try:
        # Every role may "declare" the static topology: what it may not configure, it finds by a
        # passive declare (definitions.json created it with the very same arguments).
        for transport in (orchestrator, device, elastic, aggregator):
            declare_static_topology(transport)

        # Orchestrator: declares and binds device task and evaluation queues, publishes tasks and slot
        # tokens.
        for d in (DEVICE, OTHER):
            orchestrator.declare_queue(device_task_queue(d))
            orchestrator.declare_queue(device_eval_queue(d))
            orchestrator.publish(TASKS_EXCHANGE, d, b"task", message_id=f"task:{d}")
        orchestrator.publish(SLOTS_EXCHANGE, "slot", b"slot", message_id="slot:1")
        assert orchestrator.purge(task_queue_name(OTHER)) == 1  # stale tasks before a new one
        orchestrator.publish(TASKS_EXCHANGE, OTHER, b"task", message_id=f"task:{OTHER}")

        # A provisioned device: takes its task, reports under its own routing keys, dead-letters a task.
        tasks = device.subscribe(task_queue_name(DEVICE))
        task = _get(tasks)
        assert task.message_id == f"task:{DEVICE}"
        device.publish(UPDATES_EXCHANGE, f"update.{DEVICE}", b"update", message_id="upd:1")
        device.publish(CONTROL_EXCHANGE, f"register.{DEVICE}", b"hello", message_id="reg:1")
        device.publish(CONTROL_EXCHANGE, f"heartbeat.{DEVICE}", b"beat", message_id="beat:1")
        task.dead_letter("bad_input", "device")  # republished to lf.dlx with the task's routing key
        tasks.close()

        # Aggregator: fans an evaluation task out; the device takes its copy, reports, dead-letters one.
        aggregator.publish(EVAL_EXCHANGE, "eval", b"eval-1", message_id="eval:1")
        aggregator.publish(EVAL_EXCHANGE, "eval", b"eval-2", message_id="eval:2")
        evaluations = device.subscribe(eval_queue_name(DEVICE))
        newest = _get(evaluations)
        assert newest.message_id == "eval:2"  # the newer dropped the older (one waits)
        newest.ack()
        aggregator.publish(EVAL_EXCHANGE, "eval", b"eval-3", message_id="eval:3")
        device.publish(UPDATES_EXCHANGE, f"update.{DEVICE}", b"result", message_id="res:1")
        bad = _get(evaluations)
        assert bad.message_id == "eval:3"
        bad.dead_letter("bad_input", "device evaluation")  # republished to lf.dlx under "eval"
        evaluations.close()

        # An elastic replica: claims a slot token (held unacked), then serves that device.
        slots = elastic.subscribe(SLOTS_QUEUE)
        assert _get(slots).message_id == "slot:1"
        other_tasks = elastic.subscribe(task_queue_name(OTHER))
        _get(other_tasks).ack()
        other_tasks.close()
        other_evaluations = elastic.subscribe(eval_queue_name(OTHER))
        assert _get(other_evaluations).message_id == "eval:3"
        other_evaluations.close()
        elastic.publish(UPDATES_EXCHANGE, f"update.{OTHER}", b"update", message_id="upd:2")
        elastic.publish(CONTROL_EXCHANGE, f"heartbeat.{OTHER}", b"beat", message_id="beat:2")
        slots.close()  # the token goes back for the next replica
        assert admin.queue_depth(SLOTS_QUEUE) == 1

        # Aggregator: consumes updates, dead-letters one, announces rounds.
        updates = aggregator.subscribe(UPDATES_QUEUE, prefetch=3)
        first, second, third = _get(updates), _get(updates), _get(updates)
        assert {first.message_id, second.message_id, third.message_id} == {"upd:1", "res:1", "upd:2"}
        first.ack()
        second.ack()
        third.dead_letter("bad_input", "aggregator")
        updates.close()
        aggregator.publish(ROUNDS_EXCHANGE, "round", b"round", message_id="round:1")

        # Orchestrator: consumes registrations, heartbeats and round events, dead-letters one.
        inbox = orchestrator.subscribe(ORCHESTRATOR_QUEUE, prefetch=4)
        got = [_get(inbox) for _ in range(4)]
        assert {d.message_id for d in got} == {"reg:1", "beat:1", "beat:2", "round:1"}
        for delivery in got[:-1]:
            delivery.ack()
        got[-1].dead_letter("bad_input", "orchestrator")
        inbox.close()

        assert admin.queue_depth(task_queue_name(DEVICE)) == 0
        assert admin.queue_depth(UPDATES_QUEUE) == 0
        assert admin.queue_depth(eval_queue_name(DEVICE)) == 0
        dead = admin.subscribe(DEAD_LETTER_QUEUE, prefetch=4)
        details = set()
        for _ in range(4):
            d = _get(dead)
            assert dead_letter_reason(d.headers) == "bad_input"
            details.add(d.headers["x-lorafleet-detail"])
            d.ack()
        assert details == {"device", "device evaluation", "aggregator", "orchestrator"}
        dead.close()
    finally:
        for transport in (orchestrator, device, elastic, aggregator, admin):
            transport.close()


def test_a_device_cannot_act_for_another_device(urls: dict[str, str]) -> None:
    _setup_device_queues(urls, DEVICE, OTHER)
    attacks = {
        "read another device's tasks": _subscribe(task_queue_name(OTHER)),
        "purge another device's tasks": _purge(task_queue_name(OTHER)),
        "read another device's evaluation tasks": _subscribe(eval_queue_name(OTHER)),
        "publish an evaluation task": _publish(EVAL_EXCHANGE, "eval"),
        "take a slot token": _subscribe(SLOTS_QUEUE),
        "purge the slot tokens": _purge(SLOTS_QUEUE),
        "register as another device": _publish(CONTROL_EXCHANGE, f"register.{OTHER}"),
        "heartbeat for another device": _publish(CONTROL_EXCHANGE, f"heartbeat.{OTHER}"),
        "register without naming itself": _publish(CONTROL_EXCHANGE, "register"),
        "heartbeat without naming itself": _publish(CONTROL_EXCHANGE, "heartbeat"),
        "update as another device": _publish(UPDATES_EXCHANGE, f"update.{OTHER}"),
        "update without naming itself": _publish(UPDATES_EXCHANGE, "update"),
        "dead letter in another device's name": _publish(DEAD_LETTER_EXCHANGE, OTHER),
        "dead letter posing as an update": _publish(DEAD_LETTER_EXCHANGE, f"update.{DEVICE}"),
        "dead letter posing as a round event": _publish(DEAD_LETTER_EXCHANGE, "round"),
        "publish a task": _publish(TASKS_EXCHANGE, OTHER),
        "publish a round event": _publish(ROUNDS_EXCHANGE, "round"),
        "publish a slot token": _publish(SLOTS_EXCHANGE, "slot"),
        "read the updates": _subscribe(UPDATES_QUEUE),
        "read the orchestrator's inbox": _subscribe(ORCHESTRATOR_QUEUE),
        "read the dead letters": _subscribe(DEAD_LETTER_QUEUE),
        "declare a queue": _declare(task_queue_name("dev-0003")),
    }
    assert _not_refused(urls[DEVICE_USER], attacks) == []


def test_an_elastic_worker_may_serve_any_slot_and_nothing_else(urls: dict[str, str]) -> None:
    _setup_device_queues(urls, DEVICE)
    attacks = {
        "update without naming a device": _publish(UPDATES_EXCHANGE, "update"),
        "register without naming a device": _publish(CONTROL_EXCHANGE, "register"),
        "heartbeat without naming a device": _publish(CONTROL_EXCHANGE, "heartbeat"),
        "update under a non-device key": _publish(UPDATES_EXCHANGE, "update.lf-orchestrator"),
        "dead letter posing as an update": _publish(DEAD_LETTER_EXCHANGE, f"update.{DEVICE}"),
        "dead letter posing as a round event": _publish(DEAD_LETTER_EXCHANGE, "round"),
        "publish a task": _publish(TASKS_EXCHANGE, DEVICE),
        "publish a round event": _publish(ROUNDS_EXCHANGE, "round"),
        "publish a slot token": _publish(SLOTS_EXCHANGE, "slot"),
        "read the updates": _subscribe(UPDATES_QUEUE),
        "purge the updates": _purge(UPDATES_QUEUE),
        "read the orchestrator's inbox": _subscribe(ORCHESTRATOR_QUEUE),
        "read the dead letters": _subscribe(DEAD_LETTER_QUEUE),
        "declare a queue": _declare(task_queue_name("dev-0003")),
        "publish an evaluation task": _publish(EVAL_EXCHANGE, "eval"),
    }
    assert _not_refused(urls[ELASTIC_USER], attacks) == []


def test_the_orchestrator_declares_only_device_task_queues(urls: dict[str, str]) -> None:
    _setup_device_queues(urls, DEVICE)
    attacks = {
        "declare a queue outside lorafleet's names": _declare("evil"),
        "declare a task queue for no device": _declare("lf.tasks.evil"),
        "declare an evaluation queue for no device": _declare("lf.eval.evil"),
        "read a device's evaluation tasks": _subscribe(eval_queue_name(DEVICE)),
        "purge a device's evaluation tasks": _purge(eval_queue_name(DEVICE)),
        "publish an evaluation task": _publish(EVAL_EXCHANGE, "eval"),
        "declare a queue under a task queue's name": _declare(f"lf.tasks.{DEVICE}.copy"),
        "declare a static queue": _declare("lf.updates2"),
        "read the updates": _subscribe(UPDATES_QUEUE),
        "purge the updates": _purge(UPDATES_QUEUE),
        "take a slot token": _subscribe(SLOTS_QUEUE),
        "purge the slot tokens": _purge(SLOTS_QUEUE),
        "read the dead letters": _subscribe(DEAD_LETTER_QUEUE),
        "publish an update": _publish(UPDATES_EXCHANGE, f"update.{DEVICE}"),
        "register a device": _publish(CONTROL_EXCHANGE, f"register.{DEVICE}"),
        "publish a round event": _publish(ROUNDS_EXCHANGE, "round"),
        "dead letter posing as an update": _publish(DEAD_LETTER_EXCHANGE, f"update.{DEVICE}"),
        "dead letter posing as a device's task": _publish(DEAD_LETTER_EXCHANGE, DEVICE),
    }
    assert _not_refused(urls["lf-orchestrator"], attacks) == []


def test_the_aggregator_reads_only_the_updates(urls: dict[str, str]) -> None:
    _setup_device_queues(urls, DEVICE)
    attacks = {
        "declare a queue": _declare(task_queue_name("dev-0003")),
        "read a device's tasks": _subscribe(task_queue_name(DEVICE)),
        "purge a device's tasks": _purge(task_queue_name(DEVICE)),
        "read a device's evaluation tasks": _subscribe(eval_queue_name(DEVICE)),
        "declare an evaluation queue": _declare(eval_queue_name("dev-0003")),
        "read the orchestrator's inbox": _subscribe(ORCHESTRATOR_QUEUE),
        "purge the orchestrator's inbox": _purge(ORCHESTRATOR_QUEUE),
        "take a slot token": _subscribe(SLOTS_QUEUE),
        "purge the slot tokens": _purge(SLOTS_QUEUE),
        "read the dead letters": _subscribe(DEAD_LETTER_QUEUE),
        "purge the dead letters": _purge(DEAD_LETTER_QUEUE),
        "publish a task": _publish(TASKS_EXCHANGE, DEVICE),
        "publish an update": _publish(UPDATES_EXCHANGE, f"update.{DEVICE}"),
        "register a device": _publish(CONTROL_EXCHANGE, f"register.{DEVICE}"),
        "publish a slot token": _publish(SLOTS_EXCHANGE, "slot"),
        "dead letter posing as a registration": _publish(DEAD_LETTER_EXCHANGE, f"register.{DEVICE}"),
        "dead letter posing as a device's task": _publish(DEAD_LETTER_EXCHANGE, DEVICE),
    }
    assert _not_refused(urls["lf-aggregator"], attacks) == []
    # Residual (broker_config/README.md): RabbitMQ checks queue.purge against *read*, the permission
    # that consuming needs, so the aggregator can empty lf.updates, as it could by consuming and acking.
    aggregator = _transport(urls["lf-aggregator"])
    try:
        assert aggregator.purge(UPDATES_QUEUE) == 0
    finally:
        aggregator.close()


def test_wrong_password_is_refused(urls: dict[str, str]) -> None:
    url = urls["lf-aggregator"].replace(":dev-aggregator@", ":wrong@")
    transport = PikaTransport(url, connection_attempts=1, max_reconnect_s=1.0)
    with pytest.raises(AccessRefused):
        transport.queue_depth(UPDATES_QUEUE)
    transport.close()
