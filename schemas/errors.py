"""lorafleet's one error tree. Every error lorafleet raises on purpose is a :class:`LorafleetError`.

::

    LorafleetError
    ├── ConfigError          an invalid run configuration, flag or key (fails at startup)
    ├── DataError            a data set or data file that cannot be used
    ├── TransportError       a broker operation failed (lorafleet/transport/base.py has its kinds)
    ├── StateStoreError      a state-store operation failed
    │   └── StateLost        the run's state vanished from it mid-run
    ├── NoFreeSlot           no device slot could be claimed in time
    └── MessageRefused       a message or payload a service will not accept (dead-lettered)
        ├── DecodeError      it cannot be decoded: bytes, envelope, schema, tensors
        └── Rejected         it decodes, but policy refuses it: sender, run, task, round, signature, norm

Services catch what they mean: ``MessageRefused`` where they dead-letter, ``TransportError`` and
``StateStoreError`` where they can wait and retry, ``LorafleetError`` at the command line.
"""

from __future__ import annotations

from typing import ClassVar

#: Why a message cannot be decoded.
DECODE_REASONS = (
    "undecodable",  # not msgpack, truncated, trailing bytes, too deep/long
    "too_large",  # message or tensor payload over the configured bound
    "bad_version",  # envelope schema version this build does not read
    "unknown_kind",  # envelope kind this build does not know
    "schema_invalid",  # pydantic validation failed (unknown field, wrong type, bad id)
    "bad_checksum",  # tensor payload sha256 does not match
    "bad_tensor",  # safetensors bytes do not load, or dtype not allowed
    "non_finite",  # NaN or Inf in a tensor
    "shape_mismatch",  # tensor names or shapes differ from what the task asked for
)

#: Why a message that decodes is refused.
REJECTION_REASONS = (
    "wrong_run",  # message belongs to another run
    "unknown_task",  # update for a task that was never issued
    "wrong_device",  # update sender differs from the device the task went to
    "wrong_sender",  # message kind not allowed on the exchange it came through
    "unexpected_kind",  # a valid message, but not one this service consumes
    "bad_signature",  # missing or invalid device signature (lorafleet/security/signing.py)
    "replayed",  # a task id already counted, arriving again with different content
    "norm_exceeded",  # an update whose change from the global adapter exceeds limits.max_update_norm
    "unknown_device",  # a device id that is not one of the run's slots (devices.count)
    "samples_exceeded",  # an update claiming more samples than its device registered
    "unknown_round",  # an evaluation result for a round no evaluation task went out for
)

#: Every reason a message can be refused. They are the dead-letter reasons and the keys of the
#: rejection counters, so keep them short, stable and snake_case.
REJECT_REASONS = DECODE_REASONS + REJECTION_REASONS


class LorafleetError(Exception):
    """The root of every error lorafleet raises on purpose."""

    #: the exit status of a command that ends on this error
    exit_code: ClassVar[int] = 1


class ConfigError(LorafleetError, ValueError):
    """An invalid run configuration, flag or key; the message names each bad field and what is allowed."""


class DataError(LorafleetError, ValueError):
    """A data set or data file that cannot be used; the message names the file and the problem."""


class TransportError(LorafleetError):
    """A broker operation failed (after the adapter's bounded retries)."""


class StateStoreError(LorafleetError):
    """The state store could not complete an operation (after the adapter's bounded retries)."""


class StateStoreRefused(StateStoreError):
    """The state store refused an operation to this service's user (a Redis ACL without it)."""


class StateLost(StateStoreError):
    """The run's state is gone from the state store while the run went on (a restart without
    persistence, a failover that lost writes): going on would begin the run again from nothing."""

    exit_code = 3  # not worth restarting the service: the supervisor gives up on it


class StateRolledBack(StateLost):
    """The state store shows the run as it was before writes this service saw succeed (a failover to
    a replica that had not received them): the run is there, but older than this service's view."""


class NoFreeSlot(LorafleetError):
    """No free device slot within the time allowed."""


class MessageRefused(LorafleetError, ValueError):
    """Input a service will not accept; ``reason`` is one of the subclass's ``REASONS``.

    Services catch it and dead-letter the message with the reason.
    """

    REASONS: ClassVar[tuple[str, ...]] = REJECT_REASONS

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"{type(self).__name__} does not know the reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DecodeError(MessageRefused):
    """Bytes, an envelope, a schema or tensors that cannot be decoded.

    Raised by :func:`schemas.envelope.decode`, :func:`schemas.tensors.decode_tensors` and the
    aggregator's shape check.
    """

    REASONS = DECODE_REASONS


class Rejected(MessageRefused):
    """A message that decodes but that policy refuses (run, sender, task, signature, norm, replay)."""

    REASONS = REJECTION_REASONS
