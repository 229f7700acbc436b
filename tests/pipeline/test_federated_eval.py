"""Federated evaluation end to end in one process: the devices' pooled figure is the global adapter's
on their held-out rows, computed here independently; hostile results are dead-lettered; training
always goes first on a device; hierarchical runs evaluate each global round."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.functional import cross_entropy

from lorafleet.app.embedded import run_embedded
from lorafleet.app.wiring import Shards, build_runtime, build_worker
from lorafleet.data.held_out import held_out_seed, split_held_out
from lorafleet.ml.model import AdapterRuntime
from lorafleet.run.clock import SystemClock
from lorafleet.run.federated import EVAL_SCORES, EVAL_SENT
from lorafleet.run.report import build_report
from lorafleet.security.signing import derive_device_key, sign
from lorafleet.state.base import StateStore
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport import topology
from lorafleet.transport.base import Transport, dead_letter_reason
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from schemas.config import RunConfig, parse_run_config
from schemas.envelope import decode, encode
from schemas.messages import (
    EvalResult,
    EvalScore,
    EvalTask,
    LoraSpec,
    TrainHyperParams,
    TrainTask,
)
from schemas.tensors import encode_tensors
from tests.pipeline.helpers import (
    HELD,
    RIGHT,
    FixedScorer,
    Pipeline,
    evaluating_fleet,
    initial_adapter,
    make_config,
)
from worker.evaluation import DeviceEvaluator
from worker.service import WorkerService
from worker.trainer import FakeTrainer, TrainOutcome

FLEET = b"fleet-key-of-the-federated-eval-tests"

CONFIG: dict[str, Any] = {
    "run_id": "federated-eval",
    "model": {"name": "tiny", "max_seq_len": 32},
    "data": {"dataset": "synthetic", "samples_per_device": 48, "eval_samples": 100},
    "devices": {"count": 3},
    "lora": {"rank": 8},
    "rounds": {"max_rounds": 4},
    "training": {"lr": 0.05, "local_epochs": 4},
    "eval": {"device_fraction": 0.25},
}


@torch.no_grad()
def _independent(
    config: RunConfig, runtime: AdapterRuntime, checkpoint: Path, rows: list[tuple[str, int]]
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of a checkpointed adapter over ``rows``, one row at a time (no
    padding, no batching, none of lorafleet's scoring code), on a fresh copy of the base model."""
    spec = LoraSpec.model_validate_json(
        json.dumps(json.loads((checkpoint / "lorafleet.json").read_text())["spec"])
    )
    model = runtime.load(spec, load_file(str(checkpoint / "adapter_model.safetensors")))
    model.eval()
    right, loss = 0, 0.0
    for text, label in rows:
        ids = runtime.tokenizer(
            text, truncation=True, max_length=config.model.max_seq_len, return_tensors="pt"
        )
        logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits.float()
        right += int(logits[0].argmax()) == label
        loss += float(cross_entropy(logits, torch.tensor([label])))
    return right / len(rows), loss / len(rows)


