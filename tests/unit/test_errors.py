"""One error tree: every deliberate error is a LorafleetError, and refusals name a reason of their kind."""

from __future__ import annotations

import pytest

from lorafleet.run.start_adapter import StartAdapterGone
from lorafleet.state.base import StateStoreError
from lorafleet.transport.base import AccessRefused, QueueNotFound, TransportClosed, TransportError
from schemas.errors import (
    DECODE_REASONS,
    REJECT_REASONS,
    REJECTION_REASONS,
    ConfigError,
    DataError,
    DecodeError,
    LorafleetError,
    MessageRefused,
    NoFreeSlot,
    Rejected,
)


@pytest.mark.parametrize(
    "error",
    [
        ConfigError,
        DataError,
        TransportError,
        TransportClosed,
        QueueNotFound,
        AccessRefused,
        StateStoreError,
        NoFreeSlot,
        MessageRefused,
        DecodeError,
        Rejected,
        StartAdapterGone,
    ],
)
def test_every_error_is_a_lorafleet_error(error: type[Exception]) -> None:
    assert issubclass(error, LorafleetError)


def test_config_and_data_errors_stay_value_errors() -> None:
    # callers that validate input catch ValueError; the tree keeps that working
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)


def test_decode_and_rejection_reasons_partition_the_dead_letter_reasons() -> None:
    assert not set(DECODE_REASONS) & set(REJECTION_REASONS)
    assert set(REJECT_REASONS) == set(DECODE_REASONS) | set(REJECTION_REASONS)
    assert len(REJECT_REASONS) == len(set(REJECT_REASONS))


@pytest.mark.parametrize("reason", ["replayed", "bad_signature", "norm_exceeded", "wrong_run"])
def test_a_policy_rejection_is_not_a_decode_error(reason: str) -> None:
    error = Rejected(reason, "detail")
    assert isinstance(error, MessageRefused) and not isinstance(error, DecodeError)
    assert (error.reason, error.detail, str(error)) == (reason, "detail", f"{reason}: detail")
    with pytest.raises(ValueError, match="DecodeError does not know the reason"):
        DecodeError(reason, "a rejection reason is not a decode reason")


@pytest.mark.parametrize("reason", ["undecodable", "non_finite", "shape_mismatch"])
def test_a_decode_failure_is_not_a_rejection(reason: str) -> None:
    assert isinstance(DecodeError(reason, "x"), MessageRefused)
    with pytest.raises(ValueError, match="Rejected does not know the reason"):
        Rejected(reason, "x")
