"""Every AMQP name lorafleet uses, and the queue settings, in one place.

``broker_config/definitions.json`` declares the same static topology for the RabbitMQ server;
tests/unit/test_topology_definitions.py checks the two agree. Per-device task queues are declared by the
orchestrator when a device registers (``device_task_queue``), and so are per-device evaluation queues
where the run evaluates on the devices (``device_eval_queue``, bound to the ``lf.eval`` fanout).

**Routing keys name the sending device.** Workers publish updates, registrations and heartbeats under
``update.<device>``, ``register.<device>`` and ``heartbeat.<device>`` (:func:`update_key`,
:func:`register_key`, :func:`heartbeat_key`) to *topic* exchanges, and dead-letter a task under its
routing key (the device id) to the topic exchange ``lf.dlx``. RabbitMQ authorises the routing key of a
publish to a topic exchange against the user's topic permissions, so a device's own broker user
(broker_config/definitions.json) can publish only under its own id; the queues bind ``update.#``,
``register.#`` and ``heartbeat.#``, which also match the bare keys ``update``/``register``/``heartbeat``
(accepted from users without topic permissions, e.g. an embedded run). A receiver should check that the
device a message names is the one in its routing key (:func:`routing_key_device`).
"""

from __future__ import annotations

from lorafleet.transport.base import ExchangeSpec, QueueSpec, Transport

VHOST = "lorafleet"

#: orchestrator -> workers (routing key: device id)
TASKS_EXCHANGE = "lf.tasks"
#: workers -> aggregator (topic; routing key: update_key(device))
UPDATES_EXCHANGE = "lf.updates"
#: workers -> orchestrator: registration and heartbeats (topic; register_key(device), heartbeat_key(device))
CONTROL_EXCHANGE = "lf.control"
#: aggregator -> orchestrator: round closed / evaluated, replan requests (routing key: ROUNDS_KEY)
ROUNDS_EXCHANGE = "lf.rounds"
#: orchestrator -> workers: one token per device slot; a worker started without a device id holds one
#: (unacked) for its lifetime, so a dead worker's slot goes back to the queue for a replacement
SLOTS_EXCHANGE = "lf.slots"
#: dead letters from every queue (topic, bound with "#": every routing key reaches lf.dead; topic so
#: that the broker can authorise which routing keys each user may dead-letter under)
DEAD_LETTER_EXCHANGE = "lf.dlx"
#: aggregator -> every device: the global adapter to evaluate on the devices' held-out rows (fanout:
#: one publish per round, the broker copies it into each device's eval queue)
EVAL_EXCHANGE = "lf.eval"

UPDATES_QUEUE = "lf.updates"
ORCHESTRATOR_QUEUE = "lf.orchestrator"
DEAD_LETTER_QUEUE = "lf.dead"
SLOTS_QUEUE = "lf.slots"
TASK_QUEUE_PREFIX = "lf.tasks."
EVAL_QUEUE_PREFIX = "lf.eval."

#: first words of the workers' routing keys (``update.<device>`` ...); alone, the keys of an unnamed sender
UPDATE_KEY = "update"
REGISTER_KEY = "register"
HEARTBEAT_KEY = "heartbeat"
ROUNDS_KEY = "round"
SLOT_KEY = "slot"
#: the routing key of evaluation tasks (a fanout ignores it; a dead-lettered one keeps it)
EVAL_KEY = "eval"
#: the device-keyed exchanges and the first word of the routing keys a worker publishes there
DEVICE_KEYED: dict[str, frozenset[str]] = {
    UPDATES_EXCHANGE: frozenset({UPDATE_KEY}),
    CONTROL_EXCHANGE: frozenset({REGISTER_KEY, HEARTBEAT_KEY}),
}


def update_key(device_id: str) -> str:
    """The routing key of a device's updates and failure reports on ``lf.updates``."""
    return f"{UPDATE_KEY}.{device_id}"


def register_key(device_id: str) -> str:
    """The routing key of a device's registration on ``lf.control``."""
    return f"{REGISTER_KEY}.{device_id}"


def heartbeat_key(device_id: str) -> str:
    """The routing key of a device's heartbeats on ``lf.control``."""
    return f"{HEARTBEAT_KEY}.{device_id}"


def routing_key_device(exchange: str, routing_key: str) -> str | None:
    """The device a worker's routing key names (``update.dev-0003`` on ``lf.updates`` -> ``dev-0003``);
    None for a bare key (``update``) or another exchange. The broker guarantees it is the sender's own id
    for users with topic permissions (every worker user of broker_config/definitions.json)."""
    kind, dot, device = routing_key.partition(".")
    if not dot or not device or kind not in DEVICE_KEYED.get(exchange, frozenset()):
        return None
    return device


