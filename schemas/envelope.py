"""The versioned msgpack envelope around every message.

Wire format: a msgpack map ``{"v": SCHEMA_VERSION, "kind": str, "id": str, "at": float, "body": map}``.
:func:`decode` accepts untrusted bytes and raises only :class:`schemas.errors.DecodeError`.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
from pydantic import ValidationError

from schemas.errors import DecodeError
from schemas.messages import MESSAGE_TYPES, Message, StrictModel

SCHEMA_VERSION = 1
#: Default bound on one encoded message; services pass their own setting.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_BY_KIND: dict[str, type[StrictModel]] = {m.KIND: m for m in MESSAGE_TYPES}  # type: ignore[attr-defined]
_ENVELOPE_KEYS = frozenset({"v", "kind", "id", "at", "body"})


def kind_of(message: StrictModel) -> str:
    """The envelope kind of a message instance."""
    return str(message.KIND)  # type: ignore[attr-defined]


def encode(message: Message, *, sent_at: float | None = None) -> bytes:
    """Pack ``message`` into envelope bytes."""
    envelope = {
        "v": SCHEMA_VERSION,
        "kind": kind_of(message),
        "id": message.message_id,
        "at": time.time() if sent_at is None else sent_at,
        "body": message.model_dump(mode="python"),
    }
    return bytes(msgpack.packb(envelope, use_bin_type=True))


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Unpack and validate envelope bytes into the message model its ``kind`` names.

    Raises:
        DecodeError: ``too_large``, ``undecodable``, ``bad_version``, ``unknown_kind`` or
            ``schema_invalid``.
    """
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"message of {len(data)} bytes exceeds {max_bytes}")
    raw = _unpack(data, max_bytes)
    if not isinstance(raw, dict) or set(raw) != _ENVELOPE_KEYS:
        raise DecodeError("undecodable", "not an envelope map with keys v, kind, id, at, body")
    if type(raw["v"]) is not int or raw["v"] != SCHEMA_VERSION:  # not True, not 1.0
        raise DecodeError("bad_version", f"schema version {raw['v']!r}, this build reads {SCHEMA_VERSION}")
    model = _BY_KIND.get(raw["kind"]) if isinstance(raw["kind"], str) else None
    if model is None:
        raise DecodeError("unknown_kind", f"unknown message kind {str(raw['kind'])[:64]!r}")
    try:
        message = model.model_validate(raw["body"])
    except ValidationError as exc:
        raise DecodeError("schema_invalid", _summarise(exc)) from None
    return message  # type: ignore[return-value]


def _unpack(data: bytes, max_bytes: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_bin_len=max_bytes,
            max_str_len=1024 * 1024,
            max_array_len=1_000_000,
            max_map_len=1_000_000,
            max_ext_len=0,
        )
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        RecursionError,
        UnicodeDecodeError,
    ) as exc:
        raise DecodeError("undecodable", f"msgpack: {type(exc).__name__}: {str(exc)[:200]}") from None


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<body>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
