"""10,000 malformed messages at the aggregator: no crash, the global adapter untouched, each counted."""

from __future__ import annotations

import random

import msgpack
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport import topology
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from orchestrator.planners.specs import global_spec
from orchestrator.rounds import task_id
from schemas.envelope import SCHEMA_VERSION, encode
from schemas.messages import LoraUpdate, TrainMetrics
from schemas.tensors import encode_tensors
from tests.pipeline.helpers import NUM_BLOCKS, build_pipeline, initial_adapter, make_config

N_MESSAGES = 10_000


def _valid_update(run_id: str, spec, value: float = 0.5) -> LoraUpdate:  # type: ignore[no-untyped-def]
    tensors = {k: v + value for k, v in initial_adapter(spec).items()}
    return LoraUpdate(
        task_id=task_id(run_id, 1, "dev-0000"),
        run_id=run_id,
        round=1,
        device_id="dev-0000",
        plan_version=1,
        num_samples=10,
        adapter=encode_tensors(tensors),
        metrics=TrainMetrics(train_loss=0.0, steps=1, examples=10, compute_s=0.0),
    )


def _envelope(kind: str, body: object, version: object = SCHEMA_VERSION) -> bytes:
    return msgpack.packb({"v": version, "kind": kind, "id": "x", "at": 0.0, "body": body}, use_bin_type=True)


