"""The msgpack envelope: round trips of every message kind, and every way decode refuses input."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.envelope import SCHEMA_VERSION, decode, encode, kind_of
from schemas.errors import REJECT_REASONS, DecodeError
from schemas.messages import (
    MESSAGE_TYPES,
    DeviceProfile,
    DeviceRegistered,
    DeviceSlot,
    EvalResult,
    EvalScore,
    EvalTask,
    Heartbeat,
    LoraSpec,
    LoraUpdate,
    RegisterAgain,
    ReplanRequest,
    RoundClosed,
    RoundEvaluated,
    RunFinished,
    StrictModel,
    TaskFailed,
    TensorPayload,
    TrainHyperParams,
    TrainMetrics,
    TrainTask,
)

SHA = "ab" * 32
PAYLOAD = TensorPayload(data=b"\x00\x01safetensors-ish\xff", sha256=SHA, nbytes=19)
SPEC = LoraSpec(target_modules=["query", "value"], layer_ranks={0: 8, 3: 2}, alpha_ratio=2.0, dropout=0.05)


def _one_of_each() -> list[StrictModel]:
    return [
        DeviceRegistered(
            run_id="run-1",
            device_id="dev-0001",
            num_samples=250,
            label_histogram=[120, 130],
            profile=DeviceProfile(speed=0.5, uplink_mbps=10.0, downlink_mbps=20.0),
            incarnation="abc.1",
        ),
        DeviceSlot(run_id="run-1", device_id="dev-0001"),
        Heartbeat(run_id="run-1", device_id="dev-0001", seq=7, busy_task_id="run-1:3:dev-0001"),
        TrainTask(
            task_id="run-1:3:dev-0001",
            run_id="run-1",
            round=3,
            device_id="dev-0001",
            plan_version=2,
            lora=SPEC,
            hparams=TrainHyperParams(local_epochs=2, max_steps=10, batch_size=8, lr=1e-3, seed=4),
            adapter=PAYLOAD,
            issued_at=1700000000.25,
            deadline_at=1700000900.5,
        ),
        LoraUpdate(
            task_id="run-1:3:dev-0001",
            run_id="run-1",
            round=3,
            device_id="dev-0001",
            plan_version=2,
            num_samples=250,
            adapter=PAYLOAD,
            metrics=TrainMetrics(train_loss=0.693, steps=16, examples=250, compute_s=3.5),
        ),
        TaskFailed(task_id="run-1:3:dev-0001", run_id="run-1", round=3, device_id="dev-0001", reason="OOM"),
        EvalTask(run_id="run-1", round=3, lora=SPEC, adapter=PAYLOAD, issued_at=1700000001.5),
        EvalResult(
            run_id="run-1",
            round=3,
            device_id="dev-0001",
            score=EvalScore(num_samples=50, correct=41, loss_sum=17.25, loss_count=50),
        ),
        RoundClosed(
            run_id="run-1",
            round=3,
            reason="deadline",
            tasks_issued=8,
            devices_reported=6,
            bytes_up=123456,
            global_version=4,
        ),
        RoundEvaluated(run_id="run-1", round=3, accuracy=0.875, loss=0.31, eval_s=1.25),
        ReplanRequest(run_id="run-1", round=3, reason="device dev-0002 is gone"),
        RunFinished(run_id="run-1", reason="target_accuracy", rounds_completed=5, final_accuracy=0.9),
        RegisterAgain(run_id="run-1", device_id="dev-0001", seq=7),
    ]


MESSAGES = _one_of_each()


def _raw(message: StrictModel) -> dict[str, Any]:
    """The envelope map of ``message`` as a plain dict, to tamper with."""
    raw: dict[str, Any] = msgpack.unpackb(encode(message, sent_at=12.5), raw=False, strict_map_key=False)
    return raw


def _pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def _reason(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, **kwargs)
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


def test_the_fixture_covers_every_message_type() -> None:
    # Then: one instance of every registered class, so a new kind cannot go untested
    assert {type(m) for m in MESSAGES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: kind_of(m))
def test_round_trip_of_every_kind(message: StrictModel) -> None:
    # When
    data = encode(message, sent_at=123.0)
    decoded = decode(data)

    # Then: same class, equal fields, and the envelope is what the wire format documents
    assert type(decoded) is type(message)
    assert decoded == message
    assert decoded.message_id == message.message_id  # type: ignore[attr-defined]
    raw = _raw(message)
    assert set(raw) == {"v", "kind", "id", "at", "body"}
    assert raw["v"] == SCHEMA_VERSION
    assert raw["kind"] == type(message).KIND  # type: ignore[attr-defined]
    assert raw["id"] == message.message_id  # type: ignore[attr-defined]
    assert raw["at"] == 12.5


def test_round_trip_keeps_int_keys_and_bytes() -> None:
    # Given: a task whose spec has int-keyed ranks and whose payload is binary
    task = next(m for m in MESSAGES if isinstance(m, TrainTask))

    # When
    decoded = decode(encode(task))

    # Then
    assert isinstance(decoded, TrainTask)
    assert decoded.lora.layer_ranks == {0: 8, 3: 2}
    assert decoded.adapter.data == PAYLOAD.data
    assert isinstance(decoded.adapter.data, bytes)


def test_encode_without_sent_at_stamps_the_current_time() -> None:
    raw = msgpack.unpackb(encode(MESSAGES[1]), raw=False)
    assert isinstance(raw["at"], float) and raw["at"] > 1.6e9


# ---- undecodable ---------------------------------------------------------------------------------


def test_truncated_bytes_are_undecodable() -> None:
    data = encode(MESSAGES[2])
    for cut in (1, len(data) // 2, len(data) - 1):
        assert _reason(data[:cut]) == "undecodable"


def test_empty_bytes_are_undecodable() -> None:
    assert _reason(b"") == "undecodable"


def test_trailing_garbage_is_undecodable() -> None:
    data = encode(MESSAGES[0])
    assert _reason(data + b"\x00") == "undecodable"
    assert _reason(data + data) == "undecodable"


@pytest.mark.parametrize(
    "obj",
    [[1, 2, 3], "a string", 42, None, b"bin", 1.5, True],
    ids=["list", "str", "int", "nil", "bin", "float", "bool"],
)
def test_non_map_is_undecodable(obj: Any) -> None:
    assert _reason(_pack(obj)) == "undecodable"


@pytest.mark.parametrize("missing", ["v", "kind", "id", "at", "body"])
def test_missing_envelope_key_is_undecodable(missing: str) -> None:
    # Given
    raw = _raw(MESSAGES[1])
    del raw[missing]

    # Then
    assert _reason(_pack(raw)) == "undecodable"


def test_extra_envelope_key_is_undecodable() -> None:
    raw = _raw(MESSAGES[1])
    raw["extra"] = 1
    assert _reason(_pack(raw)) == "undecodable"


def test_unhashable_map_key_is_undecodable() -> None:
    # A map whose key is an array (msgpack allows it, Python dicts do not)
    assert _reason(b"\x81\x91\x01\x01") == "undecodable"


def test_deep_nesting_is_undecodable() -> None:
    assert _reason(b"\x91" * 5000 + b"\xc0") == "undecodable"


def test_ext_types_are_undecodable() -> None:
    # A msgpack timestamp (ext -1) as the whole message, and inside a body
    stamp = _pack(msgpack.Timestamp(1, 0))
    assert _reason(stamp) == "undecodable"
    raw = _raw(MESSAGES[1])
    raw["body"]["busy_task_id"] = msgpack.ExtType(5, b"abcd")
    assert _reason(_pack(raw)) == "undecodable"


# ---- version and kind ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, -1, 99, "1", None, [1], True, 1.0])
def test_wrong_version_is_bad_version(version: Any) -> None:
    # Given: a valid message whose envelope names another version (or a version that is not an int)
    raw = _raw(MESSAGES[1])
    raw["v"] = version

    # Then
    assert _reason(_pack(raw)) == "bad_version"


@pytest.mark.parametrize("kind", ["nope", "", "Heartbeat", "HEARTBEAT", 3, None, b"heartbeat", ["heartbeat"]])
def test_unknown_kind(kind: Any) -> None:
    raw = _raw(MESSAGES[1])
    raw["kind"] = kind
    assert _reason(_pack(raw)) == "unknown_kind"


def test_body_of_another_kind_is_schema_invalid() -> None:
    # Given: a heartbeat body under the run_finished kind
    raw = _raw(MESSAGES[1])
    raw["kind"] = "run_finished"
    assert _reason(_pack(raw)) == "schema_invalid"


# ---- schema_invalid ------------------------------------------------------------------------------


def _with_body(message: StrictModel, **changes: Any) -> bytes:
    raw = _raw(message)
    raw["body"].update(changes)
    return _pack(raw)


def _by_type(cls: type[StrictModel]) -> StrictModel:
    return next(m for m in MESSAGES if type(m) is cls)


@pytest.mark.parametrize(
    ("cls", "changes"),
    [
        (Heartbeat, {"unknown_field": 1}),
        (Heartbeat, {"seq": "7"}),  # strict: no str -> int coercion
        (Heartbeat, {"seq": 7.0}),  # strict: no float -> int coercion
        (Heartbeat, {"seq": -1}),
        (Heartbeat, {"run_id": "../etc"}),
        (Heartbeat, {"device_id": "../etc/passwd"}),
        (Heartbeat, {"device_id": "dev 1"}),
        (Heartbeat, {"device_id": ""}),
        (Heartbeat, {"device_id": "a" * 65}),
        (Heartbeat, {"busy_task_id": "x/y"}),
        (Heartbeat, {"run_id": b"run-1"}),
        (DeviceRegistered, {"incarnation": "a/b"}),
        (DeviceRegistered, {"label_histogram": [1, -2]}),
        (RoundEvaluated, {"loss": math.nan}),
        (RoundEvaluated, {"loss": math.inf}),
        (RoundEvaluated, {"accuracy": 1.5}),
        (RoundEvaluated, {"eval_s": -0.1}),
        (RoundClosed, {"reason": "bored"}),
        (RunFinished, {"final_accuracy": math.nan}),
        (TrainTask, {"issued_at": -math.inf}),
        (TrainTask, {"round": 1_000_000_001}),
        (TrainTask, {"lora": {"target_modules": ["query"], "layer_ranks": {}}}),
        (TrainTask, {"lora": {"target_modules": ["query"], "layer_ranks": {"0": 8}}}),
        (TrainTask, {"lora": {"target_modules": ["query"], "layer_ranks": {0: 0}}}),
        (TrainTask, {"lora": {"target_modules": ["../x"], "layer_ranks": {0: 8}}}),
        (TrainTask, {"adapter": {"data": "not bytes", "sha256": SHA, "nbytes": 9}}),
        (TrainTask, {"adapter": {"data": b"x", "sha256": "AB" * 32, "nbytes": 1}}),
        (TrainTask, {"adapter": {"data": b"x", "sha256": SHA, "nbytes": 1, "extra": 0}}),
        (LoraUpdate, {"num_samples": 0}),
        (LoraUpdate, {"metrics": {"train_loss": math.nan, "steps": 1, "examples": 1, "compute_s": 0.0}}),
        (LoraUpdate, {"metrics": None}),
        (TaskFailed, {"reason": "x" * 2001}),
    ],
)
def test_invalid_body_is_schema_invalid(cls: type[StrictModel], changes: dict[str, Any]) -> None:
    # Given: a valid message of ``cls`` with one field made invalid
    data = _with_body(_by_type(cls), **changes)

    # Then
    assert _reason(data) == "schema_invalid"


@pytest.mark.parametrize("body", [None, [], "body", 3, {}])
def test_body_that_is_not_a_valid_map_is_schema_invalid(body: Any) -> None:
    raw = _raw(MESSAGES[1])
    raw["body"] = body
    assert _reason(_pack(raw)) == "schema_invalid"


def test_missing_body_field_is_schema_invalid_and_named() -> None:
    raw = _raw(next(m for m in MESSAGES if isinstance(m, Heartbeat)))
    del raw["body"]["seq"]
    with pytest.raises(DecodeError) as info:
        decode(_pack(raw))
    assert info.value.reason == "schema_invalid"
    assert "seq" in info.value.detail


# ---- too_large -----------------------------------------------------------------------------------


def test_oversize_message_is_too_large() -> None:
    # Given
    data = encode(MESSAGES[2])

    # Then: one byte over the bound is refused before unpacking, exactly at the bound it is accepted
    assert _reason(data, max_bytes=len(data) - 1) == "too_large"
    assert decode(data, max_bytes=len(data)) == MESSAGES[2]


def test_oversize_garbage_is_too_large_not_undecodable() -> None:
    assert _reason(b"\xff" * 2000, max_bytes=1024) == "too_large"


# ---- DecodeError itself --------------------------------------------------------------------------


def test_decode_error_rejects_unknown_reason() -> None:
    with pytest.raises(ValueError, match="does not know the reason"):
        DecodeError("whatever", "detail")


def test_decode_error_is_a_value_error_with_reason_and_detail() -> None:
    err = DecodeError("too_large", "big")
    assert isinstance(err, ValueError)
    assert (err.reason, err.detail, str(err)) == ("too_large", "big", "too_large: big")


# ---- property: decode never raises anything but DecodeError ---------------------------------------

_KINDS = [m.KIND for m in MESSAGE_TYPES]  # type: ignore[attr-defined]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_keys = (
    st.text(max_size=12)
    | st.integers(min_value=-5, max_value=5)
    | st.sampled_from(["run_id", "round", "seq"])
)
_nested = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=20,
)


def _decode_or_decode_error(data: bytes) -> None:
    try:
        message = decode(data)
    except DecodeError as exc:
        assert exc.reason in REJECT_REASONS
    else:
        assert isinstance(message, MESSAGE_TYPES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    _decode_or_decode_error(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_nested)
def test_arbitrary_msgpack_objects_decode_or_raise_decode_error(obj: Any) -> None:
    _decode_or_decode_error(_pack(obj))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {
            "v": st.just(SCHEMA_VERSION) | _scalars,
            "kind": st.sampled_from(_KINDS) | _scalars,
            "id": _scalars,
            "at": _scalars,
            "body": _nested,
        }
    )
)
def test_envelope_shaped_objects_decode_or_raise_decode_error(obj: dict[str, Any]) -> None:
    # Envelopes with a known kind drive the body through model validation
    _decode_or_decode_error(_pack(obj))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MESSAGES), st.data())
def test_mutated_valid_bodies_decode_or_raise_decode_error(message: StrictModel, data: st.DataObject) -> None:
    # Given: a valid envelope with one body field replaced by an arbitrary value
    raw = _raw(message)
    field = data.draw(st.sampled_from(sorted(raw["body"])))
    raw["body"][field] = data.draw(_nested)

    # Then
    _decode_or_decode_error(_pack(raw))
