"""Every AMQP name lorafleet uses, and the queue settings, in one place.

``broker_config/definitions.json`` declares the same static topology for the RabbitMQ server;
tests/unit/test_topology.py checks the two agree. Per-device task queues are declared by the
orchestrator when a device registers (``device_task_queue``).
"""

from __future__ import annotations

from lorafleet.transport.base import ExchangeSpec, QueueSpec, Transport

VHOST = "lorafleet"

#: orchestrator -> workers (routing key: device id)
TASKS_EXCHANGE = "lf.tasks"
#: workers -> aggregator (routing key: UPDATE_KEY)
UPDATES_EXCHANGE = "lf.updates"
#: workers -> orchestrator: registration and heartbeats (routing keys REGISTER_KEY, HEARTBEAT_KEY)
CONTROL_EXCHANGE = "lf.control"
#: aggregator -> orchestrator: round closed / evaluated, replan requests (routing key: ROUNDS_KEY)
ROUNDS_EXCHANGE = "lf.rounds"
#: orchestrator -> workers: one token per device slot; a worker started without a device id holds one
#: (unacked) for its lifetime, so a dead worker's slot goes back to the queue for a replacement
SLOTS_EXCHANGE = "lf.slots"
#: dead letters from every queue (fanout)
DEAD_LETTER_EXCHANGE = "lf.dlx"

UPDATES_QUEUE = "lf.updates"
ORCHESTRATOR_QUEUE = "lf.orchestrator"
DEAD_LETTER_QUEUE = "lf.dead"
SLOTS_QUEUE = "lf.slots"
TASK_QUEUE_PREFIX = "lf.tasks."

UPDATE_KEY = "update"
REGISTER_KEY = "register"
HEARTBEAT_KEY = "heartbeat"
ROUNDS_KEY = "round"
SLOT_KEY = "slot"

#: A message that fails this often (crashes its consumer, or is requeued) goes to the DLQ.
DELIVERY_LIMIT = 5

#: Which message kinds may arrive through which exchange; anything else is a forged sender.
ALLOWED_KINDS: dict[str, frozenset[str]] = {
    TASKS_EXCHANGE: frozenset({"train_task", "run_finished"}),
    UPDATES_EXCHANGE: frozenset({"lora_update", "task_failed"}),
    CONTROL_EXCHANGE: frozenset({"device_registered", "heartbeat"}),
    ROUNDS_EXCHANGE: frozenset({"round_closed", "round_evaluated", "replan_request"}),
    SLOTS_EXCHANGE: frozenset({"device_slot"}),
}

EXCHANGES = (
    ExchangeSpec(TASKS_EXCHANGE, "direct"),
    ExchangeSpec(UPDATES_EXCHANGE, "direct"),
    ExchangeSpec(CONTROL_EXCHANGE, "direct"),
    ExchangeSpec(ROUNDS_EXCHANGE, "direct"),
    ExchangeSpec(SLOTS_EXCHANGE, "direct"),
    ExchangeSpec(DEAD_LETTER_EXCHANGE, "fanout"),
)


def _work_queue(name: str, bindings: tuple[tuple[str, str], ...]) -> QueueSpec:
    return QueueSpec(name, bindings, dead_letter_exchange=DEAD_LETTER_EXCHANGE, delivery_limit=DELIVERY_LIMIT)


STATIC_QUEUES = (
    _work_queue(UPDATES_QUEUE, ((UPDATES_EXCHANGE, UPDATE_KEY),)),
    _work_queue(
        ORCHESTRATOR_QUEUE,
        ((CONTROL_EXCHANGE, REGISTER_KEY), (CONTROL_EXCHANGE, HEARTBEAT_KEY), (ROUNDS_EXCHANGE, ROUNDS_KEY)),
    ),
    QueueSpec(DEAD_LETTER_QUEUE, ((DEAD_LETTER_EXCHANGE, ""),)),
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


def declare_static_topology(transport: Transport) -> None:
    """Declare exchanges and static queues (idempotent; a no-op where definitions.json already did)."""
    for exchange in EXCHANGES:
        transport.declare_exchange(exchange)
    for queue in STATIC_QUEUES:
        transport.declare_queue(queue)
