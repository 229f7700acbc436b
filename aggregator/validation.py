"""Checks an update's tensors against the task it answers (pure)."""

from __future__ import annotations

from lorafleet.ml.lora import Tensors, shape_mismatch
from schemas.errors import DecodeError


def check_update_shapes(tensors: Tensors, expected: dict[str, tuple[int, ...]]) -> None:
    """The update must carry exactly the expected keys, each with the expected shape.

    Raises:
        DecodeError: ``shape_mismatch`` naming the first offending keys.
    """
    problem = shape_mismatch(tensors, expected)
    if problem is not None:
        raise DecodeError("shape_mismatch", problem)
