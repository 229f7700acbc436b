"""Contracts between lorafleet services: messages, envelope, tensor codec, run configuration."""

from schemas.errors import REJECT_REASONS, DecodeError

__all__ = ["REJECT_REASONS", "DecodeError"]