def _random_bytes(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    return rng.randbytes(rng.randrange(0, 300))


def _truncated(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    data = encode(good)
    return data[: rng.randrange(0, len(data) - 1)]


def _flipped_payload(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    """Bits flipped inside the tensor payload: its sha256 no longer matches."""
    data = bytearray(encode(good))
    start = bytes(data).find(good.adapter.data[:64])
    for _ in range(rng.randrange(1, 8)):
        data[start + rng.randrange(len(good.adapter.data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _bad_version(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    return _envelope("lora_update", good.model_dump(mode="python"), rng.choice([0, 2, True, "1", 1.0]))


def _schema_broken(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    body = good.model_dump(mode="python")
    choice = rng.randrange(3)
    if choice == 0:
        body["extra"] = 1
    elif choice == 1:
        body["num_samples"] = str(body["num_samples"])
    else:
        body.pop(rng.choice(sorted(set(body) - {"signature"})))  # a required field
    return _envelope("lora_update", body)


def _non_finite(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    bad = {k: v.clone() for k, v in initial_adapter(spec).items()}
    key = rng.choice(sorted(bad))
    bad[key].view(-1)[rng.randrange(bad[key].numel())] = rng.choice([float("nan"), float("inf")])
    return encode(good.model_copy(update={"adapter": encode_tensors(bad)}))


def _wrong_shape(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    bad = dict(initial_adapter(spec))
    key = rng.choice(sorted(bad))
    bad[key] = torch.zeros(bad[key].shape[0] + 1, *bad[key].shape[1:])
    return encode(good.model_copy(update={"adapter": encode_tensors(bad)}))


def _bad_checksum(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    return encode(good.model_copy(update={"adapter": good.adapter.model_copy(update={"sha256": "0" * 64})}))


def _wrong_identity(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    changes = rng.choice(
        [
            {"run_id": "other-run"},
            {"task_id": good.task_id.replace("dev-0000", "dev-0099")},
            {"device_id": "dev-0001"},
        ]
    )
    return encode(good.model_copy(update=changes))


def _forged_kind(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    return _envelope("run_finished", {"run_id": good.run_id, "reason": "aborted", "rounds_completed": 0})


def _nested(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    return _envelope("lora_update", [[[[rng.random()]]]] * rng.randrange(1, 50))


def _prefixed(rng: random.Random, good: LoraUpdate, spec) -> bytes:  # type: ignore[no-untyped-def]
    return b"\x00" * rng.randrange(1, 64) + encode(good)


FAMILIES = (
    _random_bytes,
    _truncated,
    _flipped_payload,
    _bad_version,
    _schema_broken,
    _non_finite,
    _wrong_shape,
    _bad_checksum,
    _wrong_identity,
    _forged_kind,
    _nested,
    _prefixed,
)


def malformed(rng: random.Random, run_id: str, spec) -> bytes:  # type: ignore[no-untyped-def]
    """One message that must be refused, drawn from many families of breakage."""
    return rng.choice(FAMILIES)(rng, _valid_update(run_id, spec), spec)


def test_ten_thousand_malformed_messages_change_nothing_and_are_each_counted(run_id: str) -> None:
    # Given a run whose round 1 is open and whose global adapter is known
    config = make_config(run_id, devices=2, rounds=1, lease_s=3600.0)  # the idle devices must not expire
    broker = InMemoryBroker()
    state = InMemoryStateStore()
    pipeline = build_pipeline(
        config, [InMemoryTransport(broker) for _ in range(4)], state, deltas=[0.1, 0.2], samples=[1, 1]
    )
    for _ in range(10):
        pipeline.orchestrator.step(0.0)
    assert pipeline.orchestrator.round == 1
    before = state.get_global_adapter(run_id)
    spec = global_spec(config, NUM_BLOCKS)
    # When 10,000 malformed messages reach the updates queue and the aggregator takes every one
    rng = random.Random(1234)
    attacker = InMemoryTransport(broker)
    for i in range(N_MESSAGES):
        attacker.publish(
            topology.UPDATES_EXCHANGE,
            topology.UPDATE_KEY,
            malformed(rng, run_id, spec),
            message_id=f"fuzz-{i}",
        )
    while pipeline.aggregator.step(0.0):
        pass
    # Then the aggregator is still running, the global adapter is byte-identical ...
    assert not pipeline.aggregator.finished
    assert state.get_global_adapter(run_id) == before
    assert state.get_counters(run_id).get("update_counted", 0) == 0
    # ... and every message sits in the dead-letter queue, counted under its reason
    assert broker.depth(topology.DEAD_LETTER_QUEUE) == N_MESSAGES
    rejected = {k: v for k, v in state.get_counters(run_id).items() if k.startswith("rejected_")}
    assert sum(rejected.values()) == N_MESSAGES
    assert len(rejected) >= 8, rejected  # many distinct reasons, not one catch-all
    print(f"\n{N_MESSAGES} malformed messages, dead-lettered by reason: {dict(sorted(rejected.items()))}")
    assert pipeline.aggregator.rejections.counts.total() == N_MESSAGES


_PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=64),
)
_VALUES = st.recursive(
    _PLAIN,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=30,
)
_KINDS = st.sampled_from(["lora_update", "task_failed", "heartbeat", "run_finished", "train_task", "nope"])


@st.composite
def _hostile(draw: st.DrawFn) -> bytes:
    """Raw bytes, or an envelope of a real or made-up kind whose body is anything msgpack holds."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    envelope = {
        "v": draw(st.sampled_from([SCHEMA_VERSION, 0, 99, "1"])),
        "kind": draw(_KINDS),
        "id": "h",
        "at": 0.0,
    }
    envelope["body"] = draw(_VALUES)
    return bytes(msgpack.packb(envelope, use_bin_type=True))


class _Target:
    """One aggregator with round 1 open, shared by every generated example."""

    def __init__(self) -> None:
        self.run_id = "t-hypothesis"
        config = make_config(self.run_id, devices=2, rounds=1, lease_s=3600.0)
        self.broker, self.state = InMemoryBroker(), InMemoryStateStore()
        self.pipeline = build_pipeline(
            config,
            [InMemoryTransport(self.broker) for _ in range(4)],
            self.state,
            deltas=[0.1, 0.2],
            samples=[1, 1],
        )
        for _ in range(10):
            self.pipeline.orchestrator.step(0.0)
        self.before = self.state.get_global_adapter(self.run_id)
        self.attacker = InMemoryTransport(self.broker)


_TARGET: list[_Target] = []


@settings(max_examples=400, deadline=None)
@given(body=_hostile())
def test_generated_hostile_messages_are_each_refused_and_counted(body: bytes) -> None:
    if not _TARGET:
        _TARGET.append(_Target())
    target = _TARGET[0]
    refused = target.pipeline.aggregator.rejections.counts.total()
    # When one generated message reaches the aggregator
    target.attacker.publish(topology.UPDATES_EXCHANGE, topology.UPDATE_KEY, body, message_id="h")
    target.pipeline.aggregator.step(0.0)
    # Then it is refused and counted, nothing is counted as an update, the adapter is untouched
    assert target.pipeline.aggregator.rejections.counts.total() == refused + 1
    assert target.state.get_counters(target.run_id).get("update_counted", 0) == 0
    assert target.state.get_global_adapter(target.run_id) == target.before
    assert not target.pipeline.aggregator.finished