#: A message that fails this often (crashes its consumer, or is requeued) goes to the DLQ.
DELIVERY_LIMIT = 5

#: Which message kinds may arrive through which exchange; anything else is a forged sender.
ALLOWED_KINDS: dict[str, frozenset[str]] = {
    TASKS_EXCHANGE: frozenset({"train_task", "run_finished", "register_again"}),
    UPDATES_EXCHANGE: frozenset({"lora_update", "task_failed", "eval_result"}),
    CONTROL_EXCHANGE: frozenset({"device_registered", "heartbeat"}),
    ROUNDS_EXCHANGE: frozenset({"round_closed", "round_evaluated", "replan_request"}),
    SLOTS_EXCHANGE: frozenset({"device_slot"}),
    EVAL_EXCHANGE: frozenset({"eval_task"}),
}

EXCHANGES = (
    ExchangeSpec(TASKS_EXCHANGE, "direct"),
    ExchangeSpec(UPDATES_EXCHANGE, "topic"),
    ExchangeSpec(CONTROL_EXCHANGE, "topic"),
    ExchangeSpec(ROUNDS_EXCHANGE, "direct"),
    ExchangeSpec(SLOTS_EXCHANGE, "direct"),
    ExchangeSpec(DEAD_LETTER_EXCHANGE, "topic"),
    ExchangeSpec(EVAL_EXCHANGE, "fanout"),
)


def _work_queue(name: str, bindings: tuple[tuple[str, str], ...]) -> QueueSpec:
    return QueueSpec(name, bindings, dead_letter_exchange=DEAD_LETTER_EXCHANGE, delivery_limit=DELIVERY_LIMIT)


def _any_device(first_word: str) -> str:
    """The topic binding of every device's key with this first word (``update.#``; also the bare key)."""
    return f"{first_word}.#"


STATIC_QUEUES = (
    _work_queue(UPDATES_QUEUE, ((UPDATES_EXCHANGE, _any_device(UPDATE_KEY)),)),
    _work_queue(
        ORCHESTRATOR_QUEUE,
        (
            (CONTROL_EXCHANGE, _any_device(REGISTER_KEY)),
            (CONTROL_EXCHANGE, _any_device(HEARTBEAT_KEY)),
            (ROUNDS_EXCHANGE, ROUNDS_KEY),
        ),
    ),
    QueueSpec(DEAD_LETTER_QUEUE, ((DEAD_LETTER_EXCHANGE, "#"),)),
    # classic, not quorum: a slot token is held unacked for a worker's lifetime and returns on every
    # worker crash; a delivery limit would retire the slot after a few crashes
    QueueSpec(
        SLOTS_QUEUE, ((SLOTS_EXCHANGE, SLOT_KEY),), dead_letter_exchange=DEAD_LETTER_EXCHANGE, quorum=False
    ),
)


def task_queue_name(device_id: str) -> str:
    """The queue a device's tasks wait in."""
    return f"{TASK_QUEUE_PREFIX}{device_id}"


def device_task_queue(device_id: str) -> QueueSpec:
    return _work_queue(task_queue_name(device_id), ((TASKS_EXCHANGE, device_id),))


def eval_queue_name(device_id: str) -> str:
    """The queue a device's evaluation tasks wait in."""
    return f"{EVAL_QUEUE_PREFIX}{device_id}"


#: At most this many evaluation tasks wait per device: a newer one drops the oldest (drop-head), so
#: a device busy training evaluates only the latest global adapter, and the broker holds at most one
#: adapter per device whatever the fleet's lag.
EVAL_QUEUE_LENGTH = 1


def device_eval_queue(device_id: str) -> QueueSpec:
    """A device's evaluation queue, bound to the ``lf.eval`` fanout. Classic, not quorum, and without
    a dead-letter exchange: an evaluation task is best effort, one that is superseded is dropped, not a
    dead letter. (A worker refuses a bad one with its reason; over RabbitMQ its ``dead_letter``
    republishes it to ``lf.dlx``, the default of a queue it did not declare.)"""
    return QueueSpec(
        eval_queue_name(device_id),
        ((EVAL_EXCHANGE, EVAL_KEY),),
        quorum=False,
        max_length=EVAL_QUEUE_LENGTH,
        arguments={"x-overflow": "drop-head"},
    )


def declare_static_topology(transport: Transport) -> None:
    """Declare exchanges and static queues (idempotent; a no-op where definitions.json already did)."""
    for exchange in EXCHANGES:
        transport.declare_exchange(exchange)
    for queue in STATIC_QUEUES:
        transport.declare_queue(queue)
