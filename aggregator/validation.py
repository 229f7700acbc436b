"""Checks an update's tensors against the task it answers (pure)."""

from __future__ import annotations

from lorafleet.ml.lora import Tensors, shapes
from schemas.errors import DecodeError


def check_update_shapes(tensors: Tensors, expected: dict[str, tuple[int, ...]]) -> None:
    """The update must carry exactly the expected keys, each with the expected shape.

    Raises:
        DecodeError: ``shape_mismatch`` naming the first offending keys.
    """
    got = shapes(tensors)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if wrong:
            parts.append("wrong shape " + ", ".join(f"{k}: {got[k]} != {expected[k]}" for k in wrong[:3]))
        raise DecodeError("shape_mismatch", "; ".join(parts))
