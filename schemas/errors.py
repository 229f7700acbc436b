"""The one error type that every decoder in lorafleet raises for input it cannot accept."""

from __future__ import annotations

#: Reasons a message or payload can be refused. They are the dead-letter reasons and the keys of the
#: rejection counters, so keep them short, stable and snake_case.
REJECT_REASONS = (
    "undecodable",  # not msgpack, truncated, trailing bytes, too deep/long
    "too_large",  # message or tensor payload over the configured bound
    "bad_version",  # envelope schema version this build does not read
    "unknown_kind",  # envelope kind this build does not know
    "schema_invalid",  # pydantic validation failed (unknown field, wrong type, bad id)
    "bad_checksum",  # tensor payload sha256 does not match
    "bad_tensor",  # safetensors bytes do not load, or dtype not allowed
    "non_finite",  # NaN or Inf in a tensor
    "shape_mismatch",  # tensor names or shapes differ from what the task asked for
    "wrong_run",  # message belongs to another run
    "unknown_task",  # update for a task that was never issued
    "wrong_device",  # update sender differs from the device the task went to
    "wrong_sender",  # message kind not allowed on the exchange it came through
    "unexpected_kind",  # a valid message, but not one this service consumes
    "bad_signature",  # missing or invalid device signature (lorafleet/security/signing.py)
    "replayed",  # a task id already counted, arriving again with different content
    "norm_exceeded",  # an update whose change from the global adapter exceeds limits.max_update_norm
)


class DecodeError(ValueError):
    """Input that cannot be accepted; ``reason`` is one of :data:`REJECT_REASONS`.

    Raised by :func:`schemas.envelope.decode`, :func:`schemas.tensors.decode_tensors` and the
    aggregator's update validation. Services catch it and dead-letter the message with the reason.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
