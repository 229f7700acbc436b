"""broker_config/definitions.json declares exactly the topology module, with least-privilege roles."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from lorafleet.transport import topology
from lorafleet.transport.base import QueueSpec
from lorafleet.transport.memory import topic_matches
from schemas.config import device_id

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = ROOT / "broker_config" / "definitions.json"
SERVICES = ("lf-orchestrator", "lf-aggregator")
ELASTIC = "lf-worker"
DEVICES = tuple(device_id(i) for i in range(8))  # the committed file's provisioned slots


def _load_make_definitions() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_definitions", ROOT / "broker_config" / "make_definitions.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


make_definitions = _load_make_definitions()


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


def _topics(definitions: dict[str, Any], user: str) -> dict[str, dict[str, str]]:
    """Exchange -> topic permission of ``user``."""
    entries = [p for p in definitions["topic_permissions"] if p["user"] == user]
    assert all(p["vhost"] == topology.VHOST for p in entries)
    by_exchange = {p["exchange"]: p for p in entries}
    assert len(by_exchange) == len(entries), f"{user}: two topic permissions for one exchange"
    return by_exchange


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
    # The per-device queues the orchestrator declares use the same shape ...
    assert queue_arguments(topology.device_task_queue("dev-0001")) == got[topology.UPDATES_QUEUE]
    # ... but evaluation queues: classic, one waiting task, the oldest dropped, no dead-lettering
    assert queue_arguments(topology.device_eval_queue("dev-0001")) == {
        "x-max-length": 1,
        "x-overflow": "drop-head",
    }


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


def test_the_committed_file_is_what_the_generator_writes(definitions: dict[str, Any]) -> None:
    """Everything but the (salted) password hashes: regenerate with `make_definitions.py --dev`."""
    users = make_definitions.roles()
    fresh = make_definitions.build_definitions(
        {role.user: role.dev_password for role in users}, comment=make_definitions.DEV_COMMENT
    )
    committed = json.loads(json.dumps(definitions))
    for document in (fresh, committed):
        for user in document["users"]:
            user.pop("password_hash")
    assert committed == fresh


def test_routing_keys_name_the_device_and_the_bindings_route_them() -> None:
    assert topology.update_key("dev-0003") == "update.dev-0003"
    assert topology.register_key("dev-0003") == "register.dev-0003"
    assert topology.heartbeat_key("dev-0003") == "heartbeat.dev-0003"
    bindings = [(ex, queue.name, key) for queue in topology.STATIC_QUEUES for ex, key in queue.bindings]
    types = {e.name: e.type for e in topology.EXCHANGES}
    for exchange, queue, keys in (
        (topology.UPDATES_EXCHANGE, topology.UPDATES_QUEUE, ("update.dev-0003", "update.a.b", "update")),
        (topology.CONTROL_EXCHANGE, topology.ORCHESTRATOR_QUEUE, ("register.dev-0003", "heartbeat.dev-9")),
        (
            topology.DEAD_LETTER_EXCHANGE,
            topology.DEAD_LETTER_QUEUE,
            ("dev-0003", "update.dev-1", "round", ""),
        ),
    ):
        assert types[exchange] == "topic"
        bound = [key for ex, q, key in bindings if ex == exchange and q == queue]
        for key in keys:
            assert any(topic_matches(b, key) for b in bound), (exchange, key)
    assert not any(
        topic_matches(b, "updates.dev-0003") for ex, _q, b in bindings if ex == topology.UPDATES_EXCHANGE
    )


def test_the_device_of_a_routing_key() -> None:
    device = topology.routing_key_device
    assert device(topology.UPDATES_EXCHANGE, "update.dev-0003") == "dev-0003"
    assert device(topology.CONTROL_EXCHANGE, "register.dev-0003") == "dev-0003"
    assert device(topology.CONTROL_EXCHANGE, "heartbeat.a.b") == "a.b"
    for exchange, key in (
        (topology.UPDATES_EXCHANGE, "update"),
        (topology.UPDATES_EXCHANGE, "update."),
        (topology.UPDATES_EXCHANGE, "register.dev-0003"),
        (topology.CONTROL_EXCHANGE, "update.dev-0003"),
        (topology.TASKS_EXCHANGE, "dev-0003"),
        (topology.ROUNDS_EXCHANGE, "round.dev-0003"),
    ):
        assert device(exchange, key) is None, (exchange, key)


def test_users_have_sha256_hashes_of_the_documented_dev_passwords(definitions: dict[str, Any]) -> None:
    users = {u["name"]: u for u in definitions["users"]}
    device_users = {f"lf-{d}" for d in DEVICES}
    assert set(users) == {*SERVICES, ELASTIC, *device_users, "lf-admin"}
    assert "regenerate" in definitions["_comment"].lower()
    for name, user in users.items():
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        raw = base64.b64decode(user["password_hash"])
        salt, digest = raw[:4], raw[4:]
        assert digest == hashlib.sha256(salt + f"dev-{name.removeprefix('lf-')}".encode()).digest(), name
    assert users["lf-admin"]["tags"] == ["administrator"]
    assert all(users[name]["tags"] == [] for name in users if name != "lf-admin")


def test_topic_permissions_are_on_topic_exchanges(definitions: dict[str, Any]) -> None:
    """RabbitMQ authorises routing keys on topic exchanges only: elsewhere the permission is void."""
    types = {e["name"]: e["type"] for e in definitions["exchanges"]}
    assert definitions["topic_permissions"]
    for entry in definitions["topic_permissions"]:
        assert types[entry["exchange"]] == "topic", entry
        assert entry["read"] == "^$", entry  # no worker binds queues


def test_orchestrator_permissions(definitions: dict[str, Any]) -> None:
    p = _permissions(definitions, "lf-orchestrator")
    task_queue = topology.task_queue_name("dev-0001")
    eval_queue = topology.eval_queue_name("dev-0001")
    for name in (task_queue, topology.task_queue_name(device_id(12345)), eval_queue):
        assert _allows(p["configure"], name), name
    for name in (
        topology.TASKS_EXCHANGE,
        topology.UPDATES_QUEUE,
        topology.ORCHESTRATOR_QUEUE,
        topology.DEAD_LETTER_QUEUE,
        "lf.tasks.evil",
        "lf.tasks.dev-0001.copy",
        "lf.tasks.dev-001",
        "lf.tasks.",
        "lf.eval.evil",
        topology.EVAL_EXCHANGE,
        "evil",
    ):
        assert not _allows(p["configure"], name), name
    # Publishes tasks and slot tokens, binds task queues (write on the queue), dead-letters.
    for name in (
        topology.TASKS_EXCHANGE,
        task_queue,
        eval_queue,
        topology.SLOTS_EXCHANGE,
        topology.DEAD_LETTER_EXCHANGE,
    ):
        assert _allows(p["write"], name), name
    for name in (
        topology.UPDATES_EXCHANGE,
        topology.CONTROL_EXCHANGE,
        topology.ROUNDS_EXCHANGE,
        topology.EVAL_EXCHANGE,  # the aggregator's evaluation tasks
        "lf.tasksX",
    ):
        assert not _allows(p["write"], name), name
    # Consumes its queue; binding needs read on the tasks exchange; declaring a queue with a DLX
    # needs read on that queue.
    for name in (topology.ORCHESTRATOR_QUEUE, topology.TASKS_EXCHANGE, task_queue, topology.EVAL_EXCHANGE):
        assert _allows(p["read"], name), name
    for name in (
        topology.UPDATES_QUEUE,
        topology.DEAD_LETTER_QUEUE,
        topology.SLOTS_QUEUE,
        topology.CONTROL_EXCHANGE,
        "lf.tasks.evil",
        eval_queue,  # declared without a dead-letter exchange: no read needed, none given
    ):
        assert not _allows(p["read"], name), name
    # It dead-letters what reaches its queue: registrations, heartbeats and round events.
    (dlx,) = _topics(definitions, "lf-orchestrator").values()
    assert dlx["exchange"] == topology.DEAD_LETTER_EXCHANGE
    for key in ("register.dev-0001", "heartbeat.dev-0001", "register", "round"):
        assert _allows(dlx["write"], key), key
    for key in ("update.dev-0001", "dev-0001", "slot", "registers"):
        assert not _allows(dlx["write"], key), key


def test_aggregator_permissions(definitions: dict[str, Any]) -> None:
    p = _permissions(definitions, "lf-aggregator")
    assert p["configure"] == "^$"
    for name in (topology.ROUNDS_EXCHANGE, topology.DEAD_LETTER_EXCHANGE, topology.EVAL_EXCHANGE):
        assert _allows(p["write"], name), name
    for name in (
        topology.TASKS_EXCHANGE,
        topology.UPDATES_EXCHANGE,
        topology.CONTROL_EXCHANGE,
        topology.eval_queue_name("dev-0001"),
    ):
        assert not _allows(p["write"], name), name
    assert _allows(p["read"], topology.UPDATES_QUEUE)
    for name in (
        topology.ORCHESTRATOR_QUEUE,
        topology.task_queue_name("dev-0001"),
        topology.eval_queue_name("dev-0001"),
        topology.DEAD_LETTER_QUEUE,
        topology.SLOTS_QUEUE,
    ):
        assert not _allows(p["read"], name), name
    (dlx,) = _topics(definitions, "lf-aggregator").values()
    assert dlx["exchange"] == topology.DEAD_LETTER_EXCHANGE
    assert _allows(dlx["write"], "update.dev-0001") and _allows(dlx["write"], "update")
    for key in ("register.dev-0001", "dev-0001", "round", "updates"):
        assert not _allows(dlx["write"], key), key


def test_device_permissions(definitions: dict[str, Any]) -> None:
    for device in DEVICES:
        user, other = f"lf-{device}", "dev-9999"
        p = _permissions(definitions, user)
        assert p["configure"] == "^$"
        for name in (topology.UPDATES_EXCHANGE, topology.CONTROL_EXCHANGE, topology.DEAD_LETTER_EXCHANGE):
            assert _allows(p["write"], name), name
        for name in (
            topology.TASKS_EXCHANGE,
            topology.ROUNDS_EXCHANGE,
            topology.SLOTS_EXCHANGE,
            "lf.updatesX",
        ):
            assert not _allows(p["write"], name), name
        assert _allows(p["read"], topology.task_queue_name(device))
        assert _allows(p["read"], topology.eval_queue_name(device))
        for name in (
            topology.task_queue_name(other),
            topology.task_queue_name(device) + "0",
            topology.eval_queue_name(other),
            topology.EVAL_EXCHANGE,
            topology.SLOTS_QUEUE,
            topology.UPDATES_QUEUE,
            topology.ORCHESTRATOR_QUEUE,
            topology.DEAD_LETTER_QUEUE,
        ):
            assert not _allows(p["read"], name), name
        topics = _topics(definitions, user)
        own = {
            topology.UPDATES_EXCHANGE: [topology.update_key(device)],
            topology.CONTROL_EXCHANGE: [topology.register_key(device), topology.heartbeat_key(device)],
            topology.DEAD_LETTER_EXCHANGE: [device, topology.EVAL_KEY],
        }
        assert set(topics) == set(own)
        for exchange, keys in own.items():
            for key in keys:
                assert _allows(topics[exchange]["write"], key), (user, exchange, key)
            for key in (
                *(k.replace(device, other) for k in keys if k != topology.EVAL_KEY),
                "update",
                "register",
                "heartbeat",
                "slot",
                "evals",
            ):
                assert not _allows(topics[exchange]["write"], key), (user, exchange, key)


def test_elastic_worker_permissions(definitions: dict[str, Any]) -> None:
    p = _permissions(definitions, ELASTIC)
    assert p["configure"] == "^$"
    for name in (topology.UPDATES_EXCHANGE, topology.CONTROL_EXCHANGE, topology.DEAD_LETTER_EXCHANGE):
        assert _allows(p["write"], name), name
    for name in (topology.TASKS_EXCHANGE, topology.ROUNDS_EXCHANGE, "lf.updatesX", "xlf.control"):
        assert not _allows(p["write"], name), name
    for name in (
        topology.SLOTS_QUEUE,
        topology.task_queue_name("dev-0001"),
        topology.task_queue_name("dev-12345"),
        topology.eval_queue_name("dev-0042"),
    ):
        assert _allows(p["read"], name), name
    for name in (
        topology.UPDATES_QUEUE,
        topology.ORCHESTRATOR_QUEUE,
        topology.TASKS_EXCHANGE,
        topology.DEAD_LETTER_QUEUE,
        "lf.tasks.evil",
        "lf.eval.evil",
        topology.EVAL_EXCHANGE,
    ):
        assert not _allows(p["read"], name), name
    topics = _topics(definitions, ELASTIC)
    assert _allows(topics[topology.UPDATES_EXCHANGE]["write"], "update.dev-0042")
    assert _allows(topics[topology.CONTROL_EXCHANGE]["write"], "heartbeat.dev-0042")
    assert _allows(topics[topology.DEAD_LETTER_EXCHANGE]["write"], "dev-0042")
    assert _allows(topics[topology.DEAD_LETTER_EXCHANGE]["write"], topology.SLOT_KEY)
    for exchange, key in (
        (topology.UPDATES_EXCHANGE, "update"),
        (topology.UPDATES_EXCHANGE, "update.lf-orchestrator"),
        (topology.CONTROL_EXCHANGE, "register"),
        (topology.DEAD_LETTER_EXCHANGE, "update.dev-0042"),
        (topology.DEAD_LETTER_EXCHANGE, "round"),
    ):
        assert not _allows(topics[exchange]["write"], key), (exchange, key)


# --------------------------------------------------------------------------- the generator


def test_the_generator_takes_passwords_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "definitions.json"
    for env in ("LF_AMQP_ORCHESTRATOR_PASSWORD", "LF_AMQP_AGGREGATOR_PASSWORD", "LF_AMQP_ADMIN_PASSWORD"):
        monkeypatch.setenv(env, f"secret-{env}")
    monkeypatch.delenv("LF_AMQP_WORKER_PASSWORD", raising=False)
    monkeypatch.delenv(make_definitions.DEVICE_SECRET_ENV, raising=False)
    with pytest.raises(SystemExit):
        make_definitions.main(["-o", str(out), "--devices", "2"])
    missing = capsys.readouterr().err
    assert "LF_AMQP_DEVICE_SECRET" in missing and "LF_AMQP_WORKER_PASSWORD" in missing
    monkeypatch.setenv(make_definitions.DEVICE_SECRET_ENV, "fleet-secret")
    assert make_definitions.main(["-o", str(out), "--devices", "2", "--no-elastic"]) == 0
    doc = json.loads(out.read_text())
    users = {u["name"]: u for u in doc["users"]}
    assert set(users) == {*SERVICES, "lf-dev-0000", "lf-dev-0001", "lf-admin"}
    assert "regenerate" not in doc["_comment"].lower()

    def hashed(password: str, stored: str) -> bool:
        raw = base64.b64decode(stored)
        return hashlib.sha256(raw[:4] + password.encode()).digest() == raw[4:]

    assert hashed("secret-LF_AMQP_ORCHESTRATOR_PASSWORD", users["lf-orchestrator"]["password_hash"])
    device_password = make_definitions.device_password("fleet-secret", "dev-0001")
    assert re.fullmatch("[0-9a-f]{64}", device_password)
    assert device_password != make_definitions.device_password("fleet-secret", "dev-0000")
    assert hashed(device_password, users["lf-dev-0001"]["password_hash"])
    assert make_definitions.main(["--device-password", "dev-0001"]) == 0
    assert capsys.readouterr().out.strip() == device_password
    with pytest.raises(SystemExit):
        make_definitions.main(["--device-password", "orchestrator"])


def test_device_slot_pattern_matches_every_slot_id() -> None:
    for i in (0, 7, 9999, 10000, 123456):
        assert re.fullmatch(make_definitions.DEVICE, device_id(i))
    for name in ("dev-1", "dev-001", "dev-0001.x", "evil", "dev-00a1"):
        assert not re.fullmatch(make_definitions.DEVICE, name)
