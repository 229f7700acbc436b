#!/usr/bin/env python3
"""Write ``broker_config/definitions.json``: lorafleet's vhost, topology, users and permissions.

The topology comes from :mod:`lorafleet.transport.topology` and the queue x-arguments from
:func:`lorafleet.transport.rabbitmq.queue_arguments`, so a service that redeclares a queue sends
exactly the arguments the broker already has (no ``406 PRECONDITION_FAILED``).

Users: one per service role, one per provisioned device slot (``lf-dev-0000`` ... for ``--devices N``,
each allowed only its own task queue and routing keys), the shared ``lf-worker`` of elastic replicas
that claim a slot (left out with ``--no-elastic``), and ``lf-admin``. broker_config/README.md says what
each may do and why.

Passwords are read from the environment and stored as RabbitMQ password hashes
(``rabbit_password_hashing_sha256``: base64(4-byte salt || sha256(salt || password))); RabbitMQ 3.10
has no ``rabbitmqctl hash_password``. A device's password is derived from one secret,
HMAC-SHA256(LF_AMQP_DEVICE_SECRET, "lorafleet-amqp-device:" + device) in hex, so provisioning a device
needs only ``--device-password dev-0003``::

    LF_AMQP_ORCHESTRATOR_PASSWORD=... LF_AMQP_AGGREGATOR_PASSWORD=... \\
    LF_AMQP_WORKER_PASSWORD=... LF_AMQP_ADMIN_PASSWORD=... LF_AMQP_DEVICE_SECRET=... \\
        python broker_config/make_definitions.py --devices 21 -o /etc/rabbitmq/definitions.json
    LF_AMQP_DEVICE_SECRET=... python broker_config/make_definitions.py --device-password dev-0003

``--dev`` uses the documented development passwords ``dev-<user without lf->`` instead (``dev-worker``,
``dev-dev-0003``); the committed definitions.json was generated that way and must be regenerated for
any real deployment.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.transport import topology as t
from lorafleet.transport.rabbitmq import queue_arguments
from schemas.config import device_id

HERE = Path(__file__).resolve().parent
RABBITMQ_VERSION = "3.10.8"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
DEVICE_SECRET_ENV = "LF_AMQP_DEVICE_SECRET"
#: device users in the committed development file (the quickstart's fleet)
DEFAULT_DEVICES = 8

#: Every device slot id of a run (schemas.config.device_id: dev-0000, dev-0001, ..., dev-12345).
DEVICE = r"dev-[0-9]{4,}"
NOTHING = "^$"


def _name(name: str) -> str:
    """``name`` as a regex matching only itself (``-`` needs no escape outside a class)."""
    return re.escape(name).replace("\\-", "-")


def _one_of(*patterns: str) -> str:
    """Anchored alternatives (RabbitMQ matches permission regexes unanchored)."""
    return "|".join(f"^{p}$" for p in patterns)


@dataclass(frozen=True)
class TopicPermission:
    """Which routing keys the user may publish under (write) on a topic exchange; read covers the
    binding keys of queue.bind, which no lorafleet worker does."""

    exchange: str
    write: str
    read: str = NOTHING


@dataclass(frozen=True)
class Role:
    user: str
    env: str | None  # the environment variable holding the password; None: derived (device users)
    configure: str
    write: str
    read: str
    tags: tuple[str, ...] = ()
    topics: tuple[TopicPermission, ...] = ()

    @property
    def dev_password(self) -> str:
        return f"dev-{self.user.removeprefix('lf-')}"


def _worker_topics(device: str, *dead_letter_keys: str) -> tuple[TopicPermission, ...]:
    """A worker's routing keys for ``device`` (a regex): its updates (and evaluation results),
    registration and heartbeats, and the dead letters of its own tasks (a task's routing key is its
    device id), of evaluation tasks (``eval``) and of ``dead_letter_keys``."""
    return (
        TopicPermission(t.UPDATES_EXCHANGE, _one_of(rf"{_name(t.UPDATE_KEY)}\.{device}")),
        TopicPermission(
            t.CONTROL_EXCHANGE, _one_of(rf"({_name(t.REGISTER_KEY)}|{_name(t.HEARTBEAT_KEY)})\.{device}")
        ),
        TopicPermission(t.DEAD_LETTER_EXCHANGE, _one_of(device, _name(t.EVAL_KEY), *dead_letter_keys)),
    )


#: A worker publishes updates and control messages and dead-letters bad tasks (``Delivery.dead_letter``
#: republishes to lf.dlx); it configures nothing: the topology exists (definitions) and a passive
#: declare needs no permission.
WORKER_WRITE = _one_of(_name(t.UPDATES_EXCHANGE), _name(t.CONTROL_EXCHANGE), _name(t.DEAD_LETTER_EXCHANGE))


def device_role(device: str) -> Role:
    """The user of one provisioned device: its own task and evaluation queues and routing keys, nothing
    else."""
    own = _name(device)
    return Role(
        f"lf-{device}",
        None,
        configure=NOTHING,
        write=WORKER_WRITE,
        read=_one_of(_name(t.task_queue_name(device)), _name(t.eval_queue_name(device))),
        topics=_worker_topics(own),
    )


#: Least privilege per role on vhost ``lorafleet``. RabbitMQ matches these unanchored, hence ^...$.
#: queue.declare needs "configure" on the queue; queue.bind "write" on the queue and "read" on the
#: exchange; basic.publish "write" on the exchange; basic.consume, basic.get and queue.purge "read" on
#: the queue. A queue declared with x-dead-letter-exchange also needs "read" on the queue and "write" on
#: the DLX. A passive declare needs none, which is how roles with configure "^$" find the topology.
#: Every consumer may publish to lf.dlx (``Delivery.dead_letter``), under the routing keys of the
#: messages it consumes only (topic permissions).
ORCHESTRATOR = Role(
    "lf-orchestrator",
    "LF_AMQP_ORCHESTRATOR_PASSWORD",
    # declares the task queue of each device slot that registers (lf.tasks.dev-NNNN) and, where the
    # devices evaluate, its evaluation queue (lf.eval.dev-NNNN), nothing else ...
    configure=_one_of(_name(t.TASK_QUEUE_PREFIX) + DEVICE, _name(t.EVAL_QUEUE_PREFIX) + DEVICE),
    # ... binds them (write on the queue), publishes tasks and slot tokens, dead-letters bad messages
    write=_one_of(
        _name(t.TASKS_EXCHANGE),
        _name(t.TASK_QUEUE_PREFIX) + DEVICE,
        _name(t.EVAL_QUEUE_PREFIX) + DEVICE,
        _name(t.SLOTS_EXCHANGE),
        _name(t.DEAD_LETTER_EXCHANGE),
    ),
    # consumes its queue; binding a queue needs read on its exchange (lf.tasks, lf.eval), and declaring
    # a queue with a dead-letter exchange needs read on that queue (which also lets it purge stale
    # tasks); an evaluation queue has none, so the orchestrator cannot read or purge it
    read=_one_of(
        _name(t.ORCHESTRATOR_QUEUE),
        _name(t.TASKS_EXCHANGE),
        _name(t.TASK_QUEUE_PREFIX) + DEVICE,
        _name(t.EVAL_EXCHANGE),
    ),
    topics=(
        TopicPermission(
            t.DEAD_LETTER_EXCHANGE,
            _one_of(rf"({_name(t.REGISTER_KEY)}|{_name(t.HEARTBEAT_KEY)})(\..+)?", _name(t.ROUNDS_KEY)),
        ),
    ),
)
AGGREGATOR = Role(
    "lf-aggregator",
    "LF_AMQP_AGGREGATOR_PASSWORD",
    configure=NOTHING,
    # announces rounds, fans evaluation tasks out to the devices, dead-letters bad updates
    write=_one_of(_name(t.ROUNDS_EXCHANGE), _name(t.EVAL_EXCHANGE), _name(t.DEAD_LETTER_EXCHANGE)),
    read=_one_of(_name(t.UPDATES_QUEUE)),
    topics=(TopicPermission(t.DEAD_LETTER_EXCHANGE, _one_of(rf"{_name(t.UPDATE_KEY)}(\..+)?")),),
)
#: Elastic replicas do not know their device until they hold a slot token, so they share one user that
#: may serve any slot: claim a token, read any device's task queue, publish under any device's keys.
ELASTIC_WORKER = Role(
    "lf-worker",
    "LF_AMQP_WORKER_PASSWORD",
    configure=NOTHING,
    write=WORKER_WRITE,
    read=_one_of(
        _name(t.SLOTS_QUEUE), _name(t.TASK_QUEUE_PREFIX) + DEVICE, _name(t.EVAL_QUEUE_PREFIX) + DEVICE
    ),
    # any device's keys, and it dead-letters a bad slot token (routing key "slot")
    topics=_worker_topics(DEVICE, _name(t.SLOT_KEY)),
)
ADMIN = Role(
    "lf-admin", "LF_AMQP_ADMIN_PASSWORD", configure=".*", write=".*", read=".*", tags=("administrator",)
)


def roles(devices: int = DEFAULT_DEVICES, *, elastic: bool = True) -> list[Role]:
    """Every user: the services, ``devices`` provisioned device slots, the elastic worker, the admin."""
    return [
        ORCHESTRATOR,
        AGGREGATOR,
        *([ELASTIC_WORKER] if elastic else []),
        *(device_role(device_id(i)) for i in range(devices)),
        ADMIN,
    ]


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256 hash of ``password``."""
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("the salt is 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def device_password(secret: str, device: str) -> str:
    """The AMQP password of ``device``'s user: HMAC-SHA256(secret, "lorafleet-amqp-device:" + device), hex."""
    return hmac.new(secret.encode(), b"lorafleet-amqp-device:" + device.encode(), hashlib.sha256).hexdigest()


def build_definitions(
    passwords: dict[str, str], *, comment: str, devices: int = DEFAULT_DEVICES, elastic: bool = True
) -> dict[str, Any]:
    """The definitions document for ``passwords`` (user name -> password)."""
    users = roles(devices, elastic=elastic)
    return {
        "_comment": comment,
        "rabbit_version": RABBITMQ_VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "users": [
            {
                "name": role.user,
                "password_hash": hash_password(passwords[role.user]),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": list(role.tags),
                "limits": {},
            }
            for role in users
        ],
        "vhosts": [{"name": t.VHOST}],
        "permissions": [
            {
                "user": role.user,
                "vhost": t.VHOST,
                "configure": role.configure,
                "write": role.write,
                "read": role.read,
            }
            for role in users
        ],
        "topic_permissions": [
            {
                "user": role.user,
                "vhost": t.VHOST,
                "exchange": topic.exchange,
                "write": topic.write,
                "read": topic.read,
            }
            for role in users
            for topic in role.topics
        ],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": [
            {
                "name": spec.name,
                "vhost": t.VHOST,
                "durable": True,
                "auto_delete": False,
                "arguments": queue_arguments(spec),
            }
            for spec in t.STATIC_QUEUES
        ],
        "exchanges": [
            {
                "name": spec.name,
                "vhost": t.VHOST,
                "type": spec.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for spec in t.EXCHANGES
        ],
        "bindings": [
            {
                "source": exchange,
                "vhost": t.VHOST,
                "destination": spec.name,
                "destination_type": "queue",
                "routing_key": routing_key,
                "arguments": {},
            }
            for spec in t.STATIC_QUEUES
            for exchange, routing_key in spec.bindings
        ],
    }


DEV_COMMENT = (
    "GENERATED by broker_config/make_definitions.py --dev with the DEVELOPMENT passwords dev-<user without "
    "lf-> (dev-orchestrator, dev-aggregator, dev-worker, dev-admin, dev-dev-0000 ...). Production must "
    "regenerate this file with real passwords from LF_AMQP_*_PASSWORD and LF_AMQP_DEVICE_SECRET (see "
    "broker_config/README.md) and keep it secret."
)
PROD_COMMENT = "GENERATED by broker_config/make_definitions.py. Contains password hashes: keep it secret."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-o", "--output", type=Path, default=HERE / "definitions.json")
    parser.add_argument("--dev", action="store_true", help="use the development passwords dev-<user>")
    parser.add_argument(
        "--devices",
        type=int,
        default=DEFAULT_DEVICES,
        metavar="N",
        help=f"users for device slots dev-0000 .. N-1 (default {DEFAULT_DEVICES})",
    )
    parser.add_argument(
        "--no-elastic",
        action="store_true",
        help="no lf-worker (elastic replicas) user: every device is provisioned",
    )
    parser.add_argument(
        "--device-password",
        metavar="DEVICE",
        help=f"print DEVICE's password (from {DEVICE_SECRET_ENV}) and exit",
    )
    args = parser.parse_args(argv)
    if args.devices < 0:
        parser.error("--devices must be 0 or more")
    if args.device_password is not None:
        if not re.fullmatch(DEVICE, args.device_password):
            parser.error(f"--device-password: {args.device_password!r} is not a device slot id like dev-0003")
        if args.dev:
            sys.stdout.write(device_role(args.device_password).dev_password + "\n")
            return 0
        if not os.environ.get(DEVICE_SECRET_ENV):
            parser.error(f"missing {DEVICE_SECRET_ENV} (or pass --dev)")
        sys.stdout.write(device_password(os.environ[DEVICE_SECRET_ENV], args.device_password) + "\n")
        return 0
    users = roles(args.devices, elastic=not args.no_elastic)
    if args.dev:
        passwords = {role.user: role.dev_password for role in users}
        comment = DEV_COMMENT
    else:
        needed = sorted(
            {role.env for role in users if role.env} | ({DEVICE_SECRET_ENV} if args.devices else set())
        )
        missing = [env for env in needed if not os.environ.get(env)]
        if missing:
            parser.error(f"missing password variables: {', '.join(missing)} (or pass --dev)")
        passwords = {
            role.user: os.environ[role.env]
            if role.env
            else device_password(os.environ[DEVICE_SECRET_ENV], role.user.removeprefix("lf-"))
            for role in users
        }
        comment = PROD_COMMENT
    document = build_definitions(
        passwords, comment=comment, devices=args.devices, elastic=not args.no_elastic
    )
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    sys.stderr.write(f"wrote {args.output}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
