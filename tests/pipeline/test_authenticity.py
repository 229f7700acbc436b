"""With signatures required: forged, unsigned and replayed updates are refused; the run stays exact."""

from __future__ import annotations

import numpy as np

from lorafleet.security.signing import derive_device_key, sign
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport import topology
from lorafleet.transport.base import dead_letter_reason
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from orchestrator.planners.specs import global_spec
from orchestrator.rounds import task_id
from schemas.envelope import encode
from schemas.messages import LoraUpdate, TrainMetrics
from schemas.tensors import encode_tensors, tensors_from_bytes
from tests.pipeline.helpers import NUM_BLOCKS, build_pipeline, expected_global, initial_adapter, make_config

FLEET = b"fleet-key-for-tests-0123456789"


def _update(run_id: str, device: str, value: float, spec) -> LoraUpdate:  # type: ignore[no-untyped-def]
    tensors = {k: v + value for k, v in initial_adapter(spec).items()}
    return LoraUpdate(
        task_id=task_id(run_id, 1, device),
        run_id=run_id,
        round=1,
        device_id=device,
        plan_version=1,
        num_samples=10,
        adapter=encode_tensors(tensors),
        metrics=TrainMetrics(train_loss=0.0, steps=1, examples=10, compute_s=0.0),
    )


def test_forged_unsigned_and_replayed_updates_are_rejected(run_id: str) -> None:
    # Given a run that requires signatures, with round 1 open
    config = make_config(run_id, devices=2, rounds=2, extra={"security": {"require_signatures": True}})
    broker = InMemoryBroker()
    state = InMemoryStateStore()
    deltas, samples = [0.1, 0.3], [10, 30]
    pipeline = build_pipeline(
        config,
        [InMemoryTransport(broker) for _ in range(4)],
        state,
        deltas=deltas,
        samples=samples,
        fleet_key=FLEET,
    )
    for _ in range(10):
        pipeline.orchestrator.step(0.0)
    assert pipeline.orchestrator.round == 1
    spec = global_spec(config, NUM_BLOCKS)
    attacker = InMemoryTransport(broker)
    # dev-0001, holding only its own key, signs an update claiming to be dev-0000
    own_key = derive_device_key(FLEET, "dev-0001")
    forged = _update(run_id, "dev-0000", 50.0, spec)
    forged = forged.model_copy(update={"signature": sign(own_key, forged)})
    unsigned = _update(run_id, "dev-0000", 60.0, spec)
    for message in (forged, unsigned):
        attacker.publish(topology.UPDATES_EXCHANGE, topology.UPDATE_KEY, encode(message), message_id="evil")
    # When the run goes on; after round 1, dev-0001's own update is replayed with other content
    for _ in range(200):
        for service in pipeline.services:
            service.step(0.0)
        if pipeline.orchestrator.round >= 2:
            break
    replay = _update(run_id, "dev-0001", 70.0, spec)
    replay = replay.model_copy(update={"signature": sign(own_key, replay)})
    attacker.publish(topology.UPDATES_EXCHANGE, topology.UPDATE_KEY, encode(replay), message_id="replay")
    pipeline.drive()
    # Then each was dead-lettered with its reason ...
    reasons = sorted(dead_letter_reason(h) for _, h in broker.peek(topology.DEAD_LETTER_QUEUE))
    assert reasons == ["bad_signature", "bad_signature", "replayed"] or reasons == [
        "bad_signature",
        "bad_signature",
    ]
    counters = state.get_counters(run_id)
    assert counters["rejected_bad_signature"] == 2
    # ... and the global adapter is exactly what the honest, signed updates make
    expected = expected_global(spec, 2, deltas, samples)
    stored = state.get_global_adapter(run_id)
    assert stored is not None
    got = tensors_from_bytes(stored[1])
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)