@pytest.mark.slow
def test_the_federated_figure_is_the_global_adapter_on_the_devices_held_out_rows(tmp_path: Path) -> None:
    # Given three devices that each hold a quarter of their 48 rows out
    config = parse_run_config(CONFIG)
    shards = Shards.load(config)
    held = {
        d: split_held_out(shards.shard(i), 0.25, held_out_seed(config.seed, d))[1]
        for i, d in enumerate(config.device_ids())
    }
    # When the run goes (embedded)
    report = run_embedded(config, tmp_path, quiet=True)
    # Then each trained on 36 rows and evaluated on its 12
    assert {d: (e["num_samples"], e["eval_samples"]) for d, e in report["devices"].items()} == {
        d: (36, 12) for d in config.device_ids()
    }
    # and every round's pooled figure is the round's global adapter (its checkpoint) evaluated here,
    # independently, over the held-out rows of the devices that reported (all of them in the last)
    assert set(report["rounds"][-1]["federated_devices"]) == set(config.device_ids())
    figures = []
    runtime = build_runtime(config)
    for entry in report["rounds"]:
        devices = entry["federated_devices"]
        assert devices and all(devices[d] == 12 for d in devices)
        rows = [(t, y) for d in sorted(devices) for t, y in zip(held[d].texts, held[d].labels, strict=True)]
        checkpoint = tmp_path / "checkpoints" / f"round-{entry['round']:04d}"
        accuracy, loss = _independent(config, runtime, checkpoint, rows)
        assert entry["federated_accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert entry["federated_loss"] == pytest.approx(loss, rel=1e-5)
        figures.append((entry["round"], entry["accuracy"], accuracy))
    assert report["final_federated_accuracy"] == report["rounds"][-1]["federated_accuracy"]
    assert report["final_accuracy"] == report["rounds"][-1]["accuracy"]  # the central figure, unchanged
    assert figures[-1][2] > 0.6 and figures[-1][2] > figures[0][2]  # it learnt: the check is not trivial
    print("round, central accuracy, federated accuracy:", figures)


def test_held_out_rows_are_never_trained_on_and_a_misshapen_task_is_refused(tmp_path: Path) -> None:
    config = parse_run_config(CONFIG)
    runtime = build_runtime(config)
    shards = Shards.load(config)
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker)
    topology.declare_static_topology(transport)
    transport.declare_queue(topology.device_eval_queue("dev-0001"))
    worker = build_worker(config, 1, transport, runtime, shards)
    assert worker.evaluator is not None
    trained = worker.trainer.shard.input_ids  # type: ignore[attr-defined]
    held = worker.evaluator.scorer.encoded.input_ids  # type: ignore[attr-defined]
    shard = shards.shard(1)
    assert (len(trained), len(held), worker.num_samples) == (36, 12, 36)
    encoded = [runtime.tokenizer(t, truncation=True, max_length=32)["input_ids"] for t in shard.texts]
    assert sorted(map(tuple, trained + held)) == sorted(map(tuple, encoded))  # a split of the shard
    # An evaluation task whose tensors do not fit its spec is dead-lettered before any scoring
    spec = LoraSpec(target_modules=["query", "value"], layer_ranks={0: 4, 1: 4})
    task = EvalTask(
        run_id=config.run_id, round=1, lora=spec, adapter=encode_tensors({"w": torch.ones(2)}), issued_at=0.0
    )
    transport.publish(topology.EVAL_EXCHANGE, topology.EVAL_KEY, encode(task), message_id=task.message_id)
    assert worker.evaluator.step()
    # refused with its reason (over RabbitMQ the worker republishes it to lf.dlx; the in-process broker
    # drops a rejected message of a queue without a dead-letter exchange, as RabbitMQ itself would)
    assert worker.evaluator.rejections.counts == {"shape_mismatch": 1}
    assert broker.peek(topology.UPDATES_QUEUE) == []
    assert broker.peek(topology.eval_queue_name("dev-0001")) == []


# --------------------------------------------------------------------------- fake devices


def _fake_fleet(
    config: RunConfig, fleet_key: bytes | None = None
) -> tuple[Pipeline, InMemoryBroker, InMemoryStateStore]:
    """:func:`evaluating_fleet` in this process."""
    broker, state = InMemoryBroker(), InMemoryStateStore()
    transports = [InMemoryTransport(broker) for _ in range(2 + config.devices.count)]
    return evaluating_fleet(config, list(transports), state, fleet_key), broker, state


def _hostile(run_id: str, round_no: int, device: str, key_of: str, **score: Any) -> EvalResult:
    counts = {"num_samples": 10, "correct": 10, "loss_sum": 0.0, "loss_count": 10, **score}
    result = EvalResult(run_id=run_id, round=round_no, device_id=device, score=EvalScore(**counts))
    return result.model_copy(update={"signature": sign(derive_device_key(FLEET, key_of), result)})


