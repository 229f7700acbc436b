"""Contracts between lorafleet services: messages, envelope, tensor codec, run configuration, errors."""

from schemas.errors import REJECT_REASONS, DecodeError, LorafleetError, MessageRefused, Rejected

__all__ = ["REJECT_REASONS", "DecodeError", "LorafleetError", "MessageRefused", "Rejected"]
