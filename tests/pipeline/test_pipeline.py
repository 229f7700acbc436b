"""Whole runs with a fake trainer, on the in-process twins and on the real RabbitMQ and Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport import topology
from lorafleet.transport.base import Transport, dead_letter_reason
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from orchestrator.planners.specs import global_spec
from orchestrator.rounds import task_id
from schemas.envelope import SCHEMA_VERSION, decode, encode
from schemas.messages import LoraUpdate, TrainMetrics, TrainTask
from schemas.tensors import encode_tensors, tensors_from_bytes
from tests.pipeline.helpers import NUM_BLOCKS, Pipeline, build_pipeline, expected_global, make_config

DELTAS = [0.1, 0.2, 0.7]
SAMPLES = [10, 30, 60]


class Backend:
    """Creates transports and the state store for one pipeline, in-process or real."""

    def __init__(self, make_transport: Callable[[], Transport], state: object, threaded: bool) -> None:
        self.make_transport = make_transport
        self.state = state
        self.threaded = threaded
        self.transports: list[Transport] = []

    def transport(self) -> Transport:
        t = self.make_transport()
        self.transports.append(t)
        return t

    def close(self) -> None:
        for t in self.transports:
            t.close()


@pytest.fixture(params=["memory", "real"])
def backend(request: pytest.FixtureRequest, run_id: str) -> Iterator[Backend]:
    if request.param == "memory":
        broker = InMemoryBroker()
        b = Backend(lambda: InMemoryTransport(broker), InMemoryStateStore(), threaded=False)
        yield b
        b.close()
        return
    url = request.getfixturevalue("rabbitmq_url")
    redis_url = request.getfixturevalue("redis_url")
    from lorafleet.state.redis import RedisStateStore
    from lorafleet.transport.rabbitmq import PikaTransport

    state = RedisStateStore(redis_url)
    b = Backend(lambda: PikaTransport(url), state, threaded=True)
    yield b
    b.close()
    state.delete_run(run_id)
    state.close()


def _build(backend: Backend, config, **kwargs) -> Pipeline:  # type: ignore[no-untyped-def]
    transports = [backend.transport() for _ in range(2 + config.devices.count)]
    return build_pipeline(config, transports, backend.state, **kwargs)  # type: ignore[arg-type]


def _finish(backend: Backend, pipeline: Pipeline, timeout: float = 60.0) -> None:
    if not backend.threaded:
        pipeline.drive()
        return
    pipeline.run_threaded(timeout)


def _global_tensors(pipeline: Pipeline) -> dict[str, torch.Tensor]:
    stored = pipeline.aggregator.state.get_global_adapter(pipeline.config.run_id)
    assert stored is not None
    return tensors_from_bytes(stored[1])


def test_rounds_aggregate_to_the_independently_computed_weighted_mean(backend: Backend, run_id: str) -> None:
    # Given three devices adding known deltas, weighted by their sample counts
    config = make_config(run_id, devices=3, rounds=3)
    pipeline = _build(backend, config, deltas=DELTAS, samples=SAMPLES)

    # When the run goes to its round budget
    _finish(backend, pipeline)

    # Then the global adapter is the initial one plus three sample-weighted mean deltas
    expected = expected_global(global_spec(config, NUM_BLOCKS), 3, DELTAS, SAMPLES)
    got = _global_tensors(pipeline)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)
    report = pipeline.orchestrator.report
    assert report is not None
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(
        r["devices_reported"] == 3 and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in report["rounds"]
    )
    assert report["updates"] == {"counted": 9}
    assert report["finish_reason"] == "max_rounds"
    assert report["final_accuracy"] == pytest.approx(report["rounds"][-1]["accuracy"])


def _bad_messages(config, nan_task_id: str) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    import msgpack

    garbage = b"\x93\xff\x00not msgpack at all"
    schema_invalid = msgpack.packb(
        {
            "v": SCHEMA_VERSION,
            "kind": "lora_update",
            "id": "x",
            "at": 0.0,
            "body": {"task_id": nan_task_id, "surprise": 1},
        },
        use_bin_type=True,
    )
    spec = global_spec(config, NUM_BLOCKS)
    from tests.pipeline.helpers import initial_adapter

    poisoned = {k: torch.full_like(v, float("nan")) for k, v in initial_adapter(spec).items()}
    nan_update = LoraUpdate(
        task_id=nan_task_id,
        run_id=config.run_id,
        round=1,
        device_id="dev-0000",
        plan_version=1,
        num_samples=10,
        adapter=encode_tensors(poisoned),
        metrics=TrainMetrics(train_loss=0.0, steps=1, examples=10, compute_s=0.0),
    )
    return [("garbage", garbage), ("schema", schema_invalid), ("nan", encode(nan_update))]


def test_garbage_schema_invalid_and_nan_updates_are_dead_lettered_and_the_run_goes_on(
    backend: Backend, run_id: str
) -> None:
    # Given a run whose first round is open
    config = make_config(run_id, devices=3, rounds=2)
    pipeline = _build(backend, config, deltas=DELTAS, samples=SAMPLES)
    injector = backend.transport()
    for _ in range(50):
        pipeline.orchestrator.step(0.05)
        if pipeline.orchestrator.round == 1:
            break
    assert pipeline.orchestrator.round == 1

    # When garbage bytes, a schema-invalid message and a NaN update for a real task arrive first
    for name, body in _bad_messages(config, task_id(run_id, 1, "dev-0000")):
        injector.publish(topology.UPDATES_EXCHANGE, topology.UPDATE_KEY, body, message_id=f"bad-{name}")
    _finish(backend, pipeline)

    # Then each sits in the dead-letter queue with its reason, counted in the report ...
    dead = _drain(injector, topology.DEAD_LETTER_QUEUE)
    assert sorted(dead_letter_reason(h) for _, h in dead) == ["non_finite", "schema_invalid", "undecodable"]
    report = pipeline.orchestrator.report
    assert report is not None
    assert report["rejected"] == {"non_finite": 1, "schema_invalid": 1, "undecodable": 1}
    # ... and the run finished with the global adapter exactly as if they had never been sent
    expected = expected_global(global_spec(config, NUM_BLOCKS), 2, DELTAS, SAMPLES)
    got = _global_tensors(pipeline)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)
    assert report["updates"] == {"counted": 6}


def _drain(transport: Transport, queue: str) -> list[tuple[bytes, dict]]:  # type: ignore[type-arg]
    sub = transport.subscribe(queue, prefetch=100)
    out = []
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        delivery = sub.get(0.5)
        if delivery is None:
            if out:
                break
            continue
        out.append((delivery.body, delivery.headers))
        delivery.ack()
    sub.close()
    return out


class DuplicatingTransport:
    """Publishes every update twice: the broker's at-least-once delivery at its worst."""

    def __init__(self, inner: Transport) -> None:
        self._inner = inner

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._inner, name)

    def publish(self, exchange: str, routing_key: str, body: bytes, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._inner.publish(exchange, routing_key, body, **kwargs)
        if exchange == topology.UPDATES_EXCHANGE:
            self._inner.publish(exchange, routing_key, body, **kwargs)


def test_duplicated_updates_are_counted_once(backend: Backend, run_id: str) -> None:
    # Given workers whose every update arrives twice
    config = make_config(run_id, devices=3, rounds=2)
    transports = [backend.transport() for _ in range(2)]
    transports += [DuplicatingTransport(backend.transport()) for _ in range(3)]  # type: ignore[misc]
    pipeline = build_pipeline(config, transports, backend.state, deltas=DELTAS, samples=SAMPLES)  # type: ignore[arg-type]

    # When the run completes
    _finish(backend, pipeline)

    # Then every update was aggregated once: the result is exact and each copy is accounted for
    expected = expected_global(global_spec(config, NUM_BLOCKS), 2, DELTAS, SAMPLES)
    got = _global_tensors(pipeline)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)
    report = pipeline.orchestrator.report
    assert report is not None
    assert report["updates"]["counted"] == 6
    counters = backend.state.get_counters(run_id)  # type: ignore[attr-defined]
    accounted = sum(v for k, v in counters.items() if k.startswith("update_"))
    # copies the aggregator had not consumed when the run ended are still in the queue, none lost
    backend.close()
    probe = backend.transport()
    deadline = time.monotonic() + 5.0
    while accounted + probe.queue_depth(topology.UPDATES_QUEUE) != 12 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert accounted + probe.queue_depth(topology.UPDATES_QUEUE) == 12