def _dead_letter_reasons(transport: Transport) -> list[str]:
    subscription = transport.subscribe(topology.DEAD_LETTER_QUEUE, prefetch=100)
    reasons = []
    while (delivery := subscription.get(0.5)) is not None:
        reasons.append(dead_letter_reason(delivery.headers))
        delivery.ack()
    subscription.close()
    return sorted(reasons)


def _until(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "backend", ["memory", pytest.param("servers", marks=[pytest.mark.rabbitmq, pytest.mark.redis])]
)
@pytest.mark.timeout(180)
def test_hostile_results_are_dead_lettered_with_their_reason_and_never_counted(
    backend: str, request: pytest.FixtureRequest, run_id: str
) -> None:
    # Given three signed devices holding 10, 20 and 30 rows out (each service in its own thread; on the
    # real RabbitMQ and Redis, or on the twins), running until round 1's adapter is out for evaluation
    config = make_config(
        run_id,
        devices=3,
        rounds=2,
        extra={"eval": {"device_fraction": 0.2}, "security": {"require_signatures": True}},
    )
    transports: list[Transport]
    state: StateStore
    if backend == "memory":
        broker = InMemoryBroker()
        transports, state = [InMemoryTransport(broker) for _ in range(6)], InMemoryStateStore()
    else:
        from lorafleet.state.redis import RedisStateStore
        from lorafleet.transport.rabbitmq import PikaTransport

        url = request.getfixturevalue("rabbitmq_url")
        transports, state = (
            [PikaTransport(url) for _ in range(6)],
            RedisStateStore(request.getfixturevalue("redis_url")),
        )
    stop = threading.Event()
    pipeline = evaluating_fleet(config, transports[:5], state, FLEET)
    try:
        pipeline.start_threads(stop)
        _until(lambda: EVAL_SENT in state.get_round_metrics(run_id).get(1, {}), "round 1's evaluation task")
        # When results no honest device sent arrive (each under its device's own routing key)
        hostile = {
            "unknown_device": _hostile(run_id, 1, "dev-0042", "dev-0042"),
            "samples_exceeded": _hostile(
                run_id, 1, "dev-0000", "dev-0000", num_samples=1000, correct=1000, loss_count=1000
            ),
            "unknown_round": _hostile(run_id, 7, "dev-0001", "dev-0001"),
            "bad_signature": _hostile(run_id, 1, "dev-0002", "dev-0001"),  # signed with another device's key
        }
        for result in hostile.values():
            key = topology.update_key(result.device_id)
            transports[5].publish(
                topology.UPDATES_EXCHANGE, key, encode(result), message_id=result.message_id
            )
        _until(lambda: pipeline.orchestrator.finished and pipeline.aggregator.finished, "the end of the run")
        stop.set()
        for thread in pipeline.threads:
            thread.join(timeout=10)
        # Then each is dead-lettered with its reason and counted as rejected ...
        assert _dead_letter_reasons(transports[5]) == sorted(hostile)
        report = build_report(config, state)
        assert report["rejected"] == {reason: 1 for reason in hostile}
        # ... and every round's figure is the honest devices' own, weighted by their rows
        for entry in report["rounds"]:
            assert entry["federated_devices"] == {"dev-0000": 10, "dev-0001": 20, "dev-0002": 30}
            assert entry["federated_accuracy"] == pytest.approx(sum(RIGHT) / sum(HELD))
        assert report["final_federated_accuracy"] == pytest.approx(25 / 60)
    finally:
        stop.set()
        for transport in transports:
            transport.close()
        if backend != "memory":
            state.delete_run(run_id)
        state.close()


class Recording:
    """A trainer that notes when it trains (and trains like FakeTrainer)."""

    def __init__(self, log: list[str]) -> None:
        self.inner, self.log = FakeTrainer(0.1, 10), log

    def train(self, task: TrainTask, start: dict[str, torch.Tensor]) -> TrainOutcome:
        self.log.append(f"train {task.round}")
        return self.inner.train(task, start)


