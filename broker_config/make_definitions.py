#!/usr/bin/env python3
"""Write ``broker_config/definitions.json``: lorafleet's vhost, topology, users and permissions.

The topology comes from :mod:`lorafleet.transport.topology` and the queue x-arguments from
:func:`lorafleet.transport.rabbitmq.queue_arguments`, so a service that redeclares a queue sends
exactly the arguments the broker already has (no ``406 PRECONDITION_FAILED``).

Passwords are read from the environment and stored as RabbitMQ password hashes
(``rabbit_password_hashing_sha256``: base64(4-byte salt || sha256(salt || password))); RabbitMQ 3.10
has no ``rabbitmqctl hash_password``::

    LF_AMQP_ORCHESTRATOR_PASSWORD=... LF_AMQP_AGGREGATOR_PASSWORD=... \\
    LF_AMQP_WORKER_PASSWORD=... LF_AMQP_ADMIN_PASSWORD=... \\
        python broker_config/make_definitions.py -o /etc/rabbitmq/definitions.json

``--dev`` uses the documented development passwords ``dev-<role>`` instead; the committed
definitions.json was generated that way and must be regenerated for any real deployment.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.transport.rabbitmq import queue_arguments
from lorafleet.transport.topology import EXCHANGES, STATIC_QUEUES, VHOST

HERE = Path(__file__).resolve().parent
RABBITMQ_VERSION = "3.10.8"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"


@dataclass(frozen=True)
class Role:
    user: str
    env: str  # the environment variable holding the password
    configure: str
    write: str
    read: str
    tags: tuple[str, ...] = ()

    @property
    def dev_password(self) -> str:
        return f"dev-{self.user.removeprefix('lf-')}"


#: Least privilege per role on vhost ``lorafleet``. RabbitMQ matches these unanchored, hence ^...$.
#: queue.declare needs "configure" on the queue; queue.bind "write" on the queue and "read" on the
#: exchange; basic.publish "write" on the exchange; basic.consume / queue.purge "read" on the queue.
#: A queue declared with x-dead-letter-exchange also needs "read" on the queue and "write" on the DLX.
#: A passive declare needs none, which is how roles with configure "^$" check the topology exists.
#: Every consumer may publish to lf.dlx: ``Delivery.dead_letter`` republishes the message there.
ROLES = (
    Role(
        "lf-orchestrator",
        "LF_AMQP_ORCHESTRATOR_PASSWORD",
        # declares per-device task queues (lf.tasks.<device>) ...
        configure=r"^lf\.tasks\..+$",
        # ... binds them (write on the queue), publishes tasks and slot tokens, dead-letters bad messages
        write=r"^lf\.tasks(\..+)?$|^lf\.slots$|^lf\.dlx$",
        # consumes its queue; binding a task queue needs read on the lf.tasks exchange, and declaring
        # a queue with a dead-letter exchange needs read on that queue (and write on lf.dlx)
        read=r"^lf\.orchestrator$|^lf\.tasks(\..+)?$",
    ),
    Role(
        "lf-aggregator",
        "LF_AMQP_AGGREGATOR_PASSWORD",
        configure=r"^$",
        write=r"^lf\.rounds$|^lf\.dlx$",
        read=r"^lf\.updates$",
    ),
    Role(
        "lf-worker",
        "LF_AMQP_WORKER_PASSWORD",
        configure=r"^$",
        write=r"^lf\.(updates|control|dlx)$",
        # its task queue, and lf.slots to claim a device slot (a token it holds unacked)
        read=r"^lf\.tasks\..+$|^lf\.slots$",
    ),
    Role(
        "lf-admin", "LF_AMQP_ADMIN_PASSWORD", configure=".*", write=".*", read=".*", tags=("administrator",)
    ),
)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256 hash of ``password``."""
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("the salt is 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def build_definitions(passwords: dict[str, str], *, comment: str) -> dict[str, Any]:
    """The definitions document for ``passwords`` (user name -> password)."""
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
            for role in ROLES
        ],
        "vhosts": [{"name": VHOST}],
        "permissions": [
            {
                "user": role.user,
                "vhost": VHOST,
                "configure": role.configure,
                "write": role.write,
                "read": role.read,
            }
            for role in ROLES
        ],
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": [
            {
                "name": spec.name,
                "vhost": VHOST,
                "durable": True,
                "auto_delete": False,
                "arguments": queue_arguments(spec),
            }
            for spec in STATIC_QUEUES
        ],
        "exchanges": [
            {
                "name": spec.name,
                "vhost": VHOST,
                "type": spec.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for spec in EXCHANGES
        ],
        "bindings": [
            {
                "source": exchange,
                "vhost": VHOST,
                "destination": spec.name,
                "destination_type": "queue",
                "routing_key": routing_key,
                "arguments": {},
            }
            for spec in STATIC_QUEUES
            for exchange, routing_key in spec.bindings
        ],
    }


DEV_COMMENT = (
    "GENERATED by broker_config/make_definitions.py --dev with the DEVELOPMENT passwords dev-<role> "
    "(dev-orchestrator, dev-aggregator, dev-worker, dev-admin). Production must regenerate this file "
    "with real passwords from LF_AMQP_*_PASSWORD (see broker_config/README.md) and keep it secret."
)
PROD_COMMENT = "GENERATED by broker_config/make_definitions.py. Contains password hashes: keep it secret."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-o", "--output", type=Path, default=HERE / "definitions.json")
    parser.add_argument("--dev", action="store_true", help="use the development passwords dev-<role>")
    args = parser.parse_args(argv)
    if args.dev:
        passwords = {role.user: role.dev_password for role in ROLES}
        comment = DEV_COMMENT
    else:
        missing = [role.env for role in ROLES if not os.environ.get(role.env)]
        if missing:
            parser.error(f"missing password variables: {', '.join(missing)} (or pass --dev)")
        passwords = {role.user: os.environ[role.env] for role in ROLES}
        comment = PROD_COMMENT
    document = build_definitions(passwords, comment=comment)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    sys.stderr.write(f"wrote {args.output}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
