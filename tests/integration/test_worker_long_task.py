"""A worker whose training outlasts several AMQP heartbeat intervals still delivers, and acks once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lorafleet.transport import topology
from schemas.envelope import decode, encode
from schemas.messages import LoraSpec, LoraUpdate, TrainHyperParams, TrainTask
from schemas.tensors import decode_tensors, encode_tensors
from worker.service import WorkerService
from worker.trainer import FakeTrainer

HEARTBEAT_S = 2
TRAIN_S = 4 * HEARTBEAT_S + 1  # longer than three heartbeat intervals


class CountingTrainer(FakeTrainer):
    def __init__(self) -> None:
        super().__init__(delta=0.5, num_samples=7, sleep_s=TRAIN_S)
        self.calls = 0

    def train(self, task, start):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().train(task, start)


@pytest.mark.slow
def test_long_training_keeps_the_connection_and_acks_the_task_once(rabbitmq_url: str, run_id: str) -> None:
    from lorafleet.transport.rabbitmq import PikaTransport

    url = rabbitmq_url.replace("heartbeat=30", f"heartbeat={HEARTBEAT_S}")
    admin = PikaTransport(url)
    topology.declare_static_topology(admin)
    admin.declare_queue(topology.device_task_queue("dev-0000"))
    start = {"base_model.model.classifier.weight": torch.ones(2, 4)}
    task = TrainTask(
        task_id=f"{run_id}:1:dev-0000",
        run_id=run_id,
        round=1,
        device_id="dev-0000",
        plan_version=1,
        lora=LoraSpec(target_modules=["query"], layer_ranks={0: 2}),
        hparams=TrainHyperParams(),
        adapter=encode_tensors(start),
        issued_at=time.time(),
        deadline_at=time.time() + 600,
    )
    admin.publish(topology.TASKS_EXCHANGE, "dev-0000", encode(task), message_id=task.message_id)

    # Given a worker on its own connection whose training blocks its service thread for > 3 heartbeats
    trainer = CountingTrainer()
    worker_transport = PikaTransport(url)
    worker = WorkerService(worker_transport, trainer, run_id=run_id, device_id="dev-0000", num_samples=7)
    stop = threading.Event()
    thread = threading.Thread(
        target=worker.run_forever, args=(stop,), kwargs={"poll_s": 0.2, "heartbeat_s": 1.0}
    )
    thread.start()
    try:
        # When the update arrives
        updates = admin.subscribe(topology.UPDATES_QUEUE)
        delivery = None
        deadline = time.monotonic() + TRAIN_S + 30
        while delivery is None and time.monotonic() < deadline:
            delivery = updates.get(0.5)
        assert delivery is not None, "no update arrived"
        update = decode(delivery.body)
        delivery.ack()
        # Then it is the trained result of that task
        assert isinstance(update, LoraUpdate) and update.task_id == task.task_id
        got = decode_tensors(update.adapter)["base_model.model.classifier.weight"]
        assert torch.equal(got, torch.full((2, 4), 1.5))
        # ... the task was acked exactly once: trained once, and nothing left or redelivered after a
        # connection close (an unacked task would return to the queue when the worker disconnects)
        deadline = time.monotonic() + 5
        while worker.stats["tasks_done"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.stats["tasks_done"] == 1
    finally:
        stop.set()
        thread.join(timeout=30)
        worker_transport.close()
    time.sleep(1.0)
    assert trainer.calls == 1
    assert worker.stats["tasks_done"] == 1  # no redelivered copy was handled either
    assert admin.queue_depth(topology.task_queue_name("dev-0000")) == 0
    assert admin.queue_depth(topology.UPDATES_QUEUE) == 0
    admin.close()