def test_a_device_trains_first_and_evaluates_only_the_newest_adapter_when_idle() -> None:
    broker = InMemoryBroker()
    service_side = InMemoryTransport(broker)
    topology.declare_static_topology(service_side)
    for queue in (topology.device_task_queue("dev-0000"), topology.device_eval_queue("dev-0000")):
        service_side.declare_queue(queue)
    log: list[str] = []
    device = InMemoryTransport(broker)
    worker = WorkerService(
        device,
        Recording(log),
        run_id="order",
        device_id="dev-0000",
        num_samples=10,
        evaluator=DeviceEvaluator(
            device, FixedScorer(5, 4, batches=3, log=log), run_id="order", device_id="dev-0000"
        ),
    )
    spec = LoraSpec(target_modules=["query"], layer_ranks={0: 2})
    adapter = encode_tensors(initial_adapter(spec))

    def train_task(round_no: int) -> None:
        task = TrainTask(
            task_id=f"order:{round_no}:dev-0000",
            run_id="order",
            round=round_no,
            device_id="dev-0000",
            plan_version=round_no,
            lora=spec,
            hparams=TrainHyperParams(),
            adapter=adapter,
            issued_at=0.0,
            deadline_at=SystemClock().now() + 600,
        )
        service_side.publish(topology.TASKS_EXCHANGE, "dev-0000", encode(task), message_id=task.message_id)

    def eval_task(round_no: int) -> None:
        task = EvalTask(run_id="order", round=round_no, lora=spec, adapter=adapter, issued_at=0.0)
        service_side.publish(
            topology.EVAL_EXCHANGE, topology.EVAL_KEY, encode(task), message_id=task.message_id
        )

    # Given the adapters of rounds 1 and 2 waiting to be evaluated, and a training task of round 3
    eval_task(1)
    eval_task(2)
    train_task(3)
    # When the worker steps: it trains first; then, idle, scores round 2's adapter (round 1's was
    # superseded in the queue) a batch per step; a task that comes meanwhile goes before the next batch
    assert worker.step() and log == ["train 3"]
    assert worker.step() and log[-1] == "score"
    train_task(4)
    for _ in range(3):
        assert worker.step()
    assert log == ["train 3", "score", "train 4", "score", "score"]
    assert not worker.step()  # nothing left
    # Then one result went out, for round 2 only, after the updates of rounds 3 and 4
    sent = [decode(body) for body, _ in broker.peek(topology.UPDATES_QUEUE)]
    assert [type(m).__name__ for m in sent] == ["LoraUpdate", "LoraUpdate", "EvalResult"]
    result = sent[-1]
    assert isinstance(result, EvalResult) and result.round == 2
    assert result.score == EvalScore(num_samples=15, correct=12, loss_sum=7.5, loss_count=15)
    assert broker.peek(topology.eval_queue_name("dev-0000")) == []


def test_a_hierarchical_run_is_evaluated_on_the_devices_each_global_round() -> None:
    config = make_config(
        "hier-eval",
        devices=3,
        rounds=2,
        extra={
            "strategy": "hierfedlora",
            "hier": {"groups": 1, "max_frequency": 2},
            "eval": {"device_fraction": 0.2},
        },
    )
    pipeline, _, state = _fake_fleet(config)
    pipeline.drive()
    metrics = state.get_round_metrics(config.run_id)
    evaluated = sorted(r for r, m in metrics.items() if EVAL_SENT in m)
    assert evaluated == [1, 2]  # the global rounds, not the intra-group ones
    for round_no in evaluated:
        assert set(metrics[round_no][EVAL_SCORES]) == set(config.device_ids())
    report = build_report(config, state)
    assert report["final_federated_accuracy"] == pytest.approx(sum(RIGHT) / sum(HELD))