def test_a_task_sent_to_the_wrong_exchange_is_a_forged_sender(run_id: str) -> None:
    # Given a run over the in-process twins
    broker = InMemoryBroker()
    config = make_config(run_id, devices=1, rounds=1)
    pipeline = build_pipeline(
        config, [InMemoryTransport(broker) for _ in range(3)], InMemoryStateStore(), deltas=[0.1], samples=[5]
    )
    pipeline.orchestrator.step(0.0)
    # When a device publishes a TrainTask into the updates exchange (only the orchestrator may send tasks)
    spec = global_spec(config, NUM_BLOCKS)
    from tests.pipeline.helpers import initial_adapter

    forged = TrainTask(
        task_id="x:1:dev-0000",
        run_id=run_id,
        round=1,
        device_id="dev-0000",
        plan_version=1,
        lora=spec,
        hparams=pipeline.orchestrator._hparams(),
        adapter=encode_tensors(initial_adapter(spec)),
        issued_at=0.0,
        deadline_at=0.0,
    )
    InMemoryTransport(broker).publish(
        topology.UPDATES_EXCHANGE, topology.UPDATE_KEY, encode(forged), message_id="forged"
    )
    pipeline.drive()
    # Then it is dead-lettered as a wrong sender and the run completes
    dead = broker.peek(topology.DEAD_LETTER_QUEUE)
    assert [dead_letter_reason(h) for _, h in dead] == ["wrong_sender"]
    assert isinstance(decode(dead[0][0]), TrainTask)
    assert pipeline.orchestrator.report is not None and pipeline.orchestrator.report["final_round"] == 1


def test_tasks_carry_the_configured_local_optimiser(run_id: str) -> None:
    config = make_config(
        run_id,
        devices=1,
        rounds=1,
        extra={
            "training": {
                "optimizer": "sgd",
                "lr": 0.5,
                "momentum": 0.9,
                "prox_mu": 0.01,
                "max_grad_norm": 1.0,
            }
        },
    )
    broker = InMemoryBroker()
    pipeline = build_pipeline(
        config, [InMemoryTransport(broker) for _ in range(3)], InMemoryStateStore(), deltas=[0.1], samples=[5]
    )
    hparams = pipeline.orchestrator._hparams()
    assert (hparams.optimizer, hparams.lr, hparams.momentum, hparams.prox_mu) == ("sgd", 0.5, 0.9, 0.01)
    assert hparams.max_grad_norm == 1.0
