"""A device that vanishes (stops heartbeating) is dropped from its rounds, and the run goes on."""

from __future__ import annotations

import threading
import time

import numpy as np

from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport import topology
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from lorafleet.transport.messaging import publish_message
from orchestrator.planners.specs import global_spec
from schemas.messages import RunFinished
from schemas.tensors import tensors_from_bytes
from tests.pipeline.helpers import NUM_BLOCKS, build_pipeline, expected_global, make_config


def test_a_vanished_device_is_dropped_within_its_lease_and_rounds_close_without_it(run_id: str) -> None:
    # Given three devices, of which dev-0002 registers and then never heartbeats or trains again
    config = make_config(run_id, devices=3, rounds=2, lease_s=3.0, heartbeat_s=0.2)
    broker = InMemoryBroker()
    state = InMemoryStateStore()
    deltas, samples = [0.1, 0.3, 5.0], [10, 30, 60]
    pipeline = build_pipeline(
        config, [InMemoryTransport(broker) for _ in range(5)], state, deltas=deltas, samples=samples
    )
    stop = threading.Event()
    threads = [
        threading.Thread(target=pipeline.orchestrator.run_forever, args=(stop,), kwargs={"poll_s": 0.05}),
        threading.Thread(target=pipeline.aggregator.run_forever, args=(stop,), kwargs={"poll_s": 0.05}),
    ] + [
        threading.Thread(target=w.run_forever, args=(stop,), kwargs={"poll_s": 0.05, "heartbeat_s": 0.2})
        for w in pipeline.workers[:2]
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    # When the run proceeds
    try:
        while not pipeline.aggregator.finished:
            assert time.monotonic() - started < 60, "the run waited for the vanished device"
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    # Then both rounds closed without it (well before the 900 s round deadline) ...
    report = pipeline.orchestrator.report
    assert report is not None and report["final_round"] == 2
    assert [r["devices_reported"] for r in report["rounds"]] == [2, 2]
    assert state.get_counters(run_id)["task_dropped"] == 2
    # ... and the global adapter is exactly the mean of the two devices that reported
    expected = expected_global(global_spec(config, NUM_BLOCKS), 2, deltas[:2], samples[:2])
    stored = state.get_global_adapter(run_id)
    assert stored is not None
    got = tensors_from_bytes(stored[1])
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)


def test_a_worker_that_finishes_leaves_the_shared_stop_event_to_the_other_services(run_id: str) -> None:
    # Given a worker whose queue holds the end of the run, and a stop event shared with other services
    config = make_config(run_id, devices=1, rounds=1)
    broker = InMemoryBroker()
    pipeline = build_pipeline(
        config, [InMemoryTransport(broker) for _ in range(3)], InMemoryStateStore(), deltas=[0.1], samples=[5]
    )
    worker = pipeline.workers[0]
    pipeline.orchestrator.step(1.0)  # registers the device: its task queue exists
    finished = RunFinished(run_id=run_id, reason="max_rounds", rounds_completed=0, final_accuracy=None)
    publish_message(pipeline.orchestrator.transport, topology.TASKS_EXCHANGE, worker.device_id, finished)
    stop = threading.Event()
    # When the worker reads it and its loop ends
    thread = threading.Thread(
        target=worker.run_forever, args=(stop,), kwargs={"poll_s": 0.05, "heartbeat_s": 0.05}
    )
    thread.start()
    thread.join(timeout=30)
    ended, stopped_by_worker = not thread.is_alive(), stop.is_set()
    stop.set()
    # Then it is finished, and the event that stops the others was not set by it
    assert ended and worker.finished
    assert not stopped_by_worker
